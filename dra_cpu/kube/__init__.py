"""The cluster behind a small interface: the real API server, or a folder in standalone mode."""
