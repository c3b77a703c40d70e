"""The plugin's dock widgets (npe2 widget contributions taking ``napari_viewer``).

One module per widget; they build :class:`~napari_microrestore._napari.scheduler.Task` s and
render what the scheduler sends back, and never compute or import torch themselves. Each
widget's module is imported when the widget is first asked for, so that opening one dock
widget does not pay for the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "StreamWidget": "stream",
    "RegisterWidget": "register",
    "RestoreWidget": "restore",
    "CompareWidget": "compare",
    "ProbesWidget": "probes",
    "FinetuneWidget": "finetune",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
