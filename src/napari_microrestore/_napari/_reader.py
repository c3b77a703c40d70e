"""napari reader: TIFF, MRC and (with the ``[em]`` extra) DM/SER/EMD files with pixel size.

The work is done by :mod:`napari_microrestore.core.io`; this module only turns an
:class:`~napari_microrestore.core.io.ImageData` into napari layer data. It imports neither
napari, Qt nor torch, and the readers themselves (tifffile, mrcfile, RosettaSciIO) are only
imported when a file is read, so napari starts fast.

Accepted paths
--------------
- one file with a suffix of :data:`~napari_microrestore.core.io.SUPPORTED_SUFFIXES`;
- an OME-Zarr folder (e.g. a ``microrestore batch`` output), opened lazily; other Zarr
  stores are declined so that napari can try other readers;
- a folder that directly contains TIFF files: read as one T stream in natural order;
- a list of paths: a list of TIFF files is read as one T stream in natural order (what
  ``viewer.open(paths, stack=True)`` asks for); a one-element list as that path; any other
  list is declined (``None``) so that napari can try other readers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

from ..core.io import (
    SUPPORTED_SUFFIXES,
    TIFF_SUFFIXES,
    ImageData,
    find_tiff_frames,
    is_ome_zarr,
    is_zarr,
    natural_key,
    read,
    read_frames,
)

PathOrPaths = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]
LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[PathOrPaths], list[LayerData]]


def napari_get_reader(path: PathOrPaths) -> ReaderFunction | None:
    """Return :func:`read_layers` if this plugin can read ``path``, else ``None``.

    Only suffixes and folder listings are looked at here; errors in the files themselves
    surface when napari calls the returned function (as one-sentence ``InputError``).
    """
    if isinstance(path, (list, tuple)):
        paths = [Path(p) for p in path]
        if len(paths) == 1:
            return napari_get_reader(paths[0])
        if paths and all(p.suffix.lower() in TIFF_SUFFIXES for p in paths):
            return read_layers
        return None
    p = Path(path)  # type: ignore[arg-type]
    if is_zarr(p):
        return read_layers if is_ome_zarr(p) else None
    if p.is_dir():
        try:
            return read_layers if find_tiff_frames(p) else None
        except OSError:  # unreadable folder: let napari report that no reader fits
            return None
    return read_layers if p.suffix.lower() in SUPPORTED_SUFFIXES else None


def read_layers(path: PathOrPaths) -> list[LayerData]:
    """Read ``path`` (see the module docstring) into one napari image layer."""
    if isinstance(path, (list, tuple)):
        if len(path) == 1:
            image = read(path[0])
        else:
            image = read_frames(sorted(map(Path, path), key=natural_key))
    else:
        image = read(path)  # type: ignore[arg-type]
    return [layer_data(image)]


def layer_data(image: ImageData) -> LayerData:
    """``(data, kwargs, "image")`` with name, scale, units, axis labels and metadata.

    RGB(A) images (a trailing C axis of 3 or 4) become napari RGB layers, whose scale and
    units leave out the colour axis. Units are only set for calibrated images; T and C axes
    get napari's ``"pixel"`` unit. The layer metadata holds ``source_path``, ``format``,
    ``axes``, ``pixel_size``, ``unit`` and the rest of ``image.metadata``.
    """
    rgb = image.axes.endswith("C") and image.data.shape[-1] in (3, 4)
    n = len(image.axes) - 1 if rgb else len(image.axes)
    axes = image.axes[:n]
    kwargs: dict[str, Any] = {
        "name": _layer_name(Path(image.path)),
        "scale": tuple(image.scale[:n]),
        "axis_labels": tuple(a.lower() for a in axes),
        "rgb": rgb,
        "metadata": {
            **image.metadata,
            "source_path": image.path,
            "axes": image.axes,
            "pixel_size": image.pixel_size,
            "unit": image.unit,
        },
    }
    if image.unit is not None:
        kwargs["units"] = tuple(image.unit if a in "ZYX" else "pixel" for a in axes)
    return image.data, kwargs, "image"


def _layer_name(path: Path) -> str:
    """File name without suffix (and without ``.ome`` for OME-TIFF), the folder name, or a
    Zarr folder's name without ``.zarr``."""
    name = path.name if path.is_dir() and not is_zarr(path) else path.stem
    return name[:-4] if name.lower().endswith(".ome") else name
