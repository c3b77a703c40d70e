"""Forward models of image degradation, shared by training, synthetic probes and tests.

Every function is a pure numpy/OpenCV function: it validates its input (bad input raises
:class:`~napari_microrestore.core.errors.InputError`), takes randomness from ``rng`` (a
:class:`numpy.random.Generator`, an integer seed or ``None``; the same seed gives the same
result) and returns float32 arrays in the input's intensity units.

Conventions
-----------
* Arrays are indexed ``(y, x)`` = (row, column); pixel centres sit on integer coordinates.
* Angles are in degrees, measured from the +x axis (columns, to the right) towards the +y axis
  (rows, downwards): ``0`` is horizontal motion, ``90`` vertical motion (along Y).
* Point-spread functions (PSFs) are normalised (sum 1), odd-sized, float32 and centred: the
  centroid of the kernel is its central pixel, so blurring with them moves nothing.
  :func:`convolve_psf` applies one as a true convolution (not a correlation) with a
  reflecting boundary.
* Noise is physical: an image is scaled to expected electron *counts* per pixel (the dose),
  counts are Poisson, and a camera maps them to ``gain * counts + offset`` plus Gaussian read
  noise. :class:`Burst` frames are in these camera units.
* Any parameter documented as "a value or a ``(lo, hi)`` range" is drawn uniformly from the
  range with ``rng`` (a plain number is used as is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import cv2
import numpy as np
from scipy.special import ndtr

from .errors import InputError, finite_number

RngLike = Union[np.random.Generator, int, None]
RangeLike = Union[float, Sequence[float]]

# Samples per pixel of arc length when rendering a motion trajectory.
_TRAJECTORY_SAMPLES_PER_PX = 8
DEFOCUS_PSFS = ("gaussian", "diffraction", "airy")
DOWNSAMPLE_METHODS = ("area", "subsample", "bicubic")
MISSING_FILLS = ("zeros", "mean", "nan")


# --------------------------------------------------------------------------------------------
# shared helpers (also used by core.probes)
# --------------------------------------------------------------------------------------------
def as_rng(rng: RngLike) -> np.random.Generator:
    """Return ``rng`` itself if it is a Generator, else ``np.random.default_rng(rng)``."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is not None and not isinstance(rng, (int, np.integer)):
        raise InputError(f"rng must be a numpy Generator, an integer seed or None; got {rng!r}")
    return np.random.default_rng(rng)


def draw(value: RangeLike, rng: np.random.Generator, name: str, *, low: float = -math.inf,
         high: float = math.inf) -> float:
    """A number, or a uniform draw from a ``(lo, hi)`` range, checked to lie in [low, high]."""
    if np.ndim(value) == 0:
        lo = hi = _finite(value, name)
    else:
        pair = np.asarray(value, dtype=float).ravel()
        if pair.size != 2 or not np.isfinite(pair).all() or pair[0] > pair[1]:
            raise InputError(f"{name} must be a number or a (lo, hi) range with lo <= hi; "
                             f"got {value!r}")
        lo, hi = float(pair[0]), float(pair[1])
    if lo < low or hi > high:
        raise InputError(f"{name} must lie in [{low:g}, {high:g}]; got {value!r}")
    return lo if lo == hi else float(rng.uniform(lo, hi))


_finite = finite_number


def _checked(value, name: str, *, low: float = -math.inf, high: float = math.inf,
             low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in the interval [low, high] (ends excluded where ``*_open``)."""
    v = _finite(value, name)
    if v < low or v > high or (low_open and v == low) or (high_open and v == high):
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        raise InputError(f"{name} must lie in {lb}{low:g}, {high:g}{hb}; got {v:g}")
    return v


def as_float_image(image, name: str = "image", ndim: int | tuple[int, ...] = 2,
                   min_size: int = 1) -> np.ndarray:
    """Validate a real, finite, non-empty array of ``ndim`` dimensions; return it as float32.

    ``min_size`` is the smallest allowed extent of the last two axes.
    """
    arr = np.asarray(image)
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise InputError(f"{name} must be a {want} array; got an array of shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(f"{name} must be a real-valued numeric array; got dtype {arr.dtype}")
    if arr.size == 0 or min(arr.shape[-2:]) < min_size:
        raise InputError(f"{name} must be at least {min_size}x{min_size} pixels; "
                         f"got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return arr


def _odd_size(size, needed: int, name: str) -> int:
    """``needed`` (odd) when ``size`` is None, else ``size`` checked to be odd and >= needed."""
    if size is None:
        return needed
    if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise InputError(f"{name} must be a positive odd integer; got {size!r}")
    if size < needed:
        raise InputError(f"{name}={size} is too small for this kernel, which needs at least "
                         f"{needed} px")
    return int(size)


# --------------------------------------------------------------------------------------------
# motion blur
# --------------------------------------------------------------------------------------------
def _trajectory(length: float, angle_deg: float, curvature: float, speed_variation: float,
                rng: np.random.Generator) -> np.ndarray:
    """Positions ``(n, 2)`` as ``(y, x)`` in px, sampled uniformly in time, centroid at 0."""
    n = max(16, int(math.ceil(length * _TRAJECTORY_SAMPLES_PER_PX)))
    t = (np.arange(n) + 0.5) / n
    if speed_variation > 0:
        # speed 1 + v sin(2 pi f t + phi) > 0; arc length is its integral, scaled to `length`
        f = rng.uniform(0.5, 1.5)
        phi = rng.uniform(0.0, 2.0 * math.pi)
        w = 2.0 * math.pi * f
        dist = t + speed_variation * (math.cos(phi) - np.cos(w * t + phi)) / w
        dist_end = 1.0 + speed_variation * (math.cos(phi) - math.cos(w + phi)) / w
        s = length * dist / dist_end
    else:
        s = length * t
    a = math.radians(angle_deg)
    u = np.array([math.sin(a), math.cos(a)])       # (y, x) along the motion
    v = np.array([math.cos(a), -math.sin(a)])      # u rotated by +90 deg (towards +y from +x)
    if curvature == 0:
        along, across = s, np.zeros_like(s)
    else:
        along = np.sin(curvature * s) / curvature
        across = (1.0 - np.cos(curvature * s)) / curvature
    pts = along[:, None] * u[None, :] + across[:, None] * v[None, :]
    return pts - pts.mean(axis=0)


def _splat(points: np.ndarray, size: Optional[int] = None) -> np.ndarray:
    """Render equally weighted points ``(n, 2)`` (``(y, x)`` relative to the kernel centre) by
    bilinear splatting into an odd, normalised float32 kernel.

    Bilinear weights keep each point's first moment, so the kernel centroid equals the points'
    mean exactly (up to float rounding).
    """
    half = int(math.floor(float(np.abs(points).max()))) + 1
    size = _odd_size(size, 2 * half + 1, "size")
    c = size // 2
    p = points + c
    i0 = np.floor(p).astype(np.int64)
    fr = p - i0
    k = np.zeros(size * size, dtype=np.float64)
    for dy in (0, 1):
        wy = fr[:, 0] if dy else 1.0 - fr[:, 0]
        for dx in (0, 1):
            wx = fr[:, 1] if dx else 1.0 - fr[:, 1]
            idx = (i0[:, 0] + dy) * size + (i0[:, 1] + dx)
            k += np.bincount(idx, weights=wy * wx, minlength=size * size)
    k = k.reshape(size, size)
    return (k / k.sum()).astype(np.float32)


def _motion_params(length, angle_deg, curvature, speed_variation) -> tuple[float, ...]:
    length = _checked(length, "length", low=0.0)
    angle_deg = _finite(angle_deg, "angle_deg")
    curvature = _finite(curvature, "curvature")
    speed_variation = _checked(speed_variation, "speed_variation", low=0.0, high=1.0,
                               high_open=True)
    if abs(curvature) * length > 2.0 * math.pi:
        raise InputError(f"curvature * length must be at most 2 pi (one full circle); got "
                         f"{abs(curvature) * length:.3g}")
    return length, angle_deg, curvature, speed_variation


def motion_psf(length: float, angle_deg: float = 90.0, *, curvature: float = 0.0,
               speed_variation: float = 0.0, rng: RngLike = None,
               size: Optional[int] = None) -> np.ndarray:
    """Motion-blur kernel of a trajectory of ``length`` px.

    Parameters
    ----------
    length
        Arc length of the path travelled during the exposure, in px (``0`` gives an impulse).
    angle_deg
        Direction of the motion in degrees from +x towards +y (``90`` = along Y).
    curvature
        Signed curvature of the path in 1/px (1 / radius of the arc); positive bends the path
        towards ``angle_deg + 90``. ``|curvature| * length`` may be at most 2 pi.
    speed_variation
        In [0, 1): relative amplitude of a smooth speed change along the path
        (``speed = 1 + v sin(2 pi f t + phi)`` with random ``f`` in [0.5, 1.5] cycles per
        exposure and random phase), so the dwell time, hence the kernel weight, varies along
        it. ``rng`` is used only when this is non-zero.
    rng
        Generator or seed for the speed profile.
    size
        Odd side of the kernel; by default the smallest that holds the whole path.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float32 kernel, sum 1, centroid exactly at the central pixel (the path
        is sampled uniformly in time, 8 samples per px, and each sample is splatted
        bilinearly, which is sub-pixel accurate).
    """
    length, angle_deg, curvature, speed_variation = _motion_params(
        length, angle_deg, curvature, speed_variation)
    pts = _trajectory(length, angle_deg, curvature, speed_variation, as_rng(rng))
    return _splat(pts, size)


def convolve_psf(image, psf) -> np.ndarray:
    """Convolve a 2-D image with a normalised odd-sized kernel (reflecting boundary).

    A true convolution: an impulse at ``(y0, x0)`` becomes the kernel centred at ``(y0, x0)``.
    OpenCV switches to DFT-based filtering for large kernels, so this stays fast.
    """
    img = as_float_image(image)
    k = as_float_image(psf, "psf")
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise InputError(f"psf must have odd sides; got shape {k.shape}")
    return cv2.filter2D(img, cv2.CV_32F, cv2.flip(k, -1), borderType=cv2.BORDER_REFLECT)


def motion_blur(image, length: float, angle_deg: float = 90.0, *, curvature: float = 0.0,
                speed_variation: float = 0.0, rng: RngLike = None) -> np.ndarray:
    """Blur a 2-D image along a motion path (see :func:`motion_psf` for the parameters).

    Reflecting boundary; float32 output of the input's shape and units.
    """
    img = as_float_image(image)
    return convolve_psf(img, motion_psf(length, angle_deg, curvature=curvature,
                                        speed_variation=speed_variation, rng=rng))


# --------------------------------------------------------------------------------------------
# noise and beam drift
# --------------------------------------------------------------------------------------------
def _camera(gain, read_noise, offset) -> tuple[float, float, float]:
    return (_checked(gain, "gain", low=0.0, low_open=True),
            _checked(read_noise, "read_noise", low=0.0),
            _finite(offset, "offset"))


def _nonnegative_array(a, name: str) -> np.ndarray:
    """float64 copy of a non-empty, finite, non-negative real array, or InputError."""
    arr = np.asarray(a)
    if arr.size == 0 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name} must be a non-empty real numeric array; got dtype "
                         f"{arr.dtype}, shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values")
    if arr.min() < 0:
        raise InputError(f"{name} must be non-negative (counts); got a minimum of {arr.min():g}")
    return arr


def poisson_gaussian_counts(counts, *, read_noise: float = 0.0, gain: float = 1.0,
                            offset: float = 0.0, rng: RngLike = None) -> np.ndarray:
    """Noisy camera image from an image of *expected* counts (any shape, non-negative).

    ``output = gain * Poisson(counts) + offset + Normal(0, read_noise)``, so the output has
    mean ``gain * counts + offset`` and variance ``gain**2 * counts + read_noise**2``;
    ``read_noise`` and ``offset`` are in output units. float32.
    """
    lam = _nonnegative_array(counts, "counts")
    gain, read_noise, offset = _camera(gain, read_noise, offset)
    gen = as_rng(rng)
    out = gain * gen.poisson(lam) + offset
    if read_noise > 0:
        out += gen.normal(0.0, read_noise, size=lam.shape)
    return out.astype(np.float32)


def poisson_gaussian_noise(image, dose: float, *, read_noise: float = 0.0, gain: float = 1.0,
                           offset: float = 0.0, rng: RngLike = None) -> np.ndarray:
    """Poisson-Gaussian (shot + read) noise at a given electron dose.

    The non-negative ``image`` (any units, any shape) is scaled so that its *mean* becomes
    ``dose`` expected counts per pixel, ``counts = image * dose / mean(image)``; then
    :func:`poisson_gaussian_counts` gives ``gain * Poisson(counts) + offset +
    Normal(0, read_noise)``. The output (float32, camera units) has mean
    ``gain * dose + offset`` and, at a pixel of expected count ``c``, variance
    ``gain**2 * c + read_noise**2``. Low doses (a few counts per pixel) are typical of TEM.
    """
    arr = _nonnegative_array(image, "image")
    dose = _checked(dose, "dose", low=0.0, low_open=True)
    mean = float(arr.mean())
    if mean <= 0:
        raise InputError("image is all zeros, so it cannot be scaled to a mean dose")
    return poisson_gaussian_counts(arr * (dose / mean), read_noise=read_noise, gain=gain,
                                   offset=offset, rng=rng)


def _smooth_curve(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random smooth function of normalised time ``t`` in [0, 1], values in [-1, 1]."""
    f = rng.uniform(0.25, 1.0, size=2)
    phi = rng.uniform(0.0, 2.0 * math.pi, size=2)
    return 0.5 * (np.sin(2 * math.pi * f[0] * t + phi[0]) + np.sin(2 * math.pi * f[1] * t
                                                                     + phi[1]))


def beam_drift(frames, amplitude: float = 0.1, *, reference: Optional[int] = None,
               rng: RngLike = None) -> np.ndarray:
    """Multiply each frame by a smooth, slowly varying beam-current factor.

    ``factor(t, y, x) = 1 + a g(t) + (a / 2) h(t) r(y, x)``: ``g`` and ``h`` are random
    smooth curves over the burst with values in [-1, 1] (a couple of slow sinusoids), ``r`` a
    linear ramp in [-1, 1] across the field in a random direction (an illumination gradient
    that drifts). So the factor stays within ``1 +- 1.5 a``.

    Parameters
    ----------
    frames
        ``(T, Y, X)`` non-negative intensities (e.g. expected counts).
    amplitude
        ``a`` in [0, 0.5].
    reference
        If given, factors are divided by that frame's factor so that the reference frame is
        left unchanged (its intensity scale stays the ground truth's).
    rng
        Generator or seed.

    Returns
    -------
    numpy.ndarray
        float32 ``(T, Y, X)``.
    """
    stack = as_float_image(frames, "frames", ndim=3)
    a = _checked(amplitude, "amplitude", low=0.0, high=0.5)
    n, ny, nx = stack.shape
    if reference is not None and not -n <= int(reference) < n:
        raise InputError(f"reference must index one of the {n} frames; got {reference}")
    gen = as_rng(rng)
    t = np.linspace(0.0, 1.0, n)
    g = _smooth_curve(t, gen)
    h = _smooth_curve(t, gen)
    direction = gen.uniform(0.0, 2.0 * math.pi)
    yy = np.linspace(-1.0, 1.0, ny)[:, None]
    xx = np.linspace(-1.0, 1.0, nx)[None, :]
    ramp = (math.cos(direction) * xx + math.sin(direction) * yy) / math.sqrt(2.0)
    factor = 1.0 + a * g[:, None, None] + 0.5 * a * h[:, None, None] * ramp[None]
    if reference is not None:
        factor = factor / factor[int(reference)][None]
    return (stack * factor).astype(np.float32)


# --------------------------------------------------------------------------------------------
# defocus and down-sampling
# --------------------------------------------------------------------------------------------
def _gaussian_psf(sigma: float, size: Optional[int]) -> np.ndarray:
    half = int(math.ceil(4.0 * sigma))
    size = _odd_size(size, 2 * half + 1, "size")
    c = size // 2
    if sigma == 0:
        k1 = np.zeros(size)
        k1[c] = 1.0
    else:
        # pixel-integrated Gaussian: exact for small sigma, sums to 1
        edges = (np.arange(size + 1) - c - 0.5) / sigma
        k1 = np.diff(ndtr(edges))
    k = np.outer(k1, k1)
    return (k / k.sum()).astype(np.float32)


def _diffraction_psf(radius: float, airy_radius: float, size: Optional[int]) -> np.ndarray:
    half = int(math.ceil(radius + 4.0 * airy_radius)) + 1
    size = _odd_size(size, 2 * half + 1, "size")
    os_ = 5 if size * 5 <= 640 else 3          # odd oversampling: fine grid centred on pixels
    m = size * os_
    n = 2 * m
    fc = 0.61 / airy_radius                      # pupil cut-off, cycles/px
    w20 = radius * fc / 2.0                      # defocus, waves at the pupil edge
    f = np.fft.fftfreq(n, d=1.0 / os_)
    rho2 = (f[:, None] ** 2 + f[None, :] ** 2) / fc ** 2
    pupil = np.where(rho2 <= 1.0, np.exp(2j * math.pi * w20 * rho2), 0.0)
    field = np.fft.fftshift(np.fft.ifft2(pupil))
    intensity = np.abs(field) ** 2
    lo = n // 2 - m // 2
    fine = intensity[lo:lo + m, lo:lo + m]
    k = fine.reshape(size, os_, size, os_).sum(axis=(1, 3))
    return (k / k.sum()).astype(np.float32)


def defocus_psf(amount: float, psf: str = "gaussian", *, airy_radius: float = 1.5,
                size: Optional[int] = None) -> np.ndarray:
    """Normalised, centred defocus kernel.

    Parameters
    ----------
    amount
        ``psf="gaussian"``: the Gaussian's sigma in px (pixel-integrated, truncated at 4
        sigma). ``psf="diffraction"`` (alias ``"airy"``): the radius in px of the geometrical
        defocus blur disk; the kernel is the incoherent PSF of a circular pupil with a
        quadratic defocus phase ``W20 rho**2`` (``W20 = amount * fc / 2`` waves, ``fc`` the
        pupil cut-off), computed by Fourier optics on a 3-5x finer grid and integrated over
        the pixels. At ``amount=0`` it is the in-focus Airy pattern; its blur grows with
        ``amount`` and shows the defocus rings.
    psf
        ``"gaussian"``, ``"diffraction"`` or ``"airy"``.
    airy_radius
        Diffraction only: radius of the first dark Airy ring in focus, in px (sets the
        numerical aperture: ``fc = 0.61 / airy_radius`` cycles/px); at least 1.25 px so the
        in-focus pattern is sampled without aliasing.
    size
        Odd kernel side; by default large enough for the whole blur.

    Returns
    -------
    numpy.ndarray
        float32 ``(size, size)``, sum 1, symmetric about its central pixel.
    """
    amount = _checked(amount, "amount", low=0.0)
    if psf == "gaussian":
        return _gaussian_psf(amount, size)
    if psf in ("diffraction", "airy"):
        airy_radius = _checked(airy_radius, "airy_radius", low=1.25)
        return _diffraction_psf(amount, airy_radius, size)
    raise InputError(f"psf must be one of {', '.join(DEFOCUS_PSFS)}; got {psf!r}")


def defocus(image, amount: float, *, psf: str = "gaussian", airy_radius: float = 1.5
            ) -> np.ndarray:
    """Blur a 2-D image with :func:`defocus_psf` (reflecting boundary, float32, same units)."""
    img = as_float_image(image)
    return convolve_psf(img, defocus_psf(amount, psf, airy_radius=airy_radius))


def downsample2x(image, *, method: str = "area") -> np.ndarray:
    """Halve the resolution of a ``(Y, X)`` image or a ``(Z, Y, X)`` stack (slice by slice).

    The output is ``(..., Y // 2, X // 2)``, float32, same units. ``method``:

    * ``"area"``: mean of each 2x2 block (a detector with pixels twice as large; an odd last
      row / column is dropped). Output pixel ``(i, j)`` is centred at input ``(2i + 0.5,
      2j + 0.5)``.
    * ``"subsample"``: every second pixel, ``image[..., ::2, ::2]`` (aliasing included).
    * ``"bicubic"``: ``cv2.resize`` with ``INTER_CUBIC`` (the usual super-resolution
      benchmark degradation; same pixel-centre convention as ``"area"``).
    """
    arr = as_float_image(image, ndim=(2, 3), min_size=2)
    ny, nx = arr.shape[-2] // 2, arr.shape[-1] // 2
    if method == "area":
        core = arr[..., : 2 * ny, : 2 * nx]
        out = core.reshape(*core.shape[:-2], ny, 2, nx, 2).mean(axis=(-3, -1))
        return out.astype(np.float32)
    if method == "subsample":
        return np.ascontiguousarray(arr[..., : 2 * ny : 2, : 2 * nx : 2])
    if method == "bicubic":
        planes = arr.reshape(-1, *arr.shape[-2:])
        out = [cv2.resize(p[: 2 * ny, : 2 * nx], (nx, ny), interpolation=cv2.INTER_CUBIC)
               for p in planes]
        return np.stack(out).reshape(*arr.shape[:-2], ny, nx).astype(np.float32)
    raise InputError(f"method must be one of {', '.join(DOWNSAMPLE_METHODS)}; got {method!r}")


# --------------------------------------------------------------------------------------------
# ssTEM artefacts
# --------------------------------------------------------------------------------------------
def fold(image, *, rng: RngLike = None, width: RangeLike = (6.0, 24.0),
         darkness: RangeLike = (0.3, 0.7), displacement: RangeLike = (2.0, 12.0),
         angle: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Support-film fold across a section.

    The film folds along a smooth curve crossing the section: a straight line through a random
    point of the central 60 % of the image, in direction ``angle``, bent by a gentle sinusoid
    (amplitude 2-6 % of the image, period 1-2 image sizes). Within ``width`` px of the curve
    the film is doubled, so the band is darker (intensity times ``1 - darkness``, anti-aliased
    edges). On one side (chosen at random) the tissue is pulled towards the fold: the pixel at
    distance ``d`` from the curve shows the tissue from ``d + D exp(-d / L)`` (``D`` =
    ``displacement`` px, ``L = max(3 D, 10 % of the image)``), so a strip about ``D`` wide
    disappears under the band and the nearby tissue is compressed towards it.

    Parameters
    ----------
    image
        2-D section, non-negative transmitted intensity (any units).
    rng
        Generator or seed.
    width, darkness, displacement
        Band width in px, darkness in [0, 1] and displacement in px; each a value or a
        ``(lo, hi)`` range.
    angle
        Direction of the fold in degrees (from +x towards +y); random if None.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The damaged image (float32) and the bool mask of the band (the pixels whose tissue is
        hidden by the doubled film). Outside the mask the tissue is intact but, on the pulled
        side, displaced by up to ``D`` px.
    """
    img = as_float_image(image, min_size=8)
    gen = as_rng(rng)
    w = draw(width, gen, "width", low=0.0)
    dark = draw(darkness, gen, "darkness", low=0.0, high=1.0)
    disp = draw(displacement, gen, "displacement", low=0.0)
    ang = gen.uniform(0.0, 180.0) if angle is None else _finite(angle, "angle")
    ny, nx = img.shape
    p0 = (gen.uniform(0.2, 0.8) * (ny - 1), gen.uniform(0.2, 0.8) * (nx - 1))
    amp = gen.uniform(0.02, 0.06) * min(ny, nx)
    period = gen.uniform(1.0, 2.0) * max(ny, nx)
    phase = gen.uniform(0.0, 2.0 * math.pi)
    side = 1.0 if gen.random() < 0.5 else -1.0

    a = math.radians(ang)
    ty, tx = math.sin(a), math.cos(a)            # along the fold
    ny_, nx_ = tx, -ty                           # normal (y, x)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    dy, dx = yy - p0[0], xx - p0[1]
    s = dy * ty + dx * tx
    d = dy * ny_ + dx * nx_ - amp * np.sin(2 * math.pi * s / period + phase)
    d = side * d                                 # > 0 on the pulled side

    out = img
    if disp > 0:
        decay = max(3.0 * disp, 0.1 * min(ny, nx))
        pulled = d > 0
        shift = np.where(pulled, disp * np.exp(-np.maximum(d, 0) / decay), 0.0).astype(
            np.float32) * side
        map_y = yy + shift * ny_
        map_x = xx + shift * nx_
        warped = cv2.remap(img, map_x, map_y, interpolation=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT)
        out = np.where(pulled, warped, img)
    cover = np.clip(0.5 * w - np.abs(d) + 0.5, 0.0, 1.0)
    out = out * (1.0 - dark * cover)
    return out.astype(np.float32), cover > 0


def precipitates(image, *, rng: RngLike = None, count: Union[int, tuple[int, int]] = (1, 6),
                 radius: RangeLike = (2.0, 10.0), darkness: RangeLike = (0.6, 0.95)
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Stain precipitate: opaque, dark, irregular blobs.

    Each blob has a random centre, a mean radius drawn from ``radius`` (px) and an irregular
    outline ``r(theta) = R (1 + sum_k a_k cos(k theta + phi_k))`` for k = 2, 3, 4 (random
    ``a_k < 0.25 / k``), with a one-pixel anti-aliased edge. Being electron-dense it hides the
    tissue: inside, the intensity becomes ``(1 - darkness) * p1``, with ``p1`` the image's
    1st percentile (so ``darkness`` is relative to the darkest tissue).

    Parameters
    ----------
    image
        2-D section, non-negative intensity.
    rng
        Generator or seed.
    count
        Number of blobs, an int or an inclusive ``(lo, hi)`` range.
    radius, darkness
        Value or ``(lo, hi)`` range, drawn per blob; darkness in [0, 1].

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The damaged image (float32) and the bool mask of the pixels the blobs touch.
    """
    img = as_float_image(image, min_size=8)
    gen = as_rng(rng)
    if np.ndim(count) == 0:
        lo_n = hi_n = count
    else:
        if len(count) != 2:
            raise InputError(f"count must be an int or a (lo, hi) range; got {count!r}")
        lo_n, hi_n = count
    if not all(isinstance(c, (int, np.integer)) for c in (lo_n, hi_n)) or not 0 <= lo_n <= hi_n:
        raise InputError(f"count must be a non-negative int or a (lo, hi) range of ints; "
                         f"got {count!r}")
    n = int(gen.integers(lo_n, hi_n + 1))
    ny, nx = img.shape
    p1 = float(np.percentile(img, 1))
    out = img.astype(np.float32, copy=True)
    alpha_total = np.zeros_like(out)
    for _ in range(n):
        r0 = draw(radius, gen, "radius", low=0.0)
        level = (1.0 - draw(darkness, gen, "darkness", low=0.0, high=1.0)) * p1
        cy, cx = gen.uniform(0, ny - 1), gen.uniform(0, nx - 1)
        amps = gen.uniform(0.0, 1.0, size=3) * 0.25 / np.arange(2, 5)
        phis = gen.uniform(0.0, 2.0 * math.pi, size=3)
        reach = int(math.ceil(r0 * (1.0 + amps.sum()) + 1.5))
        y0, y1 = max(0, int(cy) - reach), min(ny, int(cy) + reach + 2)
        x0, x1 = max(0, int(cx) - reach), min(nx, int(cx) + reach + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        rho = np.hypot(yy - cy, xx - cx)
        theta = np.arctan2(yy - cy, xx - cx)
        outline = r0 * (1.0 + sum(amps[k] * np.cos((k + 2) * theta + phis[k])
                                  for k in range(3)))
        alpha = np.clip(outline - rho + 0.5, 0.0, 1.0).astype(np.float32)
        win = out[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = win * (1.0 - alpha) + level * alpha
        alpha_total[y0:y1, x0:x1] = np.maximum(alpha_total[y0:y1, x0:x1], alpha)
    return out, alpha_total > 0


def missing_section(stack, index: Union[int, Sequence[int]], *, fill: str = "zeros"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A ``(Z, Y, X)`` section stack with section(s) ``index`` lost.

    The stack keeps its length (registered stacks keep the slot of a lost section); the lost
    sections are blanked with ``fill``: ``"zeros"``, ``"mean"`` (the mean intensity of the
    remaining sections: a featureless section) or ``"nan"``. Negative indices count from the
    end.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The float32 stack and a bool ``(Z,)`` mask, True at the damaged sections.
    """
    arr = as_float_image(stack, "stack", ndim=3)
    nz = arr.shape[0]
    idx = np.atleast_1d(np.asarray(index))
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise InputError(f"index must be an int or a sequence of ints; got {index!r}")
    if (idx < -nz).any() or (idx >= nz).any():
        raise InputError(f"index must lie in [-{nz}, {nz - 1}] for a stack of {nz} sections; "
                         f"got {index!r}")
    mask = np.zeros(nz, dtype=bool)
    mask[idx] = True
    if fill not in MISSING_FILLS:
        raise InputError(f"fill must be one of {', '.join(MISSING_FILLS)}; got {fill!r}")
    if fill == "mean" and mask.all():
        raise InputError("fill='mean' needs at least one intact section; all are marked lost")
    value = {"zeros": 0.0, "nan": np.nan}.get(fill)
    if value is None:
        value = float(arr[~mask].mean())
    out = arr.copy()
    out[mask] = value
    return out, mask


# --------------------------------------------------------------------------------------------
# TEM stream bursts
# --------------------------------------------------------------------------------------------
@dataclass
class Burst:
    """A simulated burst of a moving TEM stream, with its ground truth.

    Attributes
    ----------
    frames
        ``(T, Y, X)`` float32 noisy, motion-blurred frames in camera units
        (``gain * counts + offset``).
    ground_truth
        ``(Y, X)`` float32 clean, sharp image in the reference frame's coordinates, on the
        frames' expected intensity scale before blur: ``gain * counts + offset`` with counts
        scaled to the dose. A perfect restoration equals it.
    shifts
        ``(T, 2)`` float ``(dy, dx)`` per frame, in px: the displacement of the scene content
        from the reference frame to frame ``t``, ``frames[t](y + dy, x + dx) ~ ground_truth(y,
        x)``. This is the convention of :mod:`~napari_microrestore.core.registration`: the
        translation ``(A[1, 2], A[0, 2])`` of the transform mapping reference to frame
        coordinates. The field of view of frame ``t`` sits at ``-shifts[t]`` relative to the
        reference's; ``shifts[reference]`` is ``(0, 0)``.
    reference
        Index of the reference frame.
    params
        JSON-safe record of everything drawn: per-frame blur lengths, angles, curvatures and
        speed variations, dose, gain, offset, read noise, drift, the reference frame's origin
        (top-left corner) in the source image, ...
    """

    frames: np.ndarray
    ground_truth: np.ndarray
    shifts: np.ndarray
    reference: int
    params: dict


def as_int(value, name: str, low: int) -> int:
    """An integer ``>= low`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def simulate_burst(image, n_frames: int = 5, *, shape: Optional[tuple[int, int]] = None,
                   reference: Optional[int] = None, blur_length: RangeLike = (6.0, 14.0),
                   blur_angle: RangeLike = 90.0, angle_jitter: float = 10.0,
                   length_jitter: float = 0.1, curvature: RangeLike = (0.0, 0.02),
                   speed_variation: RangeLike = (0.0, 0.3), step: Optional[RangeLike] = None,
                   position_jitter: float = 0.5, dose: RangeLike = (12.0, 80.0),
                   read_noise: float = 0.0, gain: float = 1.0, offset: float = 0.0,
                   drift: float = 0.0, noise: bool = True,
                   origin: Optional[tuple[int, int]] = None, rng: RngLike = None) -> Burst:
    """Simulate a burst from a TEM image stream with a moving stage (Wieslander et al. 2021).

    The stage moves along ``blur_angle`` (mostly vertically by default) while the camera reads
    frames: frame ``t`` is the part of ``image`` under the camera at its position, blurred by
    the motion during its exposure and recorded with Poisson(-Gaussian) noise.

    What is drawn, and how often:

    * per burst: base blur length ``L`` from ``blur_length``, direction from ``blur_angle``,
      ``dose`` (mean expected counts per pixel of the ground truth);
    * per frame: blur length ``L (1 + U(-length_jitter, length_jitter))``, angle
      ``+ U(-angle_jitter, angle_jitter)`` degrees, curvature magnitude from ``curvature``
      (1/px, random sign), ``speed_variation``, Gaussian position jitter of
      ``position_jitter`` px (std per axis). Consecutive frame centres are ``step`` px apart
      along the motion (default: the mean of the two frames' blur lengths, i.e. a continuous
      exposure); positions are sub-pixel.

    Sub-pixel positions are exact: each frame's fractional offset is built into its
    (supersampled) motion kernel, and frames are cut at integer positions from the blurred
    image, so the reference frame (integer position) is sampled without interpolation.

    Parameters
    ----------
    image
        Clean, sharp, non-negative 2-D image (any units), larger than the frames.
    n_frames
        Number of frames ``T`` (>= 1).
    shape
        ``(Y, X)`` of the frames; by default as large as fits in ``image`` along the drawn
        motion path.
    reference
        Reference frame index; default ``n_frames // 2``.
    blur_length, blur_angle, curvature, speed_variation, step, dose
        A value or a ``(lo, hi)`` range (see above). Lengths in px, angles in degrees (from +x
        towards +y), curvature in 1/px, dose in counts per pixel.
    angle_jitter, length_jitter, position_jitter
        Per-frame variations (degrees, relative, px).
    read_noise, gain, offset
        Camera: ``frame = gain * Poisson(counts) + offset + Normal(0, read_noise)``.
    drift
        Beam-current drift amplitude for :func:`beam_drift` (0 = none); the reference frame
        keeps the ground truth's intensity scale.
    noise
        False returns the noise-free expected frames (for tests and for adding noise later).
    origin
        Top-left ``(y, x)`` of the reference frame in ``image`` (ints); random if None.
    rng
        Generator or seed.

    Returns
    -------
    Burst
    """
    img = as_float_image(image, min_size=8)
    if img.min() < 0:
        raise InputError(f"image must be non-negative (it is scaled to counts); got a minimum "
                         f"of {img.min():g}")
    n = as_int(n_frames, "n_frames", 1)
    ref = n // 2 if reference is None else as_int(reference, "reference", 0)
    if ref >= n:
        raise InputError(f"reference must lie in [0, {n - 1}] for {n} frames; got {reference}")
    gain, read_noise, offset = _camera(gain, read_noise, offset)
    gen = as_rng(rng)
    base_len = draw(blur_length, gen, "blur_length", low=0.0)
    base_angle = draw(blur_angle, gen, "blur_angle")
    dose_v = draw(dose, gen, "dose", low=0.0)
    if dose_v <= 0:
        raise InputError(f"dose must be positive; got {dose!r}")
    a_jit = _checked(angle_jitter, "angle_jitter", low=0.0)
    l_jit = _checked(length_jitter, "length_jitter", low=0.0, high=1.0, high_open=True)
    p_jit = _checked(position_jitter, "position_jitter", low=0.0)
    drift_v = _checked(drift, "drift", low=0.0, high=0.5)

    lengths = base_len * (1.0 + gen.uniform(-l_jit, l_jit, size=n))
    angles = base_angle + gen.uniform(-a_jit, a_jit, size=n)
    curv = np.array([draw(curvature, gen, "curvature", low=0.0) for _ in range(n)])
    curv *= np.where(gen.random(n) < 0.5, -1.0, 1.0)
    speed = np.array([draw(speed_variation, gen, "speed_variation", low=0.0, high=1.0)
                      for _ in range(n)])
    for t in range(n):
        _motion_params(lengths[t], angles[t], curv[t], speed[t])

    # frame centres along the path, relative to frame 0
    pos = np.zeros((n, 2))
    steps = []
    for t in range(1, n):
        st = 0.5 * (lengths[t - 1] + lengths[t]) if step is None else draw(
            step, gen, "step", low=0.0)
        a = math.radians(0.5 * (angles[t - 1] + angles[t]))
        pos[t] = pos[t - 1] + st * np.array([math.sin(a), math.cos(a)])
        steps.append(st)
    pos += gen.normal(0.0, p_jit, size=(n, 2)) if p_jit > 0 else 0.0
    rel = pos - pos[ref]                       # field-of-view offset relative to the reference
    whole = np.rint(rel).astype(int)
    frac = rel - whole

    kernels = []
    for t in range(n):
        pts = _trajectory(lengths[t], angles[t], curv[t], speed[t], gen)
        # frame(y) = blurred(y + offset): shift the kernel by -frac (see Burst.shifts)
        kernels.append(_splat(pts - frac[t][None, :]))
    halves = np.array([k.shape[0] // 2 for k in kernels])

    # placement: origin + whole[t] - half[t] >= 0 and origin + whole[t] + size + half[t] <= N
    lo = np.max(halves[:, None] - whole, axis=0)
    hi_extra = np.max(whole + halves[:, None], axis=0)
    room = np.array(img.shape) - lo - hi_extra        # largest frame that fits, per axis
    if shape is None:
        size = room
        if (size < 8).any():
            raise InputError(f"image {img.shape} is too small for this burst: the motion path "
                             f"and blur need {tuple(int(v) for v in lo + hi_extra + 8)} px "
                             f"for frames of 8x8")
    else:
        if (np.ndim(shape) != 1 or len(shape) != 2
                or not all(isinstance(v, (int, np.integer)) and v >= 8 for v in shape)):
            raise InputError(f"shape must be two integers >= 8; got {shape!r}")
        size = np.array(shape)
        if (size > room).any():
            raise InputError(f"frames of shape {tuple(shape)} do not fit: image {img.shape} "
                             f"along this motion path holds frames up to "
                             f"{tuple(int(v) for v in room)}")
    hi = np.array(img.shape) - size - hi_extra
    if origin is None:
        org = np.array([int(gen.integers(lo[i], hi[i] + 1)) for i in range(2)])
    else:
        org = np.asarray(origin)
        if (org.shape != (2,) or not np.issubdtype(org.dtype, np.integer)
                or (org < lo).any() or (org > hi).any()):
            raise InputError(f"origin must be two integers within ({lo[0]}..{hi[0]}, "
                             f"{lo[1]}..{hi[1]}) for this image, path and frame shape; "
                             f"got {origin!r}")
    sy, sx = int(size[0]), int(size[1])
    gt_crop = img[org[0]:org[0] + sy, org[1]:org[1] + sx]
    mean = float(gt_crop.mean())
    if mean <= 0:
        raise InputError("the image is zero under the reference frame, so it cannot be scaled "
                         "to a dose")
    scale = dose_v / mean

    expected = np.empty((n, sy, sx), dtype=np.float32)
    for t in range(n):
        h = int(halves[t])
        y0, x0 = org + whole[t] - h
        region = img[y0:y0 + sy + 2 * h, x0:x0 + sx + 2 * h]
        expected[t] = convolve_psf(region, kernels[t])[h:h + sy, h:h + sx] * scale
    if drift_v > 0:
        expected = beam_drift(expected, drift_v, reference=ref, rng=gen)
    if noise:
        frames = poisson_gaussian_counts(np.maximum(expected, 0.0), read_noise=read_noise,
                                         gain=gain, offset=offset, rng=gen)
    else:
        frames = (gain * expected + offset).astype(np.float32)
    ground_truth = (gain * scale * gt_crop + offset).astype(np.float32)
    params = {
        "n_frames": n,
        "reference": ref,
        "shape": [sy, sx],
        "origin": [int(org[0]), int(org[1])],
        "blur_lengths": [float(v) for v in lengths],
        "blur_angles": [float(v) for v in angles],
        "curvatures": [float(v) for v in curv],
        "speed_variations": [float(v) for v in speed],
        "steps": [float(v) for v in steps],
        "dose": dose_v,
        "counts_per_unit": scale,
        "gain": gain,
        "offset": offset,
        "read_noise": read_noise,
        "drift": drift_v,
        "noise": bool(noise),
        "shift_convention": "frames[t](y + dy, x + dx) ~ ground_truth(y, x)",
    }
    return Burst(frames=frames, ground_truth=ground_truth, shifts=-rel,
                 reference=ref, params=params)
