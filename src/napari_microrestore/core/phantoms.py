"""Procedural, seeded scenes that look like real microscopy, for the sample data and tests.

No external data: every scene is drawn from a seed, so it can ship in the wheel under the
project's licence and be regenerated exactly.

* :func:`cell_volume`: bright-field TEM of stained tissue, a ``(Z, Y, X)`` stack of serial
  sections through a 3-D scene. Cells are the Voronoi cells of random 3-D seeds (their
  membranes, the bisector planes between neighbouring seeds, cut each section as thin dark
  curves, wavy through a smooth warp of the section plane), with mitochondria (3-D
  ellipsoids: dark double outer membrane, darker matrix, cristae as dark stripes across the
  long axis), vesicles (spheres: a dark ring around a lighter lumen), ribosome-like dark
  granules and a fine granular texture. Membranes and organelles are 3-D objects, so they
  change slowly from one section to the next (``z_step`` px apart); granules and texture are
  drawn per section, as in real sections thicker than a granule.
* :func:`tem_section`: one section of :func:`cell_volume`, a ``(Y, X)`` image.
* :func:`fluorescence_volume`: emitter density of a fluorescence sample, ``(Z, Y, X)``:
  curved filaments (smooth 3-D random walks) and round blobs of several sizes at random depths.
* :func:`widefield_stack`: that volume seen by a widefield microscope focused on each plane in
  turn: plane ``k`` reaches the image focused at plane ``z`` blurred by a Gaussian of sigma
  ``sqrt(focus_sigma**2 + (defocus_per_plane * (z - k))**2)`` px (the usual Gaussian
  approximation of the 3-D PSF; defocus blur grows linearly with distance from focus), and
  the in-focus image used as ground truth (each plane blurred by ``focus_sigma`` only).

Intensities: the TEM scenes are transmitted intensity in (0, 1] (background near 0.75,
membranes and stain dark); the fluorescence volume is a non-negative density with maxima
near 1. All float32. Lengths are in px.
"""

from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np
from scipy.special import expit

from .degrade import RngLike, as_int, as_rng
from .errors import InputError

_MIN_SIDE = 16


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _shape3(shape, name: str = "shape") -> tuple[int, int, int]:
    try:
        dims = tuple(int(v) for v in shape)
        ok = len(dims) == 3 and all(float(v) == int(v) for v in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok or dims[0] < 1 or min(dims[1:]) < _MIN_SIDE:
        raise InputError(f"{name} must be three integers (Z, Y, X) with Z >= 1 and Y, X >= "
                         f"{_MIN_SIDE}; got {shape!r}")
    return dims


def _positive(value, name: str) -> float:
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise InputError(f"{name} must be a positive number; got {value!r}")
    return v


def _smooth_noise(gen: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of ``sigma`` px, scaled to unit std (float32)."""
    n = gen.standard_normal(shape).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return n / max(float(n.std()), 1e-12)


def _window(cy: float, cx: float, reach: float, ny: int, nx: int):
    """Pixel window (slices and float grids) within ``reach`` of (cy, cx), or None."""
    y0, y1 = max(0, int(cy - reach)), min(ny, int(math.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(cx - reach)), min(nx, int(math.ceil(cx + reach)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), yy, xx


# --------------------------------------------------------------------------------------------
# TEM tissue
# --------------------------------------------------------------------------------------------
def cell_volume(shape=(8, 256, 256), *, rng: RngLike = None, z_step: float = 12.0,
                cell_size: float = 150.0, membrane_width: float = 1.3,
                n_mitochondria: Optional[int] = None, n_vesicles: Optional[int] = None,
                texture: float = 0.05) -> np.ndarray:
    """Serial sections through a TEM-like tissue scene (see the module docstring).

    Parameters
    ----------
    shape
        ``(Z, Y, X)``: sections and their size in px.
    rng
        Generator or seed.
    z_step
        Section thickness in px of the section plane (e.g. 50 nm sections at 4 nm/px: 12.5).
    cell_size
        Typical cell diameter in px (the 3-D seed spacing).
    membrane_width
        Gaussian half-width of the membranes in px.
    n_mitochondria, n_vesicles
        Numbers of organelles in the volume; default 5 and 60 per 512 x 512 px of section
        area (more for thick stacks).
    texture
        Relative std of the granular texture.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` float32 transmitted intensity in (0, 1].
    """
    nz, ny, nx = _shape3(shape)
    z_step = _positive(z_step, "z_step")
    cell_size = _positive(cell_size, "cell_size")
    membrane_width = _positive(membrane_width, "membrane_width")
    if not 0 <= float(texture) < 0.5:
        raise InputError(f"texture must lie in [0, 0.5); got {texture!r}")
    gen = as_rng(rng)
    depth = (nz - 1) * z_step
    area = ny * nx / 512.0 ** 2
    # organelles live in a slab reaching 60 px beyond the first and last sections
    slab = (depth + 120.0) / 120.0
    n_mito = (max(1, round(5 * area * slab)) if n_mitochondria is None
              else as_int(n_mitochondria, "n_mitochondria", 0))
    n_ves = (max(1, round(60 * area * slab)) if n_vesicles is None
             else as_int(n_vesicles, "n_vesicles", 0))

    # cells: Voronoi cells of 3-D seeds around the stack
    pad = cell_size
    box_lo = np.array([-cell_size, -pad, -pad])
    box_hi = np.array([depth + cell_size, ny + pad, nx + pad])
    n_seeds = max(4, round(np.prod(box_hi - box_lo) / cell_size ** 3 * 1.5))
    seeds = (box_lo + gen.random((n_seeds, 3)) * (box_hi - box_lo)).astype(np.float32)
    levels = gen.uniform(0.62, 0.82, n_seeds).astype(np.float32)
    # a smooth warp of the section plane makes the membranes wavy (same for all sections)
    amp = 0.06 * cell_size
    wy = amp * _smooth_noise(gen, (ny, nx), 0.2 * cell_size)
    wx = amp * _smooth_noise(gen, (ny, nx), 0.2 * cell_size)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    py, px = yy + wy, xx + wx

    mitos = []
    for _ in range(n_mito):
        a = gen.uniform(0.5, 1.0) * 0.6 * cell_size
        b = gen.uniform(0.25, 0.4) * a + 10.0
        mitos.append(dict(cz=gen.uniform(-60.0, depth + 60.0), cy=gen.uniform(0, ny),
                          cx=gen.uniform(0, nx), a=a, b=b, c=gen.uniform(0.8, 1.5) * b,
                          theta=gen.uniform(0, math.pi), period=gen.uniform(7.0, 11.0),
                          phase=gen.uniform(0, 2 * math.pi)))
    vesicles = [dict(cz=gen.uniform(-60.0, depth + 60.0), cy=gen.uniform(0, ny),
                     cx=gen.uniform(0, nx), r=gen.uniform(4.0, 12.0)) for _ in range(n_ves)]

    out = np.empty((nz, ny, nx), np.float32)
    for k in range(nz):
        z = k * z_step
        # seeds farther than 1.6 cell sizes from the plane are (almost) never among the
        # two nearest: skipping them keeps this fast
        near = np.abs(seeds[:, 0] - z) < 1.6 * cell_size
        if near.sum() < 2:
            near[np.argsort(np.abs(seeds[:, 0] - z))[:2]] = True
        sub, sub_levels = seeds[near], levels[near]
        d1 = np.full((ny, nx), np.inf, np.float32)
        d2 = np.full((ny, nx), np.inf, np.float32)
        i1 = np.zeros((ny, nx), np.int32)
        i2 = np.zeros((ny, nx), np.int32)
        for i, (sz, sy, sx) in enumerate(sub):
            d = (py - sy) ** 2
            d += (px - sx) ** 2
            d += (z - sz) ** 2
            closer = d < d1
            second = (d < d2) & ~closer
            d2[second] = d[second]
            i2[second] = i
            d2[closer] = d1[closer]
            i2[closer] = i1[closer]
            d1[closer] = d[closer]
            i1[closer] = i
        # distance to the bisector plane of the two nearest seeds
        sep = np.linalg.norm(sub[i1] - sub[i2], axis=-1)
        dist = (d2 - d1) / (2.0 * np.maximum(sep, 1e-3))
        img = sub_levels[i1] * (1.0 - 0.5 * np.exp(-(dist / membrane_width) ** 2))
        for m in mitos:
            _draw_mitochondrion(img, z, m, membrane_width)
        for v in vesicles:
            _draw_vesicle(img, z, v, membrane_width)
        img *= _granules(gen, (ny, nx), texture)
        out[k] = img
    return np.clip(out, 0.02, 1.0)


def _draw_mitochondrion(img: np.ndarray, z: float, m: dict, width: float) -> None:
    """Multiply the cross-section at depth ``z`` of ellipsoid ``m`` into ``img``."""
    dz = (z - m["cz"]) / m["c"]
    if abs(dz) >= 1.0:
        return
    s = math.sqrt(1.0 - dz * dz)
    a, b = m["a"] * s, m["b"] * s
    if b < 3.0:
        return
    ny, nx = img.shape
    w = _window(m["cy"], m["cx"], a + 4 * width, ny, nx)
    if w is None:
        return
    sl, yy, xx = w
    ct, st = math.cos(m["theta"]), math.sin(m["theta"])
    u = (xx - m["cx"]) * ct + (yy - m["cy"]) * st        # along the long axis
    v = -(xx - m["cx"]) * st + (yy - m["cy"]) * ct
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    edge = (r - 1.0) * b                                # ~ signed distance, px (> 0 outside)
    inside = expit(-edge / 0.6)
    outer = np.exp(-(edge / width) ** 2) + np.exp(-((edge + 2.5 * width) / width) ** 2)
    cristae = np.clip(np.cos(2 * math.pi * u / m["period"] + m["phase"]
                             + 0.6 * np.sin(v / max(b, 1.0) * 2.0)) * 3.0 - 2.0, 0.0, 1.0)
    cristae *= expit(-(edge + 3.5 * width) / 0.8)   # only well inside
    factor = (1.0 - 0.22 * inside) * (1.0 - 0.45 * np.clip(outer, 0, 1)) * (1.0 - 0.35 * cristae)
    img[sl] *= factor


def _draw_vesicle(img: np.ndarray, z: float, v: dict, width: float) -> None:
    """Multiply the cross-section at depth ``z`` of spherical vesicle ``v`` into ``img``."""
    dz = z - v["cz"]
    if abs(dz) >= v["r"]:
        return
    r = math.sqrt(v["r"] ** 2 - dz * dz)
    if r < 1.5:
        return
    ny, nx = img.shape
    w = _window(v["cy"], v["cx"], r + 4 * width, ny, nx)
    if w is None:
        return
    sl, yy, xx = w
    edge = np.hypot(yy - v["cy"], xx - v["cx"]) - r
    ring = np.exp(-(edge / width) ** 2)
    lumen = expit(-edge / 0.6)
    img[sl] *= (1.0 + 0.12 * lumen) * (1.0 - 0.5 * ring)


def _granules(gen: np.random.Generator, shape: tuple[int, int], texture: float) -> np.ndarray:
    """Multiplicative granular texture with ribosome-like dark dots (one section's worth)."""
    ny, nx = shape
    tex = 1.0 + texture * (0.7 * _smooth_noise(gen, shape, 1.0)
                           + 0.7 * _smooth_noise(gen, shape, 3.0))
    dots = np.zeros(shape, np.float32)
    n = gen.poisson(ny * nx / 900.0)
    iy, ix = gen.integers(0, ny, n), gen.integers(0, nx, n)
    dots[iy, ix] = gen.uniform(0.5, 1.0, n).astype(np.float32)
    dots = cv2.GaussianBlur(dots, (0, 0), 1.1, borderType=cv2.BORDER_REFLECT) * (
        2 * math.pi * 1.1 ** 2)
    return tex * (1.0 - 0.35 * np.clip(dots, 0.0, 1.0))


def tem_section(shape=(512, 512), *, rng: RngLike = None, **kw) -> np.ndarray:
    """One TEM-like section ``(Y, X)``: :func:`cell_volume` with a single section (keywords
    as there)."""
    if np.ndim(shape) != 1 or len(shape) != 2:
        raise InputError(f"shape must be two integers (Y, X); got {shape!r}")
    return cell_volume((1, *shape), rng=rng, **kw)[0]


# --------------------------------------------------------------------------------------------
# fluorescence
# --------------------------------------------------------------------------------------------
def fluorescence_volume(shape=(16, 256, 256), *, rng: RngLike = None,
                        n_filaments: Optional[int] = None, n_blobs: Optional[int] = None,
                        filament_width: float = 0.8, plane_spacing: float = 3.0
                        ) -> np.ndarray:
    """Emitter density ``(Z, Y, X)`` of filaments and blobs (see the module docstring).

    Filaments are smooth 3-D random walks (1 px steps, slowly turning, mostly within the
    section plane: their depth changes by about one plane per 20 px) splatted with linear
    weights between the two nearest planes and given a Gaussian width of ``filament_width``
    px; blobs are Gaussian spheres of radius 1.5-5 px, with planes ``plane_spacing`` px
    apart (e.g. 0.3 um planes at 0.1 um per px: 3). Defaults: 12 filaments and 40 blobs
    per 256 x 256 px. float32, maxima near 1.
    """
    nz, ny, nx = _shape3(shape)
    filament_width = _positive(filament_width, "filament_width")
    plane_spacing = _positive(plane_spacing, "plane_spacing")
    gen = as_rng(rng)
    area = ny * nx / 256.0 ** 2
    n_fil = (max(1, round(12 * area)) if n_filaments is None
             else as_int(n_filaments, "n_filaments", 0))
    n_blob = max(1, round(40 * area)) if n_blobs is None else as_int(n_blobs, "n_blobs", 0)
    vol = np.zeros((nz, ny, nx), np.float32)
    for _ in range(n_fil):
        n_steps = int(gen.uniform(0.5, 1.5) * max(ny, nx))
        heading = gen.uniform(0, 2 * math.pi)
        turn = np.cumsum(gen.normal(0.0, 0.04, n_steps))
        ang = heading + turn
        ys = gen.uniform(0, ny) + np.cumsum(np.sin(ang))
        xs = gen.uniform(0, nx) + np.cumsum(np.cos(ang))
        zs = gen.uniform(0, nz - 1) + np.cumsum(gen.normal(0.0, 0.05, n_steps))
        zs = np.abs(zs) % (2 * max(nz - 1, 1))
        zs = np.where(zs > nz - 1, 2 * (nz - 1) - zs, zs) if nz > 1 else np.zeros_like(zs)
        keep = (ys >= 0) & (ys <= ny - 1) & (xs >= 0) & (xs <= nx - 1)
        ys, xs, zs = ys[keep], xs[keep], zs[keep]
        k0 = np.floor(zs).astype(int)
        fz = zs - k0
        iy, ix = np.rint(ys).astype(int), np.rint(xs).astype(int)
        bright = gen.uniform(0.5, 1.0)
        np.add.at(vol, (k0, iy, ix), bright * (1.0 - fz))
        k1 = np.minimum(k0 + 1, nz - 1)
        np.add.at(vol, (k1, iy, ix), bright * fz)
    norm = 2 * math.pi * filament_width ** 2 / 1.2     # a line's peak ~ brightness
    for k in range(nz):
        vol[k] = cv2.GaussianBlur(vol[k], (0, 0), filament_width,
                                  borderType=cv2.BORDER_REFLECT) * norm
    for _ in range(n_blob):
        r = gen.uniform(1.5, 5.0)
        cz, cy, cx = gen.uniform(0, nz - 1), gen.uniform(0, ny), gen.uniform(0, nx)
        bright = gen.uniform(0.4, 1.0)
        w = _window(cy, cx, 3.0 * r, ny, nx)
        if w is None:
            continue
        sl, yy, xx = w
        rho2 = (yy - cy) ** 2 + (xx - cx) ** 2
        reach = 3.0 * r / plane_spacing
        for k in range(max(0, int(cz - reach)), min(nz, int(cz + reach) + 2)):
            dz = (k - cz) * plane_spacing
            vol[k][sl] += bright * np.exp(-(rho2 + dz * dz) / (2 * r * r))
    return vol


def _gaussian_otf(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Transfer function of a Gaussian of ``sigma`` px for ``rfft2`` of ``shape``."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.exp(-2.0 * math.pi ** 2 * sigma ** 2 * (fy * fy + fx * fx))


def widefield_stack(volume, *, focus_sigma: float = 1.0, defocus_per_plane: float = 1.2
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A widefield z-stack of ``volume`` and its in-focus ground truth.

    Image ``z`` is the sum over planes ``k`` of plane ``k`` blurred by a Gaussian of sigma
    ``sqrt(focus_sigma**2 + (defocus_per_plane * (z - k))**2)`` px: in-focus detail plus the
    out-of-focus light of every other plane. The ground truth keeps only the in-focus term
    (each plane blurred by ``focus_sigma``): what a perfect optical section shows.
    Convolutions by FFT on the volume padded by reflection (no wrap-around at the edges).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(stack, truth)``, both ``(Z, Y, X)`` float32 in the volume's units.
    """
    vol = np.asarray(volume, dtype=np.float64)
    if vol.ndim != 3 or min(vol.shape[1:]) < _MIN_SIDE or vol.shape[0] < 1:
        raise InputError(f"volume must be (Z, Y, X) with Y, X >= {_MIN_SIDE}; got shape "
                         f"{vol.shape}")
    if not np.isfinite(vol).all() or vol.min() < 0:
        raise InputError("volume must be finite and non-negative (an emitter density)")
    focus_sigma = _positive(focus_sigma, "focus_sigma")
    step = float(defocus_per_plane)
    if not (step >= 0 and math.isfinite(step)):
        raise InputError(f"defocus_per_plane must be >= 0; got {defocus_per_plane!r}")
    nz, ny, nx = vol.shape
    sig_max = math.hypot(focus_sigma, step * (nz - 1))
    pad = int(min(math.ceil(3 * sig_max), min(ny, nx) - 1))
    padded = np.pad(vol, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    shp = padded.shape[1:]
    spectra = np.fft.rfft2(padded)
    otfs = {d: _gaussian_otf(shp, math.hypot(focus_sigma, step * d)) for d in range(nz)}
    crop = (slice(pad, pad + ny), slice(pad, pad + nx))
    stack = np.empty(vol.shape, np.float32)
    truth = np.empty(vol.shape, np.float32)
    for z in range(nz):
        acc = sum(spectra[k] * otfs[abs(z - k)] for k in range(nz))
        stack[z] = np.fft.irfft2(acc, s=shp)[crop]
        truth[z] = np.fft.irfft2(spectra[z] * otfs[0], s=shp)[crop]
    return np.maximum(stack, 0.0), np.maximum(truth, 0.0)
