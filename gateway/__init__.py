"""The image-generation gateway: an aiohttp reverse proxy with quotas for image generation."""

__version__ = "0.1.0"
