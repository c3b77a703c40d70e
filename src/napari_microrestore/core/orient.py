"""Turning a burst so that its stage motion runs along the columns, and back.

The zoo's burst nets learned stage motion along the columns (``card.motion_axis ==
"vertical"``, within ~10 degrees). A burst whose stage moved along ``angle`` (degrees from +x
towards +y, ``blur_angle``'s convention) is rotated by ``net_rotation(angle) = angle - 90``
(wrapped into [-90, 90)) about its centre onto a canvas large enough to hold all of it,
restored there, and rotated back onto the input's grid.

A rotation by a multiple of 90 degrees is done exactly (``rot90``); the rest, at most 45
degrees, is interpolated once each way (bicubic, with mirrored content outside the frame so
that the net sees no edge). Rotating by ``phi`` degrees maps a direction ``a`` to
``a - phi`` (it turns the content counter-clockwise on screen, rows pointing down, as
``np.rot90`` and OpenCV's ``getRotationMatrix2D`` do).

Works on numpy arrays and torch tensors (any device; the same code), of shape ``(..., Y, X)``.
:class:`Rotation` precomputes the sampling grids for one frame shape and angle, so that a
stream can reuse them (and a CUDA graph capture them).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .errors import InputError

# residual angles below this (degrees) are not interpolated: they move no pixel by more than
# ~1e-4 px on a 4096 px frame
_EXACT = 1e-6


# a motion within this many degrees of a quarter turn is only quarter-turned (exact, no
# interpolation, no larger canvas): the zoo's nets learned per-frame directions within 10
# degrees of the columns, and the direction read from a burst is itself uncertain by ~1 degree
TOLERANCE_DEG = 2.0


def net_rotation(angle: Optional[float], tolerance: float = TOLERANCE_DEG) -> float:
    """Degrees to rotate a burst whose stage moved along ``angle`` so that it moves along the
    columns (90 degrees), in [-90, 90); 0 when the direction is unknown. Within
    ``tolerance`` degrees of a quarter turn, the quarter turn."""
    if angle is None:
        return 0.0
    phi = float(angle) % 180.0 - 90.0
    k, r = _split(phi)
    if abs(r) < max(tolerance, _EXACT):
        phi = (90.0 * k + 90.0) % 180.0 - 90.0
    return phi


def _split(phi: float) -> tuple[int, float]:
    """``phi`` as quarter turns ``k`` (done exactly) plus a residual in [-45, 45] degrees."""
    k = int(round(phi / 90.0))
    r = phi - 90.0 * k
    return k, (0.0 if abs(r) < _EXACT else r)


def rotated_shape(shape: tuple, phi: float) -> tuple[int, int]:
    """``(Y, X)`` of the canvas that holds a ``shape`` frame rotated by ``phi`` degrees."""
    h, w = (int(v) for v in tuple(shape)[-2:])
    k, r = _split(phi)
    if k % 2:
        h, w = w, h
    if r == 0.0:
        return h, w
    c, s = abs(math.cos(math.radians(r))), abs(math.sin(math.radians(r)))
    # a hair of slack for rounding; the canvas keeps the frame's parity, so that the centres
    # differ by whole pixels and a small rotation samples near pixel centres
    hh = math.ceil(h * c + w * s - 1e-6)
    ww = math.ceil(h * s + w * c - 1e-6)
    return hh + (hh - h) % 2, ww + (ww - w) % 2


class Rotation:
    """The rotation of ``(Y, X)`` frames of ``shape`` by ``phi`` degrees (see the module doc).

    Parameters
    ----------
    shape
        ``(Y, X)`` of the frames in the user's orientation.
    phi
        Degrees, as :func:`net_rotation` gives them.
    device
        Torch device for the sampling grids (only used with torch tensors; numpy input runs on
        the CPU).
    canvas
        ``(H, W)`` of the rotated frame, if not the whole turned frame
        (:func:`rotated_shape`): e.g. the frame's own (quarter-turned) shape, to turn a crop
        back in place (what falls outside is lost, what the crop lacks is filled).
    """

    def __init__(self, shape: tuple, phi: float, device: Any = "cpu",
                 canvas: Optional[tuple] = None) -> None:
        h, w = (int(v) for v in tuple(shape)[-2:])
        if h < 1 or w < 1:
            raise InputError(f"cannot rotate frames of shape {tuple(shape)}")
        if not math.isfinite(float(phi)):
            raise InputError(f"the rotation must be a finite number of degrees; got {phi!r}")
        self.shape = (h, w)
        self.phi = float(phi)
        self.k, self.r = _split(self.phi)
        self.turned = (w, h) if self.k % 2 else (h, w)   # after the quarter turns
        self.canvas = (rotated_shape(self.shape, self.phi) if canvas is None
                       else tuple(int(v) for v in canvas))
        if self.r == 0.0 and self.canvas != self.turned:
            raise InputError(f"a rotation by {self.phi:g} degrees of {h}x{w} px frames gives "
                             f"{self.turned[0]}x{self.turned[1]} px; got canvas {self.canvas}")
        self.device = device
        self._grids: dict = {}

    @property
    def identity(self) -> bool:
        return self.k % 4 == 0 and self.r == 0.0

    # ------------------------------------------------------------------ grids
    def _grid(self, which: str, device: Any, dtype: Any) -> Any:
        """Sampling grid (1, H, W, 2) in grid_sample's normalised coordinates
        (align_corners=False): ``forward`` samples the quarter-turned frame for every canvas
        pixel, ``inverse`` samples the canvas for every pixel of the quarter-turned frame."""
        import torch

        key = (which, str(device), dtype)
        if key in self._grids:
            return self._grids[key]
        if which == "forward":
            (oh, ow), (ih, iw), ang = self.canvas, self.turned, self.r
        else:
            (oh, ow), (ih, iw), ang = self.turned, self.canvas, -self.r
        # output pixel (x', y') relative to the output centre -> input pixel: the inverse of a
        # rotation by ``ang`` (x' = c x + s y, y' = -s x + c y, about the centres)
        c, s = math.cos(math.radians(ang)), math.sin(math.radians(ang))
        ys = torch.arange(oh, dtype=torch.float64) - (oh - 1) / 2.0
        xs = torch.arange(ow, dtype=torch.float64) - (ow - 1) / 2.0
        v, u = torch.meshgrid(ys, xs, indexing="ij")
        x_in = c * u - s * v + (iw - 1) / 2.0
        y_in = s * u + c * v + (ih - 1) / 2.0
        grid = torch.stack([(2 * x_in + 1) / iw - 1, (2 * y_in + 1) / ih - 1], -1)
        grid = grid[None].to(device=device, dtype=dtype)
        self._grids[key] = grid
        return grid

    def _sample(self, t: Any, which: str, mode: str, padding: str) -> Any:
        import torch
        import torch.nn.functional as F

        lead = t.shape[:-2]
        flat = t.reshape((-1, 1) + tuple(t.shape[-2:]))
        dtype = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float32
        flat = flat.to(dtype)
        grid = self._grid(which, flat.device, dtype).expand(flat.shape[0], -1, -1, -1)
        out = F.grid_sample(flat, grid, mode=mode, padding_mode=padding, align_corners=False)
        return out.reshape(tuple(lead) + tuple(out.shape[-2:]))

    # ------------------------------------------------------------------ API
    def forward(self, x: Any, *, mode: str = "bicubic", fill: str = "reflection") -> Any:
        """``x`` (..., Y, X) of ``shape`` turned onto the canvas (..., H, W), a new array
        (``x`` itself for the identity). ``fill``: ``"reflection"`` (mirrored content around
        the frame) or ``"zeros"``."""
        return self._apply(x, "forward", mode, fill)

    def inverse(self, y: Any, *, mode: str = "bicubic", fill: str = "reflection") -> Any:
        """A canvas (..., H, W) turned back onto the input's grid (..., Y, X)."""
        return self._apply(y, "inverse", mode, fill)

    def valid(self, mask: Optional[Any] = None) -> Any:
        """Boolean mask of the canvas pixels that come from inside the frame (and from inside
        ``mask``, a (Y, X) bool array, if given): nearest sampling of the turned mask."""
        base = np.ones(self.shape, bool) if mask is None else np.asarray(mask, bool)
        if base.shape != self.shape:
            raise InputError(f"the mask must have the frames' shape {self.shape}; got "
                             f"{base.shape}")
        out = self.forward(base.astype(np.float32), mode="bilinear", fill="zeros")
        return out > 0.999

    def _apply(self, x: Any, which: str, mode: str, fill: str) -> Any:
        is_numpy = isinstance(x, np.ndarray)
        expect = self.shape if which == "forward" else self.canvas
        if tuple(x.shape[-2:]) != tuple(expect):
            raise InputError(f"expected frames of {expect[0]}x{expect[1]} px to rotate; got "
                             f"{tuple(x.shape)}")
        if self.identity:  # nothing to do: ``x`` itself, not a copy
            return x
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else x
        out_dtype = t.dtype
        if which == "forward":
            if self.k % 4:
                t = torch.rot90(t, self.k, dims=(-2, -1))
            if self.r != 0.0:
                t = self._sample(t, "forward", mode, fill)
        else:
            if self.r != 0.0:
                t = self._sample(t, "inverse", mode, fill)
            if self.k % 4:
                t = torch.rot90(t, -self.k, dims=(-2, -1))
        t = t.to(out_dtype).contiguous()
        return t.numpy() if is_numpy else t

    def point(self, y: float, x: float, *, inverse: bool = False) -> tuple[float, float]:
        """Where pixel ``(y, x)`` of the frame lands on the canvas (or, ``inverse``, where a
        canvas pixel comes from in the frame)."""
        ang = math.radians(-self.phi if inverse else self.phi)
        (ih, iw), (oh, ow) = (self.canvas, self.shape) if inverse else (self.shape, self.canvas)
        u, v = x - (iw - 1) / 2.0, y - (ih - 1) / 2.0
        c, s = math.cos(ang), math.sin(ang)
        return -s * u + c * v + (oh - 1) / 2.0, c * u + s * v + (ow - 1) / 2.0
