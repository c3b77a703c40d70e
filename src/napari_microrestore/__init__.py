"""napari-microrestore: interactive restoration of degraded microscopy images."""

__version__ = "0.1.0"

__all__ = ["__version__"]
