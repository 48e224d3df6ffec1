"""The release, written into every model directory and output record."""

__version__ = "0.1.0"
