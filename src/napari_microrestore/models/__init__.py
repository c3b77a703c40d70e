"""Network architectures (one file each), the classical methods, and the model zoo.

Importing this package does not import torch: architectures are looked up by name in
:data:`ARCHITECTURES` and imported on first use by :func:`build`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..core.errors import InputError

# name used in model cards -> "module:Class" (modules relative to this package)
ARCHITECTURES: dict[str, str] = {
    "burst-unet": "burst_unet:BurstUNet",
    "burst-dense-unet": "burst_dense_unet:BurstDenseUNet",
    "burst-fast": "burst_fast:BurstFastNet",
    "deblurgan-v2": "deblurgan_v2:DeblurGANv2",
    "resnet-generator": "defocus_gan:ResnetGenerator",
    "rrdb": "rrdb:RRDBNet",
    "section-restorer": "sstem_net:SectionRestorer",
}


def architecture_class(name: str) -> Any:
    """The ``nn.Module`` class registered under ``name`` (imports torch)."""
    if name not in ARCHITECTURES:
        raise InputError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    module, _, cls = ARCHITECTURES[name].partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build(name: str, kwargs: dict | None = None) -> Any:
    """Instantiate architecture ``name`` with the card's ``kwargs``."""
    cls = architecture_class(name)
    try:
        return cls(**(kwargs or {}))
    except TypeError as e:
        raise InputError(f"architecture {name!r} does not accept these kwargs: {e}") from None
