"""The gateway as a process: its event loop and listeners, worker processes and the connections
handed to them (server.py, handoff.py), graceful shutdown (shutdown.py), and its memory: garbage
collection (garbage.py) and the C heap (heap.py)."""
