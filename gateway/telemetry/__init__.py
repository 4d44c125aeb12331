"""What the gateway tells about itself: the requests by decision of the last hour (activity.py)."""
