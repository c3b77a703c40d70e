"""Overlapping tiles with seamless blending, for images larger than a device can hold.

A tile is read with a *halo* of context on every side that touches another tile. Its result
is trusted only beyond that halo (where a convolution net whose receptive radius is at most
the halo sees exactly what it would see in the whole image) and is cross-faded with its
neighbours over a *blend* band. So, for such a net, the tiled result equals the whole-image
result up to float rounding, and for any other function (a GAN, a net with InstanceNorm) the
seams are feathered instead of cut.

Along each axis, tiles of ``tile`` pixels start every ``tile - 2 * halo - blend`` pixels; the
last tile is moved back to end at the image edge, so every tile has the same shape (one
compiled graph, one cuDNN plan). With ``multiple=m`` tile sizes and starts are multiples of m
and the image is reflect-padded to a multiple of m, which nets with m-fold down-sampling need
to be translation-equivariant.

The building blocks are :func:`plan_tiles` (where the tiles are) and :class:`TileBlender`
(accumulates weighted tile results); :func:`apply_tiled` combines them for a function applied
tile by tile. A caller that batches tiles for a GPU uses the blocks directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import CancelToken, InputError, ProgressCallback, check_cancel, report


@dataclass(frozen=True)
class Tile:
    """One tile: where it reads from the (padded) image and how its result is weighted."""

    y: slice  # rows of the input tile, halo included
    x: slice  # columns of the input tile, halo included
    # which sides border another tile (and so carry a halo + blend ramp): top, bottom, left, right
    inner: tuple[bool, bool, bool, bool]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y.stop - self.y.start, self.x.stop - self.x.start)


def _starts(n: int, size: int, stride: int) -> list[int]:
    if size >= n:
        return [0]
    starts = list(range(0, n - size, stride))
    starts.append(n - size)
    return sorted(set(starts))


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def plan_tiles(shape: Sequence[int], tile: int | Sequence[int], *, halo: int = 16,
               blend: int = 16, multiple: int = 1) -> list[Tile]:
    """Tiles covering a 2-D ``shape`` (already padded to ``multiple``), row-major order.

    ``tile`` is the largest tile size (an int or ``(ty, tx)``), clipped to the image; it must
    exceed ``2 * halo + blend`` (rounded up to ``multiple``) so that tiles advance. Along each
    axis the tiles are as many as that size needs, and shrunk to share the image evenly (a
    1456 px side in 1024 px tiles with 136 px of overlap: two 800 px tiles, not two of 1024
    that overlap by 592).
    """
    if len(shape) != 2:
        raise InputError(f"plan_tiles needs a 2-D shape (Y, X); got {tuple(shape)}")
    if halo < 0 or blend < 1 or multiple < 1:
        raise InputError(
            f"halo must be >= 0, blend >= 1 and multiple >= 1; got {halo}, {blend}, {multiple}"
        )
    ty, tx = (tile, tile) if np.isscalar(tile) else tuple(int(t) for t in tile)
    overlap = _round_up(2 * halo + blend, multiple)
    starts, sizes = [], []
    for n, t in zip(shape, (ty, tx)):
        if n % multiple:
            raise InputError(f"image size {tuple(shape)} is not a multiple of {multiple}")
        t = min(_round_up(int(t), multiple), int(n))
        if t < n and t <= overlap:
            raise InputError(
                f"tile size {t} must be larger than 2 * halo + blend = {overlap} px "
                f"(halo {halo}, blend {blend})"
            )
        if t < n:  # as many tiles as size t needs, shrunk to share the axis evenly
            k = -(-(int(n) - overlap) // (t - overlap))
            t = min(t, _round_up(-(-(int(n) - overlap) // k) + overlap, multiple))
        stride = t - overlap if t < n else t
        starts.append(_starts(int(n), t, stride))
        sizes.append(t)
    tiles = []
    for y0 in starts[0]:
        for x0 in starts[1]:
            tiles.append(Tile(
                y=slice(y0, y0 + sizes[0]), x=slice(x0, x0 + sizes[1]),
                inner=(y0 > 0, y0 + sizes[0] < shape[0], x0 > 0, x0 + sizes[1] < shape[1]),
            ))
    return tiles


def _ramp_1d(n: int, inner_lo: bool, inner_hi: bool, halo: int, blend: int) -> np.ndarray:
    """Weights along one axis: 0 in a halo that borders a tile, a linear ramp over ``blend``,
    then 1; sides at the image edge are 1 up to the edge."""
    w = np.ones(n, np.float32)
    ramp = (np.arange(blend, dtype=np.float32) + 0.5) / blend  # strictly positive
    if inner_lo:
        w[:halo] = 0
        w[halo:halo + blend] *= ramp
    if inner_hi:
        w[n - halo:] = 0
        w[n - halo - blend:n - halo] *= ramp[::-1]
    return w


def tile_weights(tile: Tile, *, halo: int, blend: int, scale: int = 1) -> np.ndarray:
    """(ty * scale, tx * scale) float32 blending weights of one tile's result."""
    ty, tx = tile.shape
    t, b, l, r = tile.inner
    wy = _ramp_1d(ty * scale, t, b, halo * scale, blend * scale)
    wx = _ramp_1d(tx * scale, l, r, halo * scale, blend * scale)
    return wy[:, None] * wx[None, :]


class TileBlender:
    """Accumulates weighted tile results into one output image.

    ``out_shape`` is the full output shape ``(..., Y * scale, X * scale)``; ``add(tile, result)``
    takes a result of shape ``(..., ty * scale, tx * scale)``; ``result()`` returns the blended
    float32 image.
    """

    def __init__(self, out_shape: Sequence[int], *, halo: int, blend: int, scale: int = 1):
        self.halo, self.blend, self.scale = halo, blend, scale
        self._acc = np.zeros(tuple(out_shape), np.float32)
        self._wsum = np.zeros(tuple(out_shape[-2:]), np.float32)

    def add(self, tile: Tile, result: np.ndarray) -> None:
        s = self.scale
        ys = slice(tile.y.start * s, tile.y.stop * s)
        xs = slice(tile.x.start * s, tile.x.stop * s)
        expected = self._acc.shape[:-2] + (ys.stop - ys.start, xs.stop - xs.start)
        if result.shape != expected:
            raise InputError(
                f"tile result has shape {result.shape}; expected {expected} "
                f"(scale {s})"
            )
        w = tile_weights(tile, halo=self.halo, blend=self.blend, scale=s)
        self._acc[..., ys, xs] += result * w
        self._wsum[ys, xs] += w

    def result(self) -> np.ndarray:
        if (self._wsum <= 0).any():
            raise RuntimeError("some output pixels were not covered by any tile")
        return self._acc / self._wsum


def apply_tiled(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *,
                tile: int | Sequence[int] = 512, halo: int = 16, blend: int = 16,
                multiple: int = 1, scale: int = 1,
                progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> np.ndarray:
    """Apply ``fn`` to ``image`` tile by tile and blend the results seamlessly.

    Parameters
    ----------
    fn
        Maps an array of shape ``(..., ty, tx)`` (the leading axes of ``image``, e.g. the frames
        of a burst) to ``(..., ty * scale, tx * scale)``; its leading axes may differ from the
        input's (a burst in, one image out) but must be the same for every tile.
    image
        ``(..., Y, X)`` array.
    tile, halo, blend
        Tile size, context border discarded from each tile where it meets another (at least
        the receptive radius of a convolution net, for exact results), and the width of the
        cross-fade band, in input pixels.
    multiple
        Tile sizes, starts and the padded image size are multiples of this (the total
        down-sampling factor of a UNet); the image is reflect-padded and the result cropped.
    scale
        Output pixels per input pixel (2 for 2x super-resolution).
    progress, cancel
        Called / checked once per tile.
    """
    image = np.asarray(image)
    if image.ndim < 2:
        raise InputError(f"apply_tiled needs an image of at least 2 dimensions; got {image.shape}")
    h, w = image.shape[-2:]
    ph, pw = _round_up(h, multiple) - h, _round_up(w, multiple) - w
    if ph or pw:
        pad = [(0, 0)] * (image.ndim - 2) + [(0, ph), (0, pw)]
        image = np.pad(image, pad, mode="reflect" if min(h, w) > max(ph, pw) else "edge")
    tiles = plan_tiles(image.shape[-2:], tile, halo=halo, blend=blend, multiple=multiple)
    blender: Optional[TileBlender] = None
    for i, t in enumerate(tiles):
        check_cancel(cancel)
        out = np.asarray(fn(image[..., t.y, t.x]), dtype=np.float32)
        if blender is None:
            full = out.shape[:-2] + (image.shape[-2] * scale, image.shape[-1] * scale)
            blender = TileBlender(full, halo=halo, blend=blend, scale=scale)
        blender.add(t, out)
        report(progress, (i + 1) / len(tiles), f"tile {i + 1}/{len(tiles)}")
    assert blender is not None
    return blender.result()[..., : h * scale, : w * scale]
