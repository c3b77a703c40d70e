"""Pure geometry for the widgets: burst windows along a stream, pixel boxes of regions, and a
lazy (T, Y, X) view of an N-D stream. No Qt, no napari, no torch: unit-tested on its own.

Conventions: data pixel ``i`` is centred on the integer ``i`` and covers ``[i - 0.5, i + 0.5)``
(napari's convention); boxes are half-open ``[y0, y1) x [x0, x1)`` in data pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from ..core.errors import InputError


# --------------------------------------------------------------------------------------------
# burst windows
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BurstWindow:
    """``size`` consecutive frames of a stream of ``n_frames`` frames around ``centre``.

    The window is centred on ``centre`` where it can be and shifted to stay inside
    ``[0, n_frames)`` at the stream's ends (as the engine selects a burst's frames), so the
    centre frame, which is also the registration reference, can sit off-centre there.
    ``axis`` is the frame axis of the layer that holds the stream.
    """

    n_frames: int
    centre: int
    size: int
    axis: int = 0

    def __post_init__(self) -> None:
        if self.n_frames < 1:
            raise InputError(f"a stream needs at least one frame; got {self.n_frames}")
        if not 0 <= self.centre < self.n_frames:
            raise InputError(f"centre frame {self.centre} is outside the stream's "
                             f"0..{self.n_frames - 1}")
        if self.size < 1:
            raise InputError(f"a burst window needs at least one frame; got {self.size}")

    @property
    def start(self) -> int:
        """The first frame of the window."""
        return min(max(0, self.centre - self.size // 2), max(0, self.n_frames - self.size))

    @property
    def stop(self) -> int:
        """One past the last frame of the window."""
        return min(self.start + self.size, self.n_frames)

    @property
    def frames(self) -> list[int]:
        return list(range(self.start, self.stop))

    @property
    def local_reference(self) -> int:
        """The centre frame's position inside the window."""
        return self.centre - self.start

    def describe(self) -> str:
        """``"frames 12-16 (centre 14)"``."""
        return f"frames {self.start}-{self.stop - 1} (centre {self.centre})"

    def moved_to(self, centre: int) -> BurstWindow:
        """The same window around another centre (clipped to the stream)."""
        return replace(self, centre=min(max(int(centre), 0), self.n_frames - 1))

    def to_dict(self) -> dict[str, int]:
        return {"n_frames": self.n_frames, "centre": self.centre, "size": self.size,
                "axis": self.axis}

    @classmethod
    def from_dict(cls, value: Any) -> Optional[BurstWindow]:
        """The window stored by :meth:`to_dict`, or ``None`` when ``value`` is not one (an
        older or hand-edited metadata entry is ignored rather than trusted)."""
        if not isinstance(value, Mapping):
            return None
        try:
            return cls(**{k: int(value[k]) for k in ("n_frames", "centre", "size", "axis")})
        except (KeyError, TypeError, ValueError):
            return None


def nearest_index(position: float, n: int) -> int:
    """The index in ``[0, n)`` nearest a (fractional) data coordinate."""
    return min(max(int(math.floor(float(position) + 0.5)), 0), n - 1)


# --------------------------------------------------------------------------------------------
# boxes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """A half-open pixel box ``[y0, y1) x [x0, x1)``."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def start(self) -> tuple[int, int]:
        return self.y0, self.x0

    def expanded(self, margin: int, shape: Sequence[int]) -> Box:
        """This box grown by ``margin`` pixels on every side, clipped to an image of
        ``shape`` (Y, X)."""
        return Box(max(self.y0 - margin, 0), min(self.y1 + margin, int(shape[0])),
                   max(self.x0 - margin, 0), min(self.x1 + margin, int(shape[1])))

    def within(self, outer: Box, zoom: int = 1) -> tuple[slice, slice]:
        """Slices that cut this box out of an array covering ``outer`` (which contains it),
        with ``zoom`` output pixels per pixel (2 for a 2x super-resolved crop)."""
        return (slice((self.y0 - outer.y0) * zoom, (self.y1 - outer.y0) * zoom),
                slice((self.x0 - outer.x0) * zoom, (self.x1 - outer.x0) * zoom))

    def to_list(self) -> list[int]:
        return [self.y0, self.y1, self.x0, self.x1]


def pixel_box(points: Any, shape: Sequence[int]) -> Box:
    """The pixels of an image of ``shape`` (Y, X) that the bounding box of ``points`` ((N, 2)
    data coordinates, Y and X) touches.

    Raises :class:`InputError` when the region lies outside the image.
    """
    pts = np.asarray(points, float).reshape(-1, 2)
    if pts.size == 0 or not np.isfinite(pts).all():
        raise InputError("the region has no finite corner points")
    lo = np.floor(pts.min(0) + 0.5).astype(int)
    hi = np.ceil(pts.max(0) + 0.5).astype(int)
    hi = np.maximum(hi, lo + 1)            # a degenerate (point / line) region: one pixel
    y0, x0 = np.maximum(lo, 0)
    y1, x1 = np.minimum(hi, [int(shape[0]), int(shape[1])])
    if y1 <= y0 or x1 <= x0:
        raise InputError(f"the region (data pixels {lo.tolist()} to {(hi - 1).tolist()}) "
                         f"does not overlap the image of shape {tuple(shape)}")
    return Box(int(y0), int(y1), int(x0), int(x1))


def view_corners(center: Sequence[float], zoom: float, canvas_size: Sequence[int]) -> np.ndarray:
    """The four world corners (Y, X) of a 2-D view: the camera's ``center`` (its last two
    entries are the displayed Y and X), ``zoom`` (screen pixels per world unit) and the
    canvas' ``canvas_size`` (height, width in screen pixels)."""
    if not zoom > 0:
        raise InputError(f"the camera zoom must be positive; got {zoom}")
    cy, cx = (float(c) for c in list(center)[-2:])
    hy, hx = (0.5 * float(n) / float(zoom) for n in canvas_size)
    return np.array([[cy - hy, cx - hx], [cy - hy, cx + hx],
                     [cy + hy, cx - hx], [cy + hy, cx + hx]])


# --------------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------------
class FrameStack:
    """A read-only (T, Y, X) view of N-D ``data`` (N >= 3): frames along ``axis`` (one of the
    leading, non-spatial axes), every other leading axis held at its index in ``fixed`` (one
    entry per leading axis; the entry at ``axis`` is ignored).

    Indexing reads only what it selects from ``data`` (a numpy array, memmap, dask array or
    :class:`~napari_microrestore.core.io.LazyStack`), so a view of a large stream costs nothing
    until the engine reads frames from it; ``numpy.asarray`` reads every frame.
    """

    def __init__(self, data: Any, axis: int, fixed: Sequence[int]) -> None:
        ndim = len(data.shape)
        if ndim < 3:
            raise InputError(f"a stream must have at least 3 dimensions; got shape "
                             f"{tuple(data.shape)}")
        if not 0 <= axis < ndim - 2:
            raise InputError(f"frame axis {axis} is not one of the stream's leading axes "
                             f"0..{ndim - 3}")
        if len(fixed) != ndim - 2:
            raise InputError(f"a {ndim}-D stream needs {ndim - 2} fixed indices; got "
                             f"{len(fixed)}")
        self._data = data
        self._axis = int(axis)
        self._fixed = tuple(int(i) for i in fixed)
        self.shape = (int(data.shape[axis]),) + tuple(int(n) for n in data.shape[-2:])
        self.dtype = np.dtype(data.dtype)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> Any:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (3 - len(key) + 1) + key[at + 1:]
        if len(key) > 3:
            raise IndexError(f"too many indices for a (T, Y, X) stream: {len(key)}")
        frames, rest = (key[0] if key else slice(None)), key[1:]
        lead = tuple(frames if a == self._axis else self._fixed[a]
                     for a in range(len(self._fixed)))
        # the leading indices are adjacent, so numpy puts the frame axis first
        return self._data[lead + rest]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


def stream_view(data: Any, axis: int = 0, fixed: Optional[Sequence[int]] = None) -> Any:
    """``data`` as (T, Y, X) frames along ``axis``: ``data`` itself when it already is a
    3-D stream with frames along axis 0, else a lazy :class:`FrameStack` (no copy)."""
    if len(data.shape) == 3 and axis == 0:
        return data
    return FrameStack(data, axis, fixed if fixed is not None else [0] * (len(data.shape) - 2))
