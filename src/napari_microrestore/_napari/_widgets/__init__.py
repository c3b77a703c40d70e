"""The plugin's dock widgets (npe2 widget contributions taking ``napari_viewer``).

One module per widget; they build :class:`~napari_microrestore._napari.scheduler.Task` s and
render what the scheduler sends back, and never compute or import torch themselves.
"""

from .compare import CompareWidget
from .register import RegisterWidget
from .restore import RestoreWidget

__all__ = ["CompareWidget", "RegisterWidget", "RestoreWidget"]
