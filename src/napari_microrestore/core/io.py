"""Read microscopy frames and stacks with their pixel size; write TIFF and JSON atomically.

Formats
-------
- TIFF (8/16/32-bit integer and float, any compression imagecodecs decodes, multi-page,
  ImageJ hyperstacks, OME-TIFF, FEI/Thermo Fisher TEM/SEM TIFFs);
- a folder (or a list) of single-frame TIFFs, read as one stream in natural order
  (``frame_2`` before ``frame_10``);
- MRC / MRCS / ST / MAP through ``mrcfile``, memory-mapped;
- DM3 / DM4, SER / EMI and Velox EMD through RosettaSciIO, the optional ``[em]`` extra;
- OME-Zarr (a ``*.zarr`` folder, NGFF 0.4 or 0.5; the first resolution level) and plain Zarr
  arrays, lazily as zarr arrays, through the optional ``[batch]`` extra (zarr).

Conventions
-----------
``ImageData.axes`` names every axis of ``data`` with one of the letters T (time / frames),
Z (sections, depth), C (channels or RGB samples), Y and X; Y and X always come last, or just
before a trailing C for RGB images. Where a file does not say what a leading axis is, it is
called Z (the ImageJ convention: a plain stack is a stack of slices), except for MRC image
stacks (space group 0: movies, particle stacks, tilt series), which are called T.

``ImageData.pixel_size`` has one entry per axis of ``data``, in ``ImageData.unit``: the pixel
size for Y and X, the section spacing for Z and 1.0 for T and C. It is ``None`` when the file
has no spatial calibration. When Y and X are calibrated but the Z spacing is unknown, Z gets
the X pixel size (isotropic voxels) and ``metadata["z_spacing_assumed"]`` is True. Lengths are
normalised to ``"nm"`` (from nm, Angstrom, pm: the EM formats) or ``"um"`` (from um, mm, cm, m),
reciprocal lengths (diffraction) to ``"1/nm"`` or ``"1/um"``, and rounded to 7 significant
digits (float32 calibrations: 4.6 Angstrom reads as 0.46 nm, not 0.4599999904632568).

Lazy reading: uncompressed contiguous TIFFs and MRC files are ``numpy.memmap`` views
(read-only); compressed multi-page TIFFs and TIFF folders are :class:`LazyStack` objects that
decode a frame when it is indexed; RosettaSciIO returns dask arrays (its own dependency);
Zarr stores are read-only zarr arrays that decode a chunk when it is indexed.
Single compressed images are decoded at once. Files are checked up front (size against the data the
headers promise), so a truncated file fails in :func:`read`, not when a frame is displayed.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import struct
import threading
import uuid
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

import numpy as np

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tifffile

PathLike = Union[str, "os.PathLike[str]"]

TIFF_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
MRC_SUFFIXES: tuple[str, ...] = (".mrc", ".mrcs", ".st", ".map")
# suffix -> (rsciio sub-package, format name for messages)
_RSCIIO_FORMATS: dict[str, tuple[str, str]] = {
    ".dm3": ("digitalmicrograph", "DigitalMicrograph DM3"),
    ".dm4": ("digitalmicrograph", "DigitalMicrograph DM4"),
    ".ser": ("tia", "TIA SER"),
    ".emi": ("tia", "TIA EMI"),
    ".emd": ("emd", "EMD"),
}
EM_SUFFIXES: tuple[str, ...] = tuple(_RSCIIO_FORMATS)
SUPPORTED_SUFFIXES: tuple[str, ...] = TIFF_SUFFIXES + MRC_SUFFIXES + EM_SUFFIXES
EM_EXTRA_COMMAND = 'pip install "napari-microrestore[em]"'
ZARR_SUFFIXES: tuple[str, ...] = (".zarr",)
BATCH_EXTRA_COMMAND = 'pip install "napari-microrestore[batch]"'
# OME-NGFF axis types -> our letters, where the axis name does not say
_NGFF_TYPES = {"time": "T", "channel": "C"}

_AXIS_LETTERS = "TZCYX"
# tifffile axis letters with a meaning we keep; S (RGB samples) becomes C
_TIFF_AXIS_HINTS = {"T": "T", "Z": "Z", "C": "C", "S": "C", "Y": "Y", "X": "X"}
# ImageJ can store these dtypes; others are written as plain (shaped) TIFF
_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)
# length units -> (normalised unit, factor to it)
_LENGTH_UNITS: dict[str, tuple[str, float]] = {
    "pm": ("nm", 1e-3),
    "a": ("nm", 0.1),
    "å": ("nm", 0.1),
    "angstrom": ("nm", 0.1),
    "angstroms": ("nm", 0.1),
    "nm": ("nm", 1.0),
    "nanometer": ("nm", 1.0),
    "nanometers": ("nm", 1.0),
    "nanometre": ("nm", 1.0),
    "nanometres": ("nm", 1.0),
    "um": ("um", 1.0),
    "µm": ("um", 1.0),  # micro sign
    "μm": ("um", 1.0),  # Greek mu
    "\\u00b5m": ("um", 1.0),  # as ImageJ escapes it
    "micron": ("um", 1.0),
    "microns": ("um", 1.0),
    "micrometer": ("um", 1.0),
    "micrometers": ("um", 1.0),
    "micrometre": ("um", 1.0),
    "micrometres": ("um", 1.0),
    "mm": ("um", 1e3),
    "millimeter": ("um", 1e3),
    "cm": ("um", 1e4),
    "centimeter": ("um", 1e4),
    "m": ("um", 1e6),
    "meter": ("um", 1e6),
}
# TIFF ResolutionUnit -> micrometres per unit; INCH (2) is left out on purpose: it is the
# print resolution (72 dpi, ...) of most writers, not a physical pixel size
_TIFF_RESUNIT_UM = {3: 1e4, 4: 1e3, 5: 1.0}


@dataclass
class ImageData:
    """An image or stack read from a file, with its calibration.

    Attributes
    ----------
    data
        ``numpy.ndarray``, read-only ``numpy.memmap`` or :class:`LazyStack` (or a dask array
        from RosettaSciIO's lazy readers); index it or call ``numpy.asarray`` to get pixels.
        Intensities are the file's own values and dtype.
    axes
        One letter per axis of ``data`` from ``"TZCYX"``; see the module docstring.
    pixel_size
        One value per axis of ``data`` in ``unit`` (1.0 for T and C), or ``None`` when the
        file has no spatial calibration.
    unit
        ``"nm"``, ``"um"``, ``"1/nm"``, ``"1/um"`` or ``None`` (uncalibrated).
    metadata
        JSON-friendly provenance: ``"format"``, ``"source_path"`` and what the format adds
        (ImageJ / OME / FEI fields, MRC header values, the ``"microrestore"`` dictionary that
        :func:`write_tiff` stored, ...).
    path
        The file or folder that was read.
    """

    data: Any
    axes: str
    pixel_size: tuple[float, ...] | None
    unit: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def __post_init__(self) -> None:
        if len(self.axes) != self.data.ndim:
            raise ValueError(f"axes {self.axes!r} do not match data with {self.data.ndim} dims")
        if self.pixel_size is not None and len(self.pixel_size) != self.data.ndim:
            raise ValueError(
                f"pixel_size {self.pixel_size} needs one value per axis of {self.axes!r}"
            )

    @property
    def scale(self) -> tuple[float, ...]:
        """Per-axis scale for napari: ``pixel_size``, or 1.0 for every axis when uncalibrated."""
        if self.pixel_size is None:
            return (1.0,) * len(self.axes)
        return tuple(self.pixel_size)

    @property
    def yx_pixel_size(self) -> tuple[float, float] | None:
        """``(Y, X)`` pixel size in ``unit``, or ``None`` when uncalibrated."""
        if self.pixel_size is None:
            return None
        return (self.pixel_size[self.axes.index("Y")], self.pixel_size[self.axes.index("X")])


class LazyStack:
    """Read-only array-like over equally shaped frames that are decoded when indexed.

    ``numpy.asarray`` and numpy indexing work. Integers, slices, ``...`` and 1-D integer or
    boolean arrays on the leading (frame) axes read only the frames they select; fancy
    indexing of Y / X or multi-dimensional boolean masks read the whole stack first.

    Parameters
    ----------
    read_frame
        Returns frame ``i`` (flat index over the leading axes) with ``frame_shape`` and
        ``dtype``.
    lead_shape
        Shape of the frame axes (for example ``(T,)`` or ``(T, Z)``).
    frame_shape
        Shape of one frame (``(Y, X)`` or ``(Y, X, C)``).
    dtype
        Data type of the frames.
    name
        Shown in messages about frames that cannot be decoded.
    """

    def __init__(
        self,
        read_frame: Callable[[int], np.ndarray],
        lead_shape: tuple[int, ...],
        frame_shape: tuple[int, ...],
        dtype: np.dtype | type,
        *,
        name: str = "stack",
    ) -> None:
        self._read_frame = read_frame
        self._lead_shape = tuple(int(n) for n in lead_shape)
        self._frame_shape = tuple(int(n) for n in frame_shape)
        self._grid = np.arange(math.prod(self._lead_shape)).reshape(self._lead_shape)
        self._name = name
        self.dtype = np.dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._lead_shape + self._frame_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyStack({self._name!r}, shape={self.shape}, dtype={self.dtype})"

    def frame(self, index: int) -> np.ndarray:
        """Decode frame ``index`` (flat over the leading axes) and check its shape and dtype."""
        try:
            arr = np.asarray(self._read_frame(int(index)))
        except InputError:
            raise
        except Exception as exc:  # decoder errors of any kind become one clear sentence
            raise InputError(
                f"{self._name}: frame {index} could not be decoded ({_reason(exc)}); "
                "the file is truncated or corrupt."
            ) from exc
        if arr.shape != self._frame_shape or arr.dtype != self.dtype:
            raise InputError(
                f"{self._name}: frame {index} is {_describe(arr.shape, arr.dtype)} but "
                f"{_describe(self._frame_shape, self.dtype)} was expected; did the files change?"
            )
        return arr

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(np.ndim(k) > 1 and np.asarray(k).dtype == bool for k in key):
            return np.asarray(self)[key]  # a mask spanning several axes: index exactly
        key = self._expand_key(key)
        nlead = len(self._lead_shape)
        lead_key, frame_key = key[:nlead], key[nlead:]
        if any(not isinstance(k, (slice, int, np.integer)) for k in frame_key):
            # numpy moves mixed advanced-index axes around: read everything, index exactly
            return np.asarray(self)[key]
        indices = self._grid[lead_key]
        out = np.empty(np.shape(indices) + self._frame_shape, dtype=self.dtype)
        for pos, i in np.ndenumerate(indices):
            out[pos] = self.frame(i)
        return out[(slice(None),) * np.ndim(indices) + frame_key]

    def _expand_key(self, key: tuple[Any, ...]) -> tuple[Any, ...]:
        """Key with one entry per axis (``...`` expanded, missing axes ``:``)."""
        if any(k is None for k in key):
            raise IndexError("LazyStack does not support numpy.newaxis")
        n_ellipsis = sum(k is Ellipsis for k in key)
        if n_ellipsis > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if n_ellipsis:
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1 :]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices: {len(key)} for an array of {self.ndim} dims")
        return key + (slice(None),) * (self.ndim - len(key))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a LazyStack cannot be viewed without reading it (copy=False)")
        arr = self[...]
        return arr if dtype is None else arr.astype(dtype, copy=False)


# --------------------------------------------------------------------------- public API


def read(path: PathLike, *, lazy: bool = True) -> ImageData:
    """Read an image, stack or folder of TIFF frames with its pixel size.

    Parameters
    ----------
    path
        A file with one of :data:`SUPPORTED_SUFFIXES` (case-insensitive), a Zarr / OME-Zarr
        folder (see :func:`is_zarr`) or a folder of single-frame TIFFs (read as one T stack,
        natural order).
    lazy
        Memory-map or decode frames on demand where the format allows (see the module
        docstring); ``False`` loads everything into memory.

    Returns
    -------
    ImageData

    Raises
    ------
    InputError
        Missing, empty, truncated, corrupt or unsupported file, a folder without TIFFs or with
        frames of different shapes, or a missing ``[em]`` extra for DM/SER/EMD files.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist.")
    if is_zarr(p):
        return _read_zarr(p, lazy)
    if p.is_dir():
        frames = find_tiff_frames(p)
        if not frames:
            raise InputError(f"Folder {p} contains no TIFF files (*.tif, *.tiff).")
        return read_frames(frames, lazy=lazy)
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputError(
            f"Cannot read {p.name}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"supported are {', '.join(SUPPORTED_SUFFIXES)} or a folder of TIFF frames."
        )
    if p.stat().st_size == 0:
        raise InputError(f"{p} is empty (0 bytes).")
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(p, lazy)
    if suffix in MRC_SUFFIXES:
        return _read_mrc(p, lazy)
    return _read_rsciio(p, lazy)


def read_array(path: PathLike) -> np.ndarray:
    """Read ``path`` fully into memory (eager :func:`read`) and return the pixel array."""
    return np.asarray(read(path, lazy=False).data)


def find_tiff_frames(folder: PathLike) -> list[Path]:
    """TIFF files directly inside ``folder`` in natural order, hidden files skipped."""
    files = [
        entry
        for entry in Path(folder).iterdir()
        if entry.suffix.lower() in TIFF_SUFFIXES
        and not entry.name.startswith(".")
        and entry.is_file()
    ]
    return sorted(files, key=natural_key)


def natural_key(path: PathLike) -> tuple[Any, ...]:
    """Sort key for file names that orders embedded numbers by value: frame_2 before frame_10."""
    parts = re.split(r"(\d+)", Path(path).name.lower())
    return tuple(int(p) if p.isdecimal() else p for p in parts)


def read_frames(paths: Sequence[PathLike], *, lazy: bool = True) -> ImageData:
    """Read single-frame TIFF files as one stream, axes ``"T" + frame axes``.

    The files are taken in the order given (:func:`find_tiff_frames` sorts a folder
    naturally). Every file is opened and checked up front (shape, dtype, completeness); the
    pixel size and metadata come from the first file. With ``lazy=True`` the result is a
    :class:`LazyStack` that decodes a file when its frame is indexed.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise InputError("No TIFF frames were given to read as a stream.")
    for f in files:
        if not f.is_file():
            raise InputError(f"{f} does not exist or is not a file.")
        if f.suffix.lower() not in TIFF_SUFFIXES:
            raise InputError(f"{f.name} is not a TIFF file; a stream needs *.tif or *.tiff frames.")
    first = _read_tiff(files[0], lazy=True)
    if "T" in first.axes or "Z" in first.axes:
        raise InputError(
            f"{files[0].name} holds a stack of shape {first.data.shape} ({first.axes}); "
            "a stream must be made of single-frame TIFFs."
        )
    frame_shape, dtype = tuple(first.data.shape), first.data.dtype
    for f in files[1:]:
        tif, series = _open_tiff(f)
        shape, fdtype = tuple(series.shape), series.dtype
        tif.close()
        if shape != frame_shape or fdtype != dtype:
            raise InputError(
                f"Frames differ in shape or type: {files[0].name} is "
                f"{_describe(frame_shape, dtype)} but {f.name} is {_describe(shape, fdtype)}."
            )

    def read_one(i: int) -> np.ndarray:
        tif, series = _open_tiff(files[i])
        with tif:
            return series.asarray()

    name = files[0].parent.name or str(files[0].parent)
    stack = LazyStack(read_one, (len(files),), frame_shape, dtype, name=name)
    data = stack if lazy else np.asarray(stack)
    pixel_size = None if first.pixel_size is None else (1.0,) + first.pixel_size
    metadata = dict(first.metadata)
    metadata.update(
        format="tiff-frames",
        source_path=str(files[0].parent),
        frames=[f.name for f in files],
        frame_format=first.metadata["format"],
    )
    return ImageData(data, "T" + first.axes, pixel_size, first.unit, metadata, str(files[0].parent))


def write_tiff(
    path: PathLike,
    data: Any,
    *,
    axes: str | None = None,
    pixel_size: float | Sequence[float] | None = None,
    unit: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    compression: str | None = None,
) -> Path:
    """Write ``data`` to a TIFF that :func:`read`, napari and Fiji open with its pixel size.

    The file is written to a temporary file in the same folder and then renamed over
    ``path``, so a failure never leaves a half-written file (an existing file stays intact).

    uint8, uint16, int16 and float32 data in ImageJ axis order (T, Z, C, Y, X subsequence)
    become an ImageJ hyperstack: resolution tags = 1 / pixel size, ``unit`` (``"nm"`` or
    ``"micron"``) and ``spacing`` (Z) in the ImageJ description, ``metadata`` as JSON in the
    ImageJ "Info" property (Fiji: Image > Show Info). Other dtypes or axis orders are written
    as a plain TIFF with a JSON description (tifffile's "shaped" format) holding the axes,
    the per-axis pixel size, the unit and ``metadata``, and centimetre resolution tags.
    Either way ``read(path).metadata["microrestore"]`` returns ``metadata``.

    Parameters
    ----------
    path
        Destination ``*.tif`` / ``*.tiff``; its folder must exist.
    data
        Array-like with at least 2 dims; written with its own dtype (no rescaling).
    axes
        One letter per axis from ``"TZCYX"``, ending in ``"YX"`` (or ``"YXC"`` for RGB(A)
        with 3 or 4 channels). Default: ``"YX"``, ``"ZYX"``, ``"TZYX"``, ``"TZCYX"`` by ndim.
    pixel_size
        ``None``, one float (the Y and X pixel size), ``(Y, X)`` sizes, or one value per
        axis as in :attr:`ImageData.pixel_size`; in ``unit``.
    unit
        Length unit of ``pixel_size`` (``"nm"``, ``"um"``, ``"A"``, ...); required with it.
    metadata
        JSON-serialisable dictionary (numpy scalars and arrays are converted).
    compression
        tifffile compression name (``"zlib"``, ``"lzw"``, ``"zstd"``, ...) or ``None``.

    Returns
    -------
    Path
        The written file.
    """
    import tifffile

    target = Path(path)
    if target.suffix.lower() not in TIFF_SUFFIXES:
        raise InputError(f"Cannot write {target.name}: write_tiff needs a .tif or .tiff path.")
    arr = np.asarray(data)
    if arr.ndim < 2:
        raise InputError(f"Cannot write an image with {arr.ndim} dims; at least Y and X needed.")
    axes = _check_write_axes(_default_write_axes(arr.ndim) if axes is None else axes, arr)
    rgb = axes.endswith("C")
    sizes, norm_unit = _spatial_pixel_size(pixel_size, unit, axes)
    stored = json.loads(_to_json(dict(metadata or {}), "metadata"))
    tiff_axes = axes[:-1] + "S" if rgb else axes
    imagej = (
        arr.dtype in [np.dtype(t) for t in _IMAGEJ_DTYPES]
        and _is_subsequence(tiff_axes, "TZCYXS")
        and (not rgb or (arr.dtype == np.uint8 and arr.shape[-1] == 3))
    )
    kwargs: dict[str, Any] = {
        "photometric": "rgb" if rgb else "minisblack",
        "compression": compression,
    }
    if imagej:
        ij: dict[str, Any] = {"axes": tiff_axes, "Info": json.dumps({"microrestore": stored})}
        if sizes:
            kwargs["resolution"] = (1.0 / sizes["X"], 1.0 / sizes["Y"])
            ij["unit"] = "micron" if norm_unit == "um" else norm_unit
            if "Z" in sizes:
                ij["spacing"] = sizes["Z"]
        kwargs.update(imagej=True, metadata=ij)
    else:
        shaped: dict[str, Any] = {"axes": tiff_axes, "microrestore": stored}
        if sizes:
            shaped.update(pixel_size=sizes, unit=norm_unit)
            um_per_unit = {"nm": 1e-3, "um": 1.0}.get(norm_unit or "")
            if um_per_unit is not None:  # for Fiji and others; read() uses the JSON
                kwargs["resolution"] = (
                    1e4 / (sizes["X"] * um_per_unit),
                    1e4 / (sizes["Y"] * um_per_unit),
                )
                kwargs["resolutionunit"] = "CENTIMETER"
        kwargs["metadata"] = shaped
    return _atomic_write(target, lambda fh: tifffile.imwrite(fh, arr, **kwargs))


def write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON, atomically (temporary file + rename).

    numpy scalars and arrays, tuples and paths are converted; NaN and infinity are written as
    ``NaN`` / ``Infinity`` (Python's ``json`` reads them back). Returns the written path.
    """
    text = _to_json(obj, Path(path).name, indent=2) + "\n"
    return _atomic_write(Path(path), lambda fh: fh.write(text.encode("utf-8")))


# --------------------------------------------------------------------------- TIFF


def _open_tiff(path: Path) -> tuple[tifffile.TiffFile, tifffile.TiffPageSeries]:
    """Open a TIFF, take its first series and check that its data are all in the file.

    The caller closes the returned file. Raises :class:`InputError` for files that are not
    TIFF, hold no image, or are truncated.
    """
    import tifffile

    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes).")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise InputError(f"{path.name} is not a readable TIFF file ({_reason(exc)}).") from exc
    try:
        if not tif.series:
            raise InputError(f"{path.name} is a TIFF file without image data.")
        series = tif.series[0]
        _check_tiff_complete(tif, series, path)
    except InputError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise InputError(
            f"{path.name} is truncated or corrupt ({_reason(exc)}); it cannot be read."
        ) from exc
    return tif, series


def _check_tiff_complete(tif: tifffile.TiffFile, series: Any, path: Path) -> None:
    """Raise :class:`InputError` if ``series`` promises more data than ``path`` holds.

    Checks: an IFD chain that points past what tifffile could parse (the tail of the file is
    missing); data of a contiguous series, or of its first and last page, inside the file;
    and the image count that shaped / ImageJ / OME metadata declare.
    """
    filesize = tif.filehandle.size
    truncated = InputError(
        f"{path.name} is truncated or corrupt: its headers promise more image data "
        f"than the {filesize} bytes in the file."
    )
    if _ifd_chain_continues(tif):
        raise truncated
    if series.dataoffset is not None and series.dataoffset + series.nbytes > filesize:
        raise truncated
    pages = series.pages
    for page in (pages[0], pages[len(pages) - 1]):
        if page is None:
            raise truncated
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        # page.parent: multi-file OME series have pages in other files
        if ends and max(ends) > page.parent.filehandle.size:
            raise truncated
    declared = _declared_size(tif)
    if declared is not None and declared != series.size:
        raise truncated


def _declared_size(tif: tifffile.TiffFile) -> int | None:
    """Number of samples the shaped / ImageJ / OME metadata say series 0 has, else ``None``."""
    if tif.is_shaped and tif.shaped_metadata and "shape" in tif.shaped_metadata[0]:
        return math.prod(int(n) for n in tif.shaped_metadata[0]["shape"])
    if tif.is_imagej and tif.imagej_metadata and "images" in tif.imagej_metadata:
        return int(tif.imagej_metadata["images"]) * tif.pages[0].size
    if tif.is_ome and tif.ome_metadata:
        pixels = _ome_pixels(tif.ome_metadata)
        if pixels is not None:
            return math.prod(int(pixels.get(f"Size{a}", 1)) for a in "XYCZT")
    return None


def _ifd_chain_continues(tif: tifffile.TiffFile) -> bool:
    """True if the last page tifffile parsed links to another IFD (that it could not read)."""
    fmt = tif.tiff
    fh = tif.filehandle
    last = tif.pages[len(tif.pages) - 1]
    fh.seek(last.offset)
    (ntags,) = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))
    fh.seek(last.offset + fmt.tagnosize + ntags * fmt.tagsize)
    raw = fh.read(fmt.offsetsize)
    return len(raw) < fmt.offsetsize or struct.unpack(fmt.offsetformat, raw)[0] != 0


def _read_tiff(path: Path, lazy: bool) -> ImageData:
    tif, series = _open_tiff(path)
    keep_open = False
    try:
        axes = _name_axes([_TIFF_AXIS_HINTS.get(a) for a in series.axes], path)
        metadata = _tiff_metadata(tif, path)
        spatial, unit = _tiff_calibration(tif, axes, metadata)
        pixel_size = _assemble_pixel_size(axes, spatial, metadata)
        if pixel_size is None:
            unit = None
        page = series.pages[0]
        n_lead = series.ndim - page.ndim
        pages_are_frames = (
            n_lead > 0
            and tuple(series.shape[n_lead:]) == tuple(page.shape)
            and len(series.pages) == math.prod(series.shape[:n_lead])
        )
        if lazy and series.dataoffset is not None:
            data: Any = np.memmap(
                path,
                dtype=series.dtype.newbyteorder(tif.byteorder),
                mode="r",
                offset=series.dataoffset,
                shape=tuple(series.shape),
            )
        elif lazy and pages_are_frames:
            data = _tiff_page_stack(tif, series, n_lead, path)
            keep_open = True
        else:
            data = series.asarray()
    except InputError:
        raise
    except Exception as exc:  # decoder or metadata errors: one sentence, not a traceback
        raise InputError(
            f"{path.name} could not be decoded ({_reason(exc)}); the file is truncated or corrupt."
        ) from exc
    finally:
        if not keep_open:
            tif.close()
    return ImageData(data, axes, pixel_size, unit, metadata, str(path))


def _tiff_page_stack(
    tif: tifffile.TiffFile, series: Any, n_lead: int, path: Path
) -> LazyStack:
    """A :class:`LazyStack` decoding the pages of an open TIFF (closed when it is freed)."""
    lock = threading.Lock()
    pages = series.pages

    def read_page(i: int) -> np.ndarray:
        with lock:  # one file handle: serialise seeks and reads (napari slices in threads)
            return pages[i].asarray()

    stack = LazyStack(
        read_page, tuple(series.shape[:n_lead]), tuple(pages[0].shape), series.dtype,
        name=path.name,
    )
    weakref.finalize(stack, tif.close)
    return stack


def _tiff_metadata(tif: tifffile.TiffFile, path: Path) -> dict[str, Any]:
    """Format name and the metadata worth keeping (small JSON-friendly values only)."""
    page = tif.pages[0]
    fmt = "ome-tiff" if tif.is_ome else "imagej-tiff" if tif.is_imagej else "tiff"
    meta: dict[str, Any] = {
        "format": fmt,
        "source_path": str(path),
        "compression": page.compression.name,
    }
    if len(tif.series) > 1:
        meta["n_series"] = len(tif.series)
    if tif.is_imagej and tif.imagej_metadata:
        info = tif.imagej_metadata.get("Info")
        stored = _stored_metadata(info) if isinstance(info, str) else None
        if stored is not None:
            meta["microrestore"] = stored
        meta["imagej"] = {
            k: v
            for k, v in tif.imagej_metadata.items()
            if isinstance(v, (str, int, float, bool)) and not (k == "Info" and stored is not None)
        }
    elif tif.is_shaped and tif.shaped_metadata:
        shaped = dict(tif.shaped_metadata[0])
        if isinstance(shaped.get("microrestore"), dict):
            meta["microrestore"] = shaped.pop("microrestore")
        meta["shaped"] = shaped
    if tif.is_fei and tif.fei_metadata:
        meta["fei"] = _json_safe(tif.fei_metadata)
    return meta


def _stored_metadata(info: str) -> dict[str, Any] | None:
    """The dictionary :func:`write_tiff` put into an ImageJ Info string, else ``None``."""
    try:
        parsed = json.loads(info)
    except ValueError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("microrestore"), dict):
        return parsed["microrestore"]
    return None


def _tiff_calibration(
    tif: tifffile.TiffFile, axes: str, metadata: dict[str, Any]
) -> tuple[dict[str, float], str | None]:
    """Pixel sizes of the spatial axes ({"X":.., "Y":.., "Z":..}) and their unit.

    Sources, first match wins: the JSON written by :func:`write_tiff`; OME PhysicalSize;
    ImageJ unit + resolution + spacing; FEI [Scan] PixelWidth/PixelHeight (metres); TIFF
    resolution tags in cm, mm or um.
    """
    shaped = metadata.get("shaped", {})
    norm = _normalise_unit(1.0, shaped.get("unit"))
    stored = shaped.get("pixel_size")  # {"Y": .., "X": ..[, "Z": ..]} from write_tiff
    if norm is not None and isinstance(stored, dict):
        factor, unit = norm
        return {a: _as_float(v) * factor for a, v in stored.items() if a in axes}, unit
    if tif.is_ome and tif.ome_metadata:
        pixels = _ome_pixels(tif.ome_metadata) or {}
        found = {}
        for a in "ZYX":
            value = _as_float(pixels.get(f"PhysicalSize{a}"))
            # the OME schema's default unit is the micrometre
            norm = _normalise_unit(value, pixels.get(f"PhysicalSize{a}Unit", "µm"))
            if norm is not None:
                found[a] = norm
        result = _common_unit(found)
        if result is not None and {"X", "Y"} <= set(result[0]):
            return result
    page = tif.pages[0]
    xres, yres = page.resolution
    ij = tif.imagej_metadata if tif.is_imagej else None
    norm = _normalise_unit(1.0, (ij or {}).get("unit"))
    if norm is not None and xres > 0 and yres > 0:
        factor, unit = norm
        sizes = {"X": factor / xres, "Y": factor / yres}
        spacing = _as_float(ij.get("spacing"))  # type: ignore[union-attr]
        if spacing > 0:
            sizes["Z"] = spacing * factor
        return sizes, unit
    scan = (tif.fei_metadata or {}).get("Scan", {}) if tif.is_fei else {}
    width, height = _as_float(scan.get("PixelWidth")), _as_float(scan.get("PixelHeight"))
    if width > 0 and height > 0:  # metres
        return {"X": width * 1e9, "Y": height * 1e9}, "nm"
    um_per_unit = _TIFF_RESUNIT_UM.get(int(page.resolutionunit))
    if um_per_unit is not None and xres > 0 and yres > 0:
        return {"X": um_per_unit / xres, "Y": um_per_unit / yres}, "um"
    return {}, None


def _ome_pixels(xml: str) -> dict[str, str] | None:
    """Attributes of the first OME ``Pixels`` element, or ``None`` if there is none."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels":
            return dict(element.attrib)
    return None


# --------------------------------------------------------------------------- Zarr


def is_zarr(path: PathLike) -> bool:
    """True for a folder that is a Zarr store: named ``*.zarr`` or holding Zarr metadata."""
    p = Path(path)
    if not p.is_dir():
        return False
    return p.suffix.lower() in ZARR_SUFFIXES or any(
        (p / name).is_file() for name in (".zgroup", ".zarray", "zarr.json"))


def is_ome_zarr(path: PathLike) -> bool:
    """True for a Zarr group with OME-Zarr ``multiscales`` metadata (0.4 or 0.5).

    Reads the group's JSON metadata only (no zarr import), so it is cheap enough for napari's
    reader selection.
    """
    p = Path(path)
    for name, key in ((".zattrs", None), ("zarr.json", "attributes")):
        try:
            meta = json.loads((p / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        attrs = meta.get(key, {}) if key and isinstance(meta, dict) else meta
        if not isinstance(attrs, dict):
            continue
        ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
        if isinstance(ome.get("multiscales"), list):
            return True
    return False


def _read_zarr(path: Path, lazy: bool) -> ImageData:
    """Read an OME-Zarr image (first multiscale, first level) or a plain Zarr array.

    OME-NGFF 0.4 keeps ``multiscales`` in the group attributes, 0.5 under ``"ome"``. Axis
    names (t, z, c, y, x) and types give the letters; the dataset's (and the multiscale's)
    ``scale`` transforms with the space axes' units give the pixel size.
    """
    try:
        zarr = importlib.import_module("zarr")
    except ImportError as exc:
        raise InputError(
            f"Reading {path.name} needs the optional zarr package; install it with: "
            f"{BATCH_EXTRA_COMMAND}"
        ) from exc
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InputError(f"{path.name} is not a readable Zarr store ({_reason(exc)}).") from exc
    metadata: dict[str, Any] = {"format": "zarr", "source_path": str(path)}
    if not hasattr(node, "attrs") or hasattr(node, "shape"):  # a plain array
        arr = node
        hints: list[str | None] = [None] * (arr.ndim - 2) + ["Y", "X"]
        if arr.ndim < 2:
            raise InputError(f"{path.name} holds a {arr.ndim}-D array; an image needs Y and X.")
        axes = _name_axes(hints, path)
        data = arr if lazy else np.asarray(arr[...])
        return ImageData(data, axes, None, None, metadata, str(path))
    attrs = dict(node.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        raise InputError(f"{path.name} is a Zarr group without OME-Zarr multiscales metadata.")
    ms = multiscales[0]
    try:
        dataset = ms["datasets"][0]
        arr = node[dataset["path"]]
    except Exception as exc:
        raise InputError(
            f"{path.name} has OME-Zarr metadata whose first dataset cannot be opened "
            f"({_reason(exc)})."
        ) from exc
    ax_meta = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
    if len(ax_meta) != arr.ndim:
        ax_meta = [{}] * (arr.ndim - 2) + [{"name": "y"}, {"name": "x"}]
    hints = []
    for a in ax_meta:
        name = str(a.get("name", "")).upper()
        hints.append(name if name in _AXIS_LETTERS else _NGFF_TYPES.get(str(a.get("type"))))
    axes = _name_axes(hints, path)
    scale = np.ones(arr.ndim)
    for transforms in (dataset.get("coordinateTransformations"),
                       ms.get("coordinateTransformations")):
        for t in transforms or []:
            if isinstance(t, dict) and t.get("type") == "scale" and len(t["scale"]) == arr.ndim:
                scale = scale * np.asarray(t["scale"], float)
    found = {}
    for a, meta, value in zip(axes, ax_meta, scale):
        norm = _normalise_unit(float(value), meta.get("unit"))
        if a in "ZYX" and norm is not None:
            found[a] = norm
    calibrated = _common_unit(found)
    spatial, unit = calibrated if calibrated and {"X", "Y"} <= set(calibrated[0]) else ({}, None)
    metadata.update(format="ome-zarr", ome_zarr_version=ms.get("version", ome.get("version")),
                    levels=len(ms["datasets"]), dataset=str(dataset["path"]))
    if isinstance(attrs.get("microrestore"), dict):
        metadata["microrestore"] = _json_safe(attrs["microrestore"])
    pixel_size = _assemble_pixel_size(axes, spatial, metadata)
    data = arr if lazy else np.asarray(arr[...])
    return ImageData(data, axes, pixel_size, unit if pixel_size else None, metadata, str(path))


# --------------------------------------------------------------------------- MRC


def _read_mrc(path: Path, lazy: bool) -> ImageData:
    """Read an MRC-family file; voxel size from the header (Angstrom) converted to nm."""
    import mrcfile

    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
            header = mrc.header.copy()
            voxel = mrc.voxel_size.copy()
        dtype = mrcfile.utils.data_dtype_from_header(header)
        shape = mrcfile.utils.data_shape_from_header(header)
    except Exception as exc:
        raise InputError(f"{path.name} is not a readable MRC file ({_reason(exc)}).") from exc
    if min(shape) < 1:
        raise InputError(f"{path.name} has an invalid MRC header: data shape {shape}.")
    offset = 1024 + int(header.nsymbt)
    nbytes = math.prod(shape) * dtype.itemsize
    filesize = path.stat().st_size
    if offset + nbytes > filesize:
        raise InputError(
            f"{path.name} is truncated: its header promises {_describe(shape, dtype)} "
            f"({offset + nbytes} bytes with the header) but the file has {filesize} bytes."
        )
    ispg = int(header.ispg)
    if len(shape) == 4:  # volume stack: (volumes, sections, Y, X)
        axes = "TZYX"
    elif len(shape) == 2:
        axes = "YX"
    elif shape[0] == 1:  # a single section stored as a volume
        shape, axes = shape[1:], "YX"
    else:
        axes = "TYX" if ispg == 0 or path.suffix.lower() == ".mrcs" else "ZYX"
    data: Any = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    if not lazy:
        data = np.array(data)
    # voxel_size: (x, y, z) in Angstrom, 0 when not set
    angstrom = {a: _round_sig(float(getattr(voxel, a.lower()))) for a in "XYZ"}
    spatial = {a: v * 0.1 for a, v in angstrom.items() if v > 0 and a in axes}
    metadata: dict[str, Any] = {
        "format": "mrc",
        "source_path": str(path),
        "mrc": {
            "mode": int(header.mode),
            "ispg": ispg,
            "voxel_size_angstrom": [angstrom["X"], angstrom["Y"], angstrom["Z"]],
            "nsymbt": int(header.nsymbt),
            "labels": [
                bytes(label).decode("ascii", "replace").strip()
                for label in header.label[: int(header.nlabl)]
            ],
        },
    }
    unit = "nm" if "X" in spatial and "Y" in spatial else None
    pixel_size = _assemble_pixel_size(axes, spatial if unit else {}, metadata)
    return ImageData(data, axes, pixel_size, unit, metadata, str(path))


# --------------------------------------------------------------------------- RosettaSciIO


def _read_rsciio(path: Path, lazy: bool) -> ImageData:
    """Read DM3/DM4, SER/EMI or EMD through RosettaSciIO (the optional ``[em]`` extra)."""
    module_name, fmt = _RSCIIO_FORMATS[path.suffix.lower()]
    try:
        module = importlib.import_module(f"rsciio.{module_name}")
    except ImportError as exc:
        missing = f" (missing module {exc.name!r})" if exc.name else ""
        raise InputError(
            f"Reading {path.suffix} files needs the optional [em] extra (RosettaSciIO)"
            f"{missing}; install it with: {EM_EXTRA_COMMAND}"
        ) from exc
    try:
        signals = module.file_reader(str(path), lazy=lazy)
    except Exception as exc:
        raise InputError(
            f"{path.name} could not be read as a {fmt} file ({_reason(exc)}); "
            "it may be truncated or corrupt."
        ) from exc
    images = [s for s in signals if sum(not ax.get("navigate", False) for ax in s["axes"]) == 2]
    if not images:
        raise InputError(f"{path.name} contains no 2D image (only spectra or other signals).")
    signal = images[0]
    data, axes_info = signal["data"], signal["axes"]
    if getattr(data.dtype, "names", None):
        raise InputError(f"{path.name} holds an RGB(A) image ({data.dtype}); not supported.")
    if len(axes_info) != data.ndim or any(ax.get("navigate", False) for ax in axes_info[-2:]):
        names = [ax.get("name") for ax in axes_info]
        raise InputError(
            f"{path.name} has axes {names} for data of shape {data.shape}; expected the two "
            "image axes last."
        )
    hints = [_nav_axis_hint(ax) for ax in axes_info[:-2]] + ["Y", "X"]
    axes = _name_axes(hints, path)
    found = {}
    for a, ax in zip(axes, axes_info):
        norm = _normalise_unit(_as_float(ax.get("scale")), ax.get("units"))
        if a in "ZYX" and norm is not None:
            found[a] = norm
    calibrated = _common_unit(found)
    spatial, unit = calibrated if calibrated and {"X", "Y"} <= set(calibrated[0]) else ({}, None)
    metadata: dict[str, Any] = {
        "format": "dm" if module_name == "digitalmicrograph" else module_name,
        "source_path": str(path),
        "signal_titles": [
            s.get("metadata", {}).get("General", {}).get("title", "") for s in signals
        ],
        "axes_info": _json_safe(axes_info),
        "rsciio_metadata": _json_safe(signal.get("metadata", {})),
    }
    pixel_size = _assemble_pixel_size(axes, spatial, metadata)
    return ImageData(data, axes, pixel_size, unit if pixel_size else None, metadata, str(path))


def _nav_axis_hint(axis: Mapping[str, Any]) -> str | None:
    """T, Z or C for a RosettaSciIO navigation axis whose name or unit says so, else None."""
    name = str(axis.get("name") or "").strip().lower()
    units = str(axis.get("units") or "").strip().lower()
    if name in ("t", "time", "frame", "frames") or units in ("s", "ms", "us", "µs", "min"):
        return "T"
    if name in ("z", "depth", "slice", "section"):
        return "Z"
    if name in ("c", "channel", "channels"):
        return "C"
    return None


# --------------------------------------------------------------------------- shared helpers


def _name_axes(hints: Sequence[str | None], path: Path) -> str:
    """Axis letters from per-axis hints (a letter of "TZCYX", or None where unknown).

    Unknown axes get the free letters among Z, then T, then C, placed in the order T, Z, C.
    """
    known = [h for h in hints if h is not None]
    n_unknown = len(hints) - len(known)
    free = [a for a in "ZTC" if a not in known]
    if len(set(known)) != len(known) or not {"Y", "X"} <= set(known) or n_unknown > len(free):
        raise InputError(
            f"{path.name} has axes {''.join(h or '?' for h in hints)}, which cannot be mapped "
            "to at most one each of T, Z, C, Y, X."
        )
    fill = iter(sorted(free[:n_unknown], key="TZC".index))
    axes = "".join(h if h is not None else next(fill) for h in hints)
    if not (axes.endswith("YX") or axes.endswith("YXC")):
        raise InputError(f"{path.name} does not store its images as Y, X planes (axes {axes}).")
    return axes


def _assemble_pixel_size(
    axes: str, spatial: Mapping[str, float], metadata: dict[str, Any]
) -> tuple[float, ...] | None:
    """Per-axis pixel size from spatial sizes (1.0 for T and C; Z assumed = X if unknown)."""
    if "X" not in spatial or "Y" not in spatial:
        return None
    sizes = dict(spatial)
    if "Z" in axes and "Z" not in sizes:
        sizes["Z"] = sizes["X"]
        metadata["z_spacing_assumed"] = True
    return tuple(_round_sig(float(sizes.get(a, 1.0))) for a in axes)


def _normalise_unit(value: float, unit: Any) -> tuple[float, str] | None:
    """``(value, unit)`` in nm / um (or 1/nm, 1/um); ``None`` for unknown units or bad values.

    ``value`` is a size in ``unit``; the returned value is the same size in the returned unit.
    With ``value=1.0`` the returned value is the conversion factor.
    """
    if not isinstance(unit, str) or not math.isfinite(value) or value <= 0:
        return None
    text = unit.strip().lower()  # also maps the Angstrom sign U+212B to "å"
    reciprocal = False
    if text.startswith("1/"):
        text, reciprocal = text[2:].strip(), True
    elif text.endswith("^-1"):
        text, reciprocal = text[:-3].strip(), True
    if text not in _LENGTH_UNITS:
        return None
    name, factor = _LENGTH_UNITS[text]
    if reciprocal:
        return value / factor, "1/" + name
    return value * factor, name


def _common_unit(
    found: Mapping[str, tuple[float, str]],
) -> tuple[dict[str, float], str] | None:
    """Express normalised (value, unit) pairs in one unit (that of X, else the first)."""
    if not found:
        return None
    unit = found["X"][1] if "X" in found else next(iter(found.values()))[1]
    to_nm = {"nm": 1.0, "um": 1e3, "1/nm": 1.0, "1/um": 1e-3}
    sizes = {}
    for axis, (value, u) in found.items():
        if u.startswith("1/") != unit.startswith("1/"):
            return None
        sizes[axis] = value * to_nm[u] / to_nm[unit]
    return sizes, unit


def _spatial_pixel_size(
    pixel_size: float | Sequence[float] | None, unit: str | None, axes: str
) -> tuple[dict[str, float], str | None]:
    """Validate write_tiff's pixel_size and unit; return {"Y", "X"[, "Z"]: size} and the unit.

    The sizes are in the normalised unit ("nm", "um", ...); Z is only present when the
    caller gave one value per axis.
    """
    if pixel_size is None:
        return {}, None
    if unit is None:
        raise InputError("pixel_size was given without a unit; pass unit='nm' (or 'um', ...).")
    norm = _normalise_unit(1.0, unit)
    if norm is None:
        raise InputError(f"Unknown length unit {unit!r}; use 'nm', 'um' or 'A'.")
    factor, norm_unit = norm  # the size of 1 `unit` in `norm_unit`
    if np.ndim(pixel_size) == 0:
        values = [_as_float(pixel_size)] * 2
    else:
        values = [_as_float(v) for v in pixel_size]  # type: ignore[union-attr]
    if len(values) == 2:
        named = dict(zip("YX", values))
    elif len(values) == len(axes):
        named = {a: v for a, v in zip(axes, values) if a in "ZYX"}
    else:
        raise InputError(
            f"pixel_size has {len(values)} values but axes {axes!r} need 1, 2 (Y, X) "
            f"or {len(axes)}."
        )
    if not all(math.isfinite(v) and v > 0 for v in named.values()):
        raise InputError(f"pixel_size values must be finite and positive, got {values}.")
    return {a: _round_sig(v * factor) for a, v in named.items()}, norm_unit


def _default_write_axes(ndim: int) -> str:
    return {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}.get(ndim, "?" * ndim)


def _check_write_axes(axes: str, arr: np.ndarray) -> str:
    axes = axes.upper()
    valid = (
        len(axes) == arr.ndim
        and set(axes) <= set(_AXIS_LETTERS)
        and len(set(axes)) == len(axes)
        and (axes.endswith("YX") or axes.endswith("YXC"))
    )
    if not valid:
        raise InputError(
            f"axes {axes!r} do not fit data of shape {arr.shape}: expected one distinct letter "
            "per axis from T, Z, C, Y, X ending in YX (or YXC for RGB)."
        )
    if axes.endswith("C") and arr.shape[-1] not in (3, 4):
        raise InputError(
            f"A trailing C axis is only for RGB(A) images with 3 or 4 channels, got "
            f"{arr.shape[-1]}; put the channel axis first (axes '...CYX')."
        )
    return axes


def _is_subsequence(letters: str, order: str) -> bool:
    positions = [order.find(a) for a in letters]
    return -1 not in positions and positions == sorted(positions)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Run ``write`` on a new temporary file beside ``path``, then rename it over ``path``."""
    if not path.parent.is_dir():
        raise InputError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    fh = open(tmp, "xb")  # exclusive create; permissions follow the umask like a plain open
    try:
        with fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file beside it, then rename)."""
    return _atomic_write(Path(path), lambda fh: fh.write(data))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _to_json(obj: Any, what: str, indent: int | None = None) -> str:
    try:
        return json.dumps(obj, indent=indent, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} cannot be written as JSON: {exc}.") from exc


def _json_safe(obj: Any) -> Any:
    """Nested dicts/lists with numpy values converted; other non-JSON leaves become strings."""
    return json.loads(json.dumps(obj, default=_json_default_or_str))


def _json_default_or_str(obj: Any) -> Any:
    try:
        return _json_default(obj)
    except TypeError:
        return str(obj)


def _round_sig(value: float, digits: int = 7) -> float:
    """``value`` rounded to ``digits`` significant digits.

    Calibrations are often stored as float32 (MRC, DM) and converted between units, which
    leaves noise (4.6 Angstrom as float32, times 0.1, is 0.4599999904632568 nm); 7 digits,
    float32's precision, turn that back into 0.46.
    """
    return float(f"{value:.{digits}g}")


def _as_float(value: Any) -> float:
    """``float(value)``, or NaN when it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _describe(shape: Sequence[int], dtype: Any) -> str:
    return f"{'x'.join(str(int(n)) for n in shape)} {np.dtype(dtype)}"


def _reason(exc: BaseException) -> str:
    """First line of an exception message (or its type), shortened for one-line errors."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
