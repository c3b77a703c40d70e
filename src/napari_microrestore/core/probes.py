"""Synthetic test patterns with known ground truth, and degrading them like real data.

The probes reveal what a restoration invents: on a pattern whose truth is known exactly, a
network that hallucinates texture, bends straight lines or resolves bars finer than the data
support is caught at once. They follow the synthetic images of Wieslander et al. 2021 (Fig 3)
plus two classic resolution targets:

* ``"spots-lines"``: bent lines (circular arcs) and round spots of random sizes and
  intensities on a flat background (uses ``rng``);
* ``"lines-1d"``: straight parallel lines in one direction whose period shrinks across the
  image (a chirped line grating: the resolution limit shows where the lines merge);
* ``"lines-2d"``: lines in two perpendicular directions (a grid, like a calibration grating);
* ``"siemens-star"``: alternating wedges around a centre;
* ``"line-pairs"``: groups of three bars, horizontal and vertical, of geometrically
  decreasing period (a USAF-style bar target).

Every probe is float32 in [0, 1]: ``background`` (default 0.1) where there is nothing and up
to ``foreground`` (default 1) on the features. Edges are rendered analytically as the exact
response of a Gaussian of ``EDGE_SIGMA`` = 0.5 px to the ideal shape, i.e. band-limited before
sampling, so there is no aliasing (the Siemens star fades to its mean where the wedges get
narrower than the pixel grid can carry). Geometry (periods, widths, radii) is in px, angles in
degrees from +x towards +y as in :mod:`~napari_microrestore.core.degrade`.

:func:`estimate_degradation` measures blur and noise on the user's data and
:func:`degrade_probe` makes a probe burst that looks like it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.signal import correlate2d
from scipy.special import ndtr

from .degrade import Burst, RngLike, as_float_image, as_int, as_rng, simulate_burst
from .errors import InputError

EDGE_SIGMA = 0.5
_MIN_SIDE = 32


# --------------------------------------------------------------------------------------------
# rendering helpers
# --------------------------------------------------------------------------------------------
def _shape(shape) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in shape)
        ok = all(float(v) == int(v) for v in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok or min(ny, nx) < _MIN_SIDE:
        raise InputError(f"shape must be two integers >= {_MIN_SIDE}; got {shape!r}")
    return ny, nx


def _levels(background: float, foreground: float) -> tuple[float, float]:
    bg, fg = float(background), float(foreground)
    if not (0.0 <= bg <= 1.0 and 0.0 <= fg <= 1.0) or bg == fg:
        raise InputError(f"background and foreground must be distinct values in [0, 1]; got "
                         f"{background!r} and {foreground!r}")
    return bg, fg


def _inside(signed_distance: np.ndarray) -> np.ndarray:
    """Coverage of a shape whose boundary is locally straight, ``signed_distance`` > 0 inside."""
    return ndtr(signed_distance / EDGE_SIGMA)


def _band(distance: np.ndarray, width: float) -> np.ndarray:
    """Coverage of a straight band of ``width`` at signed ``distance`` from its centre line
    (exact for the Gaussian edge)."""
    return ndtr((0.5 * width - distance) / EDGE_SIGMA) - ndtr((-0.5 * width - distance)
                                                              / EDGE_SIGMA)


def _grid(ny: int, nx: int, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along and across direction ``angle_deg``, relative to the image centre."""
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    yy -= (ny - 1) / 2.0
    xx -= (nx - 1) / 2.0
    a = math.radians(angle_deg)
    along = xx * math.cos(a) + yy * math.sin(a)
    across = -xx * math.sin(a) + yy * math.cos(a)
    return along, across


def _finish(cover: np.ndarray, bg: float, fg: float) -> np.ndarray:
    return (bg + (fg - bg) * np.clip(cover, 0.0, 1.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the probes
# --------------------------------------------------------------------------------------------
def spots_lines(shape=(512, 512), *, rng: RngLike = None, n_spots: Optional[int] = None,
                n_lines: Optional[int] = None, spot_radius: tuple[float, float] = (1.5, 10.0),
                line_width: tuple[float, float] = (1.0, 4.0),
                intensity: tuple[float, float] = (0.3, 1.0), background: float = 0.1
                ) -> np.ndarray:
    """Bent lines (circular arcs) and round spots of random size and intensity.

    ``n_spots`` / ``n_lines`` default to 40 / 14 per 512x512 px. Spot radii and line widths
    (px) and intensities (in [background, 1], as fractions of 1) are drawn uniformly from the
    ranges; arcs have radii of 0.2-1.5 image sides and lengths of 0.2-0.6 sides. Later objects
    are drawn over earlier ones (alpha blending), lines first.
    """
    ny, nx = _shape(shape)
    bg, _ = _levels(background, 1.0)
    gen = as_rng(rng)
    side = min(ny, nx)
    area = ny * nx / 512.0 ** 2
    n_spots = max(1, round(40 * area)) if n_spots is None else int(n_spots)
    n_lines = max(1, round(14 * area)) if n_lines is None else int(n_lines)
    if n_spots < 0 or n_lines < 0:
        raise InputError(f"n_spots and n_lines must be >= 0; got {n_spots} and {n_lines}")
    lo_i, hi_i = intensity
    if not 0.0 <= lo_i <= hi_i <= 1.0:
        raise InputError(f"intensity must be a (lo, hi) range within [0, 1]; got {intensity!r}")
    img = np.full((ny, nx), bg, dtype=np.float64)

    def blend(y0: int, x0: int, cover: np.ndarray, value: float) -> None:
        win = img[y0:y0 + cover.shape[0], x0:x0 + cover.shape[1]]
        win[...] = win * (1.0 - cover) + value * cover

    def window(ymin: float, ymax: float, xmin: float, xmax: float, pad: float):
        y0, y1 = max(0, int(ymin - pad)), min(ny, int(math.ceil(ymax + pad)) + 1)
        x0, x1 = max(0, int(xmin - pad)), min(nx, int(math.ceil(xmax + pad)) + 1)
        if y0 >= y1 or x0 >= x1:
            return None
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        return y0, x0, yy, xx

    for _ in range(n_lines):
        radius = gen.uniform(0.2, 1.5) * side
        half_span = 0.5 * gen.uniform(0.2, 0.6) * side / radius
        width = gen.uniform(*line_width)
        value = gen.uniform(lo_i, hi_i)
        my, mx = gen.uniform(0, ny - 1), gen.uniform(0, nx - 1)   # midpoint of the arc
        beta = gen.uniform(-math.pi, math.pi)
        cy, cx = my - radius * math.sin(beta), mx - radius * math.cos(beta)
        ts = beta + np.linspace(-half_span, half_span, 64)
        ay, ax = cy + radius * np.sin(ts), cx + radius * np.cos(ts)
        w = window(ay.min(), ay.max(), ax.min(), ax.max(), width + 3)
        if w is None:
            continue
        y0, x0, yy, xx = w
        rho = np.hypot(yy - cy, xx - cx)
        delta = np.angle(np.exp(1j * (np.arctan2(yy - cy, xx - cx) - beta)))
        on_arc = np.abs(delta) <= half_span
        end = np.sign(delta) * half_span + beta
        to_end = np.hypot(yy - (cy + radius * np.sin(end)), xx - (cx + radius * np.cos(end)))
        dist = np.where(on_arc, np.abs(rho - radius), to_end)
        blend(y0, x0, _band(dist, width), value)

    for _ in range(n_spots):
        r = gen.uniform(*spot_radius)
        value = gen.uniform(lo_i, hi_i)
        cy, cx = gen.uniform(0, ny - 1), gen.uniform(0, nx - 1)
        w = window(cy, cy, cx, cx, r + 3)
        if w is None:
            continue
        y0, x0, yy, xx = w
        blend(y0, x0, _inside(r - np.hypot(yy - cy, xx - cx)), value)
    return img.astype(np.float32)


def _chirp_centres(extent: float, period: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Line centres across ``extent`` px with the period shrinking geometrically from
    ``period[1]`` to ``period[0]``; returns (centres, periods)."""
    p_min, p_max = period
    centres, periods = [], []
    c = -extent / 2.0
    while c <= extent / 2.0:
        p = p_max * (p_min / p_max) ** ((c + extent / 2.0) / extent)
        centres.append(c + p / 2.0)
        periods.append(p)
        c += p
    return np.asarray(centres), np.asarray(periods)


def _check_period(period, name: str, minimum: float = 2.0) -> None:
    if min(period) < minimum:
        raise InputError(f"{name} must be at least {minimum:g} px (2 px is the Nyquist "
                         f"period); got {period!r}")


def lines_1d(shape=(512, 512), *, angle: float = 0.0, period: tuple[float, float] = (2.5, 24.0),
             background: float = 0.1, foreground: float = 1.0) -> np.ndarray:
    """Straight parallel lines along ``angle`` (0 = horizontal lines, along x), each half a
    period wide, their period shrinking geometrically across the image from ``period[1]``
    to ``period[0]`` px (a chirped grating)."""
    ny, nx = _shape(shape)
    bg, fg = _levels(background, foreground)
    p_min, p_max = (float(v) for v in period)
    _check_period((p_min, p_max), "period")
    if p_min > p_max:
        raise InputError(f"period must be a (min, max) range; got {period!r}")
    _, across = _grid(ny, nx, angle)
    extent = float(np.ptp(across)) + 1.0
    centres, periods = _chirp_centres(extent, (p_min, p_max))
    k = np.searchsorted(centres, across)
    cover = np.zeros_like(across)
    for j in (-2, -1, 0, 1):           # the two nearest lines on each side
        kk = np.clip(k + j, 0, len(centres) - 1)
        valid = (k + j >= 0) & (k + j < len(centres))
        cover += valid * _band(across - centres[kk], 0.5 * periods[kk])
    return _finish(cover, bg, fg)


def _grating(coord: np.ndarray, period: float, width: float) -> np.ndarray:
    """Coverage of a regular line grating (lines of ``width`` every ``period`` px)."""
    d = np.mod(coord + period / 2.0, period) - period / 2.0
    return _band(d, width) + _band(d - period, width) + _band(d + period, width)


def lines_2d(shape=(512, 512), *, angle: float = 0.0, period: float = 12.0, width: float = 3.0,
             background: float = 0.1, foreground: float = 1.0) -> np.ndarray:
    """A grid: lines of ``width`` px every ``period`` px along ``angle`` and ``angle + 90``."""
    ny, nx = _shape(shape)
    bg, fg = _levels(background, foreground)
    _check_period((period,), "period")
    if not 0.0 < width < period:
        raise InputError(f"width must lie in (0, period={period:g}) px; got {width!r}")
    along, across = _grid(ny, nx, angle)
    a, b = _grating(across, period, width), _grating(along, period, width)
    return _finish(a + b - a * b, bg, fg)


def siemens_star(shape=(512, 512), *, n_spokes: int = 36, radius: Optional[float] = None,
                 background: float = 0.1, foreground: float = 1.0) -> np.ndarray:
    """A Siemens star of ``n_spokes`` bright wedges (and as many dark ones) within ``radius``
    px (default 45 % of the shorter side) of the centre. Near the centre, where the wedge
    period ``2 pi r / n_spokes`` drops from 4 to 2.5 px, the contrast fades to the mean
    (0.5 between background and foreground) so the pattern is not aliased."""
    ny, nx = _shape(shape)
    bg, fg = _levels(background, foreground)
    if not isinstance(n_spokes, (int, np.integer)) or n_spokes < 2:
        raise InputError(f"n_spokes must be an integer >= 2; got {n_spokes!r}")
    rad = 0.45 * min(ny, nx) if radius is None else float(radius)
    if not 0 < rad:
        raise InputError(f"radius must be positive; got {radius!r}")
    along, across = _grid(ny, nx, 0.0)
    r = np.hypot(along, across)
    theta = np.arctan2(across, along)
    # signed distance to the nearest wedge edge ~ r sin(n theta) / n near the edges
    spokes = _inside(r * np.sin(n_spokes * theta) / n_spokes)
    contrast = np.clip((2.0 * math.pi * r / n_spokes - 2.5) / 1.5, 0.0, 1.0)
    cover = (0.5 + contrast * (spokes - 0.5)) * _inside(rad - r)
    return _finish(cover, bg, fg)


def _span(c: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Coverage of the interval [lo, hi] (px) along coordinate ``c``, Gaussian edges."""
    return ndtr((hi - c) / EDGE_SIGMA) - ndtr((lo - c) / EDGE_SIGMA)


def _bars(yy: np.ndarray, xx: np.ndarray, y0: float, x0: float, w: float, vertical: bool
          ) -> np.ndarray:
    """Three bars of width ``w`` and length ``5 w``, gaps ``w``, in the square of side ``5 w``
    whose top-left corner is (y0, x0); vertical bars run along y."""
    along, across = (yy, xx) if vertical else (xx, yy)
    a0, c0 = (y0, x0) if vertical else (x0, y0)
    bars = sum(_span(across, c0 + 2 * i * w, c0 + (2 * i + 1) * w) for i in range(3))
    return _span(along, a0, a0 + 5 * w) * bars


def _pack(periods: Sequence[float], ny: int, nx: int) -> Optional[list[tuple[float, float]]]:
    """Top-left corners of the bar groups packed in rows (left to right, top to bottom), or
    None if they do not fit."""
    corners = []
    y, x, row_h = 0.0, 0.0, 0.0
    for p in periods:
        size, gap = 2.5 * p, max(4.0, p / 2.0)
        group_w = 2.0 * size + gap
        if x + gap + group_w + gap > nx:        # start a new row
            y, x, row_h = y + row_h, 0.0, 0.0
        gy, gx = y + gap, x + gap
        if gy + size + gap > ny or gx + group_w + gap > nx:
            return None
        corners.append((gy, gx))
        x = gx + group_w
        row_h = max(row_h, size + gap)
    return corners


def line_pairs(shape=(512, 512), *, periods: Optional[Sequence[float]] = None,
               background: float = 0.1, foreground: float = 1.0) -> np.ndarray:
    """A bar target: per period ``p``, a group of three vertical and three horizontal bars,
    ``p / 2`` wide and ``2.5 p`` long, spaced by ``p / 2``.

    ``periods`` default to a geometric series (ratio 2**(-1/3), three groups per octave) down
    to 2.5 px, starting from the largest period (at most 1/8 of the shorter side) for which
    all groups fit. Groups are packed in rows, largest first; an InputError says so if given
    periods do not fit.
    """
    ny, nx = _shape(shape)
    bg, fg = _levels(background, foreground)
    ratio = 2.0 ** (-1.0 / 3.0)
    if periods is None:
        p_max = min(ny, nx) / 8.0
        while True:
            count = int(math.floor(math.log(2.5 / p_max) / math.log(ratio) + 1e-9)) + 1
            periods = [p_max * ratio ** i for i in range(max(count, 1))]
            if _pack(periods, ny, nx) is not None or p_max <= 2.5:
                break
            p_max = max(2.5, p_max * ratio)
    periods = sorted((float(p) for p in periods), reverse=True)
    if not periods:
        raise InputError("periods must name at least one period")
    _check_period(periods, "periods")
    corners = _pack(periods, ny, nx)
    if corners is None:
        raise InputError(f"the bar groups of periods {', '.join(f'{p:g}' for p in periods)} "
                         f"px do not fit in an image of shape {(ny, nx)}")
    cover = np.zeros((ny, nx))
    for p, (gy, gx) in zip(periods, corners):
        w, size, gap = p / 2.0, 2.5 * p, max(4.0, p / 2.0)
        y0, y1 = max(0, int(gy) - 3), min(ny, int(math.ceil(gy + size)) + 4)
        x0, x1 = max(0, int(gx) - 3), min(nx, int(math.ceil(gx + 2 * size + gap)) + 4)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        cover[y0:y1, x0:x1] += (_bars(yy, xx, gy, gx, w, vertical=True)
                                + _bars(yy, xx, gy, gx + size + gap, w, vertical=False))
    return _finish(cover, bg, fg)


PROBES: dict[str, Callable[..., np.ndarray]] = {
    "spots-lines": spots_lines,
    "lines-1d": lines_1d,
    "lines-2d": lines_2d,
    "siemens-star": siemens_star,
    "line-pairs": line_pairs,
}


def make_probe(name: str, shape=(512, 512), *, rng: RngLike = None, invert: bool = False,
               **kw) -> np.ndarray:
    """Render probe ``name`` (a key of :data:`PROBES`) of ``shape`` (Y, X).

    ``rng`` seeds the random probes (``"spots-lines"``; the others are deterministic and
    ignore it). ``invert=True`` returns ``1 - probe``: dark features on a bright background,
    as in bright-field TEM. Other keywords go to the probe's function (see its docstring).
    Returns float32 in [0, 1].
    """
    if name not in PROBES:
        raise InputError(f"unknown probe {name!r}; choose one of {', '.join(PROBES)}")
    fn = PROBES[name]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kw) - set(params))
    if unknown:
        allowed = [p for p in params if p not in ("shape", "rng")]
        raise InputError(f"probe {name!r} takes no option {', '.join(unknown)}; its options "
                         f"are {', '.join(allowed)}")
    if "rng" in params:
        kw["rng"] = rng
    img = fn(shape, **kw)
    return (1.0 - img).astype(np.float32) if invert else img


# --------------------------------------------------------------------------------------------
# measuring the degradation of real data
# --------------------------------------------------------------------------------------------
@dataclass
class DegradationEstimate:
    """Blur and noise measured on real data (see :func:`estimate_degradation`).

    Attributes
    ----------
    blur_length
        Motion-blur length in px (0 when no motion blur was detected).
    blur_angle
        Motion direction in degrees in [0, 180), from +x towards +y as in
        :func:`~napari_microrestore.core.degrade.motion_psf`.
    noise_sigma
        Standard deviation of the noise at the mean intensity, in image units.
    dose
        Poisson-equivalent counts per pixel at the mean intensity if the noise variance grows
        with the intensity (shot noise), else None.
    gain
        Image units per count (slope of noise variance against mean), or None.
    offset
        Intensity at which the fitted noise variance would vanish (camera offset minus
        ``read_noise**2 / gain``), or None.
    mean_intensity
        Mean intensity of the data, image units.
    """

    blur_length: float
    blur_angle: float
    noise_sigma: float
    dose: Optional[float]
    gain: Optional[float]
    offset: Optional[float]
    mean_intensity: float = 0.0

    def to_dict(self) -> dict:
        """Plain JSON-safe dict (floats and None)."""
        return {k: (None if v is None else float(v)) for k, v in asdict(self).items()}


# Noise: second differences along an integer step; their white-noise gain is 6.
_STEPS = ((0, 1), (1, 2), (1, 1), (2, 1), (1, 0), (2, -1), (1, -1), (1, -2))
_SMOOTH = 2.0          # px, Gaussian of the flatness tests
_TRIM = 4.0            # trimmed second moment at 4 robust sigmas ...
_TRIM_KEEP = 1.0 - 2.0 * _TRIM * math.exp(-0.5 * _TRIM ** 2) / math.sqrt(2.0 * math.pi) / (
    math.erf(_TRIM / math.sqrt(2.0)))  # ... keeps this fraction of a Gaussian's variance
_CHI2_1, _CHI2_2 = 6.63, 9.21   # 99 % points of chi-square with 1 and 2 degrees of freedom
_MAX_SIDE = 1024       # frames are cropped to their centre for the estimate ...
_MAX_FRAMES = 8        # ... and at most this many (evenly spaced) are used ...
_MAX_PIXELS = 2 ** 21  # ... or fewer, to keep within this many pixels in all
_MIN_ANISOTROPY = 0.25  # below this the gradient energy is isotropic: no motion blur
_LAG_MIN = 2.5          # px: shorter lags are dominated by the derivative filter's noise
# Uncertainty of the noise-corrected gradient energy (pure noise must not read as blur): the
# variance of a mean of n squared second differences of white noise is about
# 2 * (1 + 2 * ((4/6)^2 + (1/6)^2)) = 3.9 var^2 / n (neighbours correlate), a little more
# after trimming; that of a mean of n squared central differences 2 * 1.5 (0.5 var)^2 / n.
_BIN_VAR_GAIN = 4.0
_GRAD_VAR_GAIN = 3.0
_MIN_STRUCTURE_Z = 5.0  # the larger eigenvalue of the gradient tensor must be this many SEs


def _second_difference(img: np.ndarray, step: tuple[int, int]) -> np.ndarray:
    """``img(p - step) - 2 img(p) + img(p + step)`` on the interior (2 px border dropped)."""
    dy, dx = step
    ny, nx = img.shape
    core = (slice(2, ny - 2), slice(2, nx - 2))
    def shifted(sy: int, sx: int) -> np.ndarray:
        return img[2 + sy:ny - 2 + sy, 2 + sx:nx - 2 + sx]
    return shifted(-dy, -dx) - 2.0 * img[core] + shifted(dy, dx)


def _impulse_energy(fn: Callable[[np.ndarray], np.ndarray]) -> float:
    """Sum of squares of the response of the linear filter ``fn`` to a unit impulse."""
    imp = np.zeros((41, 41))
    imp[20, 20] = 1.0
    return float((fn(imp) ** 2).sum())


def _gauss(img: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), _SMOOTH, borderType=cv2.BORDER_REFLECT)


def _mean_excluding(img: np.ndarray, step: tuple[int, int]) -> np.ndarray:
    """Local mean over the 5x5 neighbourhood less the three pixels of the second difference at
    ``step``, on the interior (2 px border dropped). With shot noise, a mean sharing their
    noise would correlate with the residual's variance and bias the fitted gain."""
    k = np.ones((5, 5))
    k[2, 2] = k[2 + step[0], 2 + step[1]] = k[2 - step[0], 2 - step[1]] = 0.0
    return cv2.filter2D(img, -1, k / k.sum(), borderType=cv2.BORDER_REFLECT)[2:-2, 2:-2]


def _central_gradient(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences ``(gx, gy)`` on the interior (1 px border dropped)."""
    gx = 0.5 * (img[1:-1, 2:] - img[1:-1, :-2])
    gy = 0.5 * (img[2:, 1:-1] - img[:-2, 1:-1])
    return gx, gy


def _trimmed_variance(r: np.ndarray) -> float:
    """Variance of zero-mean noise ``r`` robust to a minority of outliers."""
    s0 = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    if s0 <= 0:
        return float(np.mean(r * r))
    kept = r[np.abs(r) <= _TRIM * s0]
    return float(np.mean(kept * kept) / _TRIM_KEEP)


def _intensity_bins(values: np.ndarray, n_bins: int = 16) -> list[np.ndarray]:
    """Indices of ``values`` in equal-width bins between their 0.5 and 99.5 % quantiles,
    keeping bins with enough members (at least 1 % of all, 30 to 300). Equal widths, not
    equal counts: a large uniform region then fills one bin instead of spreading over many
    at nearly the same mean, which would pin the fitted slope."""
    lo, hi = np.quantile(values, [0.005, 0.995])
    idx = np.clip(((values - lo) / max(hi - lo, 1e-12) * n_bins).astype(int), 0, n_bins - 1)
    least = int(np.clip(values.size // 100, 30, 300))
    groups = [np.flatnonzero(idx == i) for i in range(n_bins)]
    return [g for g in groups if g.size >= least] or [np.arange(values.size)]


def _noise_model(stack: np.ndarray) -> tuple[float, float, bool, float]:
    """Fit ``noise variance = a * intensity + b`` (Foi-style) on the flat pixels of ``stack``.

    Residuals are second differences along the integer step with the least energy (for motion
    blurred data: along the motion, where the signal is smooth). A pixel counts as flat when
    the gradient of the Gaussian-smoothed image and the smoothed residual are both within
    their 99 % range for pure noise of the current model; flat pixels are binned by local
    mean (excluding the residual's own pixels), each bin's noise variance is a trimmed second
    moment, and the line is fitted by weighted least squares (three rounds, starting from a
    constant model). Returns ``(a, b, shot_noise, se)``: ``shot_noise`` says whether the slope
    is positive, significant (3 standard errors) and changes the variance by at least 10 %
    across the intensities seen; ``se`` is the standard error of the fitted variance at the
    stack's mean intensity (each bin's variance counted as ``_BIN_VAR_GAIN var^2 / n`` uncertain,
    or more if the bins scatter more about the line).
    """
    # trimmed second moments, not medians of squares: integer counts make those ties (so a
    # transposed burst could pick a different step)
    energies = [float(np.median([_trimmed_variance(_second_difference(f, s)) for f in stack]))
                for s in _STEPS]
    step = _STEPS[int(np.argmin(energies))]
    res, means, grad2, leak2 = [], [], [], []
    for f in stack:
        r = _second_difference(f, step)
        gx, gy = _central_gradient(_gauss(f))
        res.append(r.ravel())
        means.append(_mean_excluding(f, step).ravel())
        grad2.append((gx[1:-1, 1:-1] ** 2 + gy[1:-1, 1:-1] ** 2).ravel())
        leak2.append((_gauss(r) ** 2).ravel())
    r, m, g2, l2 = (np.concatenate(v) for v in (res, means, grad2, leak2))
    grad_gain = _impulse_energy(lambda a: _central_gradient(_gauss(a))[0])
    leak_gain = 6.0 * _impulse_energy(_gauss)
    a, b, significant = 0.0, _trimmed_variance(r) / 6.0, False
    se = b * math.sqrt(_BIN_VAR_GAIN / r.size)
    x_mean = float(m.mean())
    for _ in range(3):
        var = np.maximum(a * m + b, 1e-12 * max(abs(b), 1e-30))
        flat = (g2 < _CHI2_2 * grad_gain * var) & (l2 < _CHI2_1 * leak_gain * var)
        if flat.sum() < min(1000, r.size // 10):   # nothing looks flat: the quietest fifth
            flat = g2 <= np.quantile(g2, 0.2)
        rf, mf = r[flat], m[flat]
        groups = _intensity_bins(mf)
        bm = np.array([mf[g].mean() for g in groups])
        bv = np.array([_trimmed_variance(rf[g]) / 6.0 for g in groups])
        w = np.array([len(g) for g in groups]) / np.maximum(bv, 1e-30) ** 2
        if len(groups) < 3 or np.ptp(bm) <= 0:
            a, b, significant = 0.0, float(np.average(bv, weights=w)), False
            se = _constant_se(bv, w)
            continue
        design = np.stack([bm, np.ones_like(bm)], axis=1)
        cov = np.linalg.inv(design.T @ (design * w[:, None]))
        a, b = cov @ (design.T @ (w * bv))
        chi2 = float((w * (bv - design @ np.array([a, b])) ** 2).sum()) / (len(bm) - 2)
        # w = n / var^2 omits _BIN_VAR_GAIN; a scatter larger than that inflates the errors
        cov = cov * max(chi2, _BIN_VAR_GAIN)
        se_a = math.sqrt(cov[0, 0])
        v_mid = a * float(np.median(mf)) + b
        significant = bool(a > 3.0 * se_a and a * np.ptp(bm) > 0.1 * v_mid)
        at_mean = np.array([x_mean, 1.0])
        se = math.sqrt(max(float(at_mean @ cov @ at_mean), 0.0))
        if a <= 0:
            a, b, significant = 0.0, float(np.average(bv, weights=w)), False
            se = _constant_se(bv, w)
    return float(a), float(b), significant, float(se)


def _constant_se(bv: np.ndarray, w: np.ndarray) -> float:
    """Standard error of the weighted mean of bin variances ``bv`` (weights ``n / bv^2``)."""
    mean = float(np.average(bv, weights=w))
    scatter = float((w * (bv - mean) ** 2).sum()) / max(len(bv) - 1, 1)
    return math.sqrt(max(scatter, _BIN_VAR_GAIN) / float(w.sum()))


def _gradient_correlations(stack: np.ndarray, noise_var: float, lag: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-corrected auto-correlations of the central-difference gradients ``gx``, ``gy``
    and their symmetrised cross-correlation, for lags in ``[-lag, lag]^2``, averaged over the
    frames (each lag normalised by its overlap). Correlations ``sum_p u(p) v(p + t)`` are
    computed by FFT with zero padding."""
    acc = np.zeros((3, 2 * lag + 1, 2 * lag + 1))
    overlap = np.zeros((2 * lag + 1, 2 * lag + 1))
    t = np.abs(np.arange(-lag, lag + 1))
    for f in stack:
        gx, gy = _central_gradient(f)
        shape = tuple(scipy.fft.next_fast_len(n + lag + 1, real=True) for n in gx.shape)
        iy = np.arange(-lag, lag + 1) % shape[0]
        ix = np.arange(-lag, lag + 1) % shape[1]
        fx = scipy.fft.rfft2(gx - gx.mean(), shape)
        fy = scipy.fft.rfft2(gy - gy.mean(), shape)
        for i, spec in enumerate((fx.conj() * fx, fy.conj() * fy, fx.conj() * fy)):
            acc[i] += scipy.fft.irfft2(spec, shape)[np.ix_(iy, ix)]
        overlap += np.outer(gx.shape[0] - t, gx.shape[1] - t)
    acc /= overlap
    # white noise of variance s2 adds s2 * (autocorrelation of the difference kernels)
    hx = np.zeros((3, 3))
    hx[1, 0], hx[1, 2] = -0.5, 0.5
    for m, (h1, h2) in zip(acc, ((hx, hx), (hx.T, hx.T), (hx, hx.T))):
        m[lag - 2:lag + 3, lag - 2:lag + 3] -= noise_var * correlate2d(h2, h1)
    axx, ayy, axy = acc
    return axx, ayy, axy + axy[::-1, ::-1]


def _directional_profiles(maps: tuple[np.ndarray, np.ndarray, np.ndarray],
                          thetas: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """Auto-correlation of the derivative along each direction ``thetas`` (radians), at lags
    ``lags`` (px) along that direction: ``(len(thetas), len(lags))``."""
    axx, ayy, cross = maps
    centre = (axx.shape[0] - 1) / 2.0
    c, s = np.cos(thetas)[:, None], np.sin(thetas)[:, None]
    coords = np.stack([(centre + lags[None, :] * s).ravel(), (centre + lags[None, :] * c).ravel()])
    out = 0.0
    for weight, m in ((c * c, axx), (s * s, ayy), (c * s, cross)):
        out = out + weight * ndimage.map_coordinates(m, coords, order=1).reshape(
            len(thetas), len(lags))
    return out


def _fit_blur_length(lags: np.ndarray, profile: np.ndarray) -> float:
    """Blur length from the derivative auto-correlation along the motion.

    For a straight blur of length ``L`` the derivative along the motion is
    ``(I(s + L/2) - I(s - L/2)) / L``, so its auto-correlation is
    ``2 R(l) - R(l - L) - R(l + L)`` (up to scale) with ``R`` the sharp image's
    auto-covariance, a dip at ``l = L``. ``R`` is modelled as ``exp(-|l| / xi)``, and ``(L,
    xi)`` found by grid search (least squares, amplitude fitted in closed form) over lags
    ``>= 2.5`` px up to ``2 L + 3 xi``; this removes the bias of the plain minimum when
    ``L`` is close to the image's correlation length.
    """
    sel = lags >= _LAG_MIN
    x, y = lags[sel], profile[sel]

    def search(lengths: np.ndarray) -> tuple[float, float]:
        xis = np.geomspace(0.5, 40.0, 40)
        ll, xx_ = lengths[:, None, None], xis[None, :, None]
        model = (2.0 * np.exp(-x / xx_) - np.exp(-np.abs(x - ll) / xx_)
                 - np.exp(-(x + ll) / xx_))
        win = x[None, None, :] <= 2.0 * ll + 3.0 * xx_
        mm = np.where(win, model, 0.0)
        amp = (mm * y).sum(-1) / np.maximum((mm * mm).sum(-1), 1e-30)
        err = (np.where(win, y - amp[..., None] * model, 0.0) ** 2).sum(-1) / np.maximum(
            win.sum(-1), 1)
        err = np.where(amp > 0, err, np.inf)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        return float(lengths[i]), float(err[i, j])

    coarse, _ = search(np.arange(2.0, max(x[-1] / 1.5, 2.5), 0.25))
    fine, _ = search(np.arange(max(2.0, coarse - 0.25), coarse + 0.26, 0.05))
    return fine


def _structure_se(stack: np.ndarray, noise_var: float, noise_se: float) -> float:
    """Standard error of a noise-corrected gradient energy (one axis of the structure tensor)
    of ``stack``: the sampling error of the mean squared central difference plus the error
    of the noise variance subtracted from it (half of it, the central difference's gain)."""
    n = stack.shape[0] * (stack.shape[1] - 2) * (stack.shape[2] - 2)
    sampling = _GRAD_VAR_GAIN * (0.5 * noise_var) ** 2 / n
    return math.sqrt(sampling + (0.5 * noise_se) ** 2)


def _blur(stack: np.ndarray, noise_var: float, noise_se: float) -> tuple[float, float]:
    """(length px, angle deg) of the motion blur; length 0 if none is seen: when the scene's
    gradient energy (noise removed) is isotropic, or too weak to tell from the noise (its
    larger eigenvalue below ``_MIN_STRUCTURE_Z`` standard errors, see ``_structure_se``)."""
    lag = int(min(64, min(stack.shape[1:]) // 4))
    maps = _gradient_correlations(stack, noise_var, lag)
    axx, ayy, cross = maps
    tensor = np.array([[axx[lag, lag], 0.5 * cross[lag, lag]],
                       [0.5 * cross[lag, lag], ayy[lag, lag]]])
    evals, evecs = np.linalg.eigh(tensor)
    # direction of least gradient energy = the motion (the blur smooths along it)
    theta0 = math.atan2(evecs[1, 0], evecs[0, 0]) % math.pi
    if evals[1] <= _MIN_STRUCTURE_Z * _structure_se(stack, noise_var, noise_se):
        return 0.0, math.degrees(theta0)
    if 1.0 - max(evals[0], 0.0) / evals[1] < _MIN_ANISOTROPY:
        return 0.0, math.degrees(theta0)
    # the motion is where the derivative auto-correlation dips deepest relative to the
    # derivative's energy; that dip fades slowly and symmetrically away from the motion, so
    # take the centre of the basin of deep dips around the deepest one (seeded among the less
    # energetic half of the directions), weighted by depth
    lags = np.arange(0.0, lag - 1.0, 0.25)
    thetas = np.radians(np.arange(180.0))
    prof = _directional_profiles(maps, thetas, lags)
    energy = prof[:, 0]
    rel = prof[:, lags >= _LAG_MIN] / np.maximum(energy, 1e-30)[:, None]
    depth = ndimage.uniform_filter1d(rel.min(axis=1), 5, mode="wrap")
    seed = int(np.argmin(np.where(energy <= np.median(energy), depth, np.inf)))
    level = depth[seed] + 0.4 * (np.median(depth) - depth[seed])
    basin = [seed]
    for sign in (1, -1):
        k = 1
        while k < 90 and depth[(seed + sign * k) % 180] <= level:
            basin.append((seed + sign * k) % 180)
            k += 1
    basin = np.array(basin)
    doubled = np.sum((level - depth[basin] + 1e-12) * np.exp(2j * thetas[basin]))
    theta = (float(np.angle(doubled)) / 2.0) % math.pi
    best = int(round(math.degrees(theta))) % 180
    return _fit_blur_length(lags, prof[best]), math.degrees(theta)


def estimate_degradation(frames) -> DegradationEstimate:
    """Measure motion blur and noise on real data: a burst ``(T, Y, X)`` or one frame.

    * **Noise**: a Foi-style Poisson-Gaussian fit of noise variance against intensity on
      the flat pixels (see ``_noise_model``): ``var = gain * (intensity - offset)``. If the
      variance grows significantly with intensity, ``gain``, ``offset`` and ``dose = (mean -
      offset) / gain`` are reported (read noise counts as extra dose); otherwise those are
      None and the noise is treated as signal-independent. ``noise_sigma`` is the noise std
      at the mean intensity either way.
    * **Direction**: motion blur removes gradient energy along the motion. If the
      noise-corrected gradient structure tensor is nearly isotropic (anisotropy < 0.25) no
      motion blur is reported (``blur_length = 0``, angle of least energy). Otherwise the
      direction is where the derivative auto-correlation (1 deg steps) dips deepest
      relative to the derivative's energy, the blur's own signature (which sparse or
      oriented scene content biases less than it biases the tensor): the depth-weighted
      centre of the basin of deep dips.
    * **Length**: the auto-correlation of the derivative along the motion dips at the blur
      length (its frequency-domain twin is the periodic zeros of the blur's sinc); the dip is
      located by fitting a model (see ``_fit_blur_length``), with lags up to a quarter of the
      frame (at most 64 px).

    Assumes white noise (uncorrelated pixels) and a scene without a dominant orientation:
    strongly oriented structures (e.g. a line grating) read as blur. Frames are cropped to
    their central 1024 x 1024 px, and at most 8 evenly spaced frames (fewer for large
    frames: 2 of 1024 x 1024) are used. Does not register the frames: each contributes its
    own statistics. Takes about 0.1-2 s.

    Returns
    -------
    DegradationEstimate
    """
    stack = as_float_image(frames, "frames", ndim=(2, 3), min_size=_MIN_SIDE)
    stack = stack[None] if stack.ndim == 2 else stack
    ny, nx = stack.shape[1:]
    y0, x0 = max(0, (ny - _MAX_SIDE) // 2), max(0, (nx - _MAX_SIDE) // 2)
    stack = stack[:, y0:y0 + _MAX_SIDE, x0:x0 + _MAX_SIDE]
    n_use = min(stack.shape[0], _MAX_FRAMES,
                max(1, _MAX_PIXELS // (stack.shape[1] * stack.shape[2])))
    if n_use < stack.shape[0]:
        stack = stack[np.linspace(0, stack.shape[0] - 1, n_use).round().astype(int)]
    stack = stack.astype(np.float64)
    if np.ptp(stack) == 0:
        raise InputError("the frames are constant, so neither blur nor noise can be measured")
    mean = float(stack.mean())
    a, b, shot, noise_se = _noise_model(stack)
    noise_var = max(a * mean + b, 0.0)
    length, angle = _blur(stack, noise_var, noise_se)
    gain = offset = dose = None
    if shot:
        gain, offset = a, -b / a
        dose = (mean - offset) / gain
    return DegradationEstimate(blur_length=length, blur_angle=angle % 180.0,
                               noise_sigma=math.sqrt(noise_var), dose=dose, gain=gain,
                               offset=offset, mean_intensity=mean)


def degrade_probe(probe, estimate: Optional[DegradationEstimate] = None, *, n_frames: int = 5,
                  rng: RngLike = None, **simulate_kw) -> Burst:
    """Make a burst of ``probe`` that looks like the user's data.

    The probe (2-D, non-negative, e.g. from :func:`make_probe`) is padded by reflection so
    that the reference frame shows exactly the whole probe (``ground_truth`` is the probe on
    the data's intensity scale, same shape) and the other frames see it shifted along the
    motion, then :func:`~napari_microrestore.core.degrade.simulate_burst` applies:

    * the estimated blur (``blur_length``, ``blur_angle``; per-frame jitter as in
      ``simulate_burst``);
    * with shot noise (``estimate.dose`` not None): the probe scaled so its mean is
      ``dose`` counts, recorded with the estimated ``gain`` and ``offset`` (Poisson noise);
    * without (``dose`` None): the probe scaled to the data's mean intensity, plus Gaussian
      noise of std ``noise_sigma`` (``params["noise_model"] == "gaussian"``).

    Without an estimate, ``simulate_burst``'s defaults (a typical TEM stream) are used.
    ``simulate_kw`` (any ``simulate_burst`` keyword except ``shape`` and ``origin``)
    overrides these choices.
    """
    img = as_float_image(probe, "probe", min_size=8)
    if img.min() < 0:
        raise InputError(f"probe must be non-negative; got a minimum of {img.min():g}")
    n = as_int(n_frames, "n_frames", 1)
    params = inspect.signature(simulate_burst).parameters
    allowed = set(params) - {"image", "n_frames", "rng", "shape", "origin"}
    unknown = sorted(set(simulate_kw) - allowed)
    if unknown:
        raise InputError(f"degrade_probe takes no option {', '.join(unknown)}; the "
                         f"simulate_burst options allowed here are {', '.join(sorted(allowed))}")
    if estimate is not None and not isinstance(estimate, DegradationEstimate):
        raise InputError(f"estimate must be a DegradationEstimate or None; got "
                         f"{type(estimate).__name__}")
    gen = as_rng(rng)
    kw: dict = {}
    gaussian_sigma = 0.0
    if estimate is not None:
        kw.update(blur_length=float(estimate.blur_length), blur_angle=float(estimate.blur_angle))
        if estimate.dose is not None and estimate.gain is not None and estimate.dose > 0:
            kw.update(dose=float(estimate.dose), gain=float(estimate.gain),
                      offset=float(estimate.offset or 0.0))
        else:
            mean = float(estimate.mean_intensity)
            dose = mean if mean > 0 else 1.0
            kw.update(dose=dose, gain=1.0, offset=mean - dose, noise=False)
            gaussian_sigma = float(estimate.noise_sigma)
    kw.update(simulate_kw)

    # pad so that the whole motion path stays on the image (simulate_burst checks it)
    merged = {k: p.default for k, p in params.items()} | kw
    try:
        length_max = float(np.max(merged["blur_length"]))
        step_max = (1.1 * length_max if merged["step"] is None
                    else float(np.max(merged["step"])))
        jitter = float(merged["position_jitter"])
    except (TypeError, ValueError):
        raise InputError("blur_length, step and position_jitter must be numbers or (lo, hi) "
                         "ranges") from None
    margin = int(math.ceil(n * (abs(step_max) + 4.0 * abs(jitter)) + 1.1 * abs(length_max)
                           + 8.0))
    padded = np.pad(img, margin, mode="reflect")
    burst = simulate_burst(padded, n, shape=img.shape, origin=(margin, margin), rng=gen, **kw)
    if gaussian_sigma > 0 and "noise" not in simulate_kw:
        burst.frames = (burst.frames + gen.normal(0.0, gaussian_sigma, burst.frames.shape)
                        ).astype(np.float32)
        burst.params.update(noise=True, noise_model="gaussian", read_noise=gaussian_sigma)
    return burst


# --------------------------------------------------------------------------------------------
# invented structure
# --------------------------------------------------------------------------------------------
@dataclass
class InventedStructure:
    """What a restoration added that the truth does not have (see :func:`invented_structure`).

    All values are unit-free (invariant to the images' gain and offset).

    Attributes
    ----------
    score
        Headline: RMS of the *coherent* residual at frequencies the restoration has and the
        truth lacks, relative to the RMS contrast of the truth (``sqrt(invented power /
        truth power)``). 0 for a perfect, a blurred or a merely noisy restoration; 0.05
        means invented periodic structure (lines, grids, ringing) with 5 % of the truth's
        contrast.
    spectral_power
        ``score**2``: that power as a fraction of the truth's (mean-free) power.
    n_peaks
        Number of frequency bins counted as invented.
    peaks
        The strongest invented components, strongest first (at most 5): ``period`` (px),
        ``angle`` (degrees, direction of the intensity variation, from +x towards +y) and
        ``amplitude`` (RMS relative to the truth's, as ``score``).
    flat_rms
        RMS residual over the truth's flat regions relative to the truth's RMS contrast
        (noise and invented structure alike).
    structure_rms
        The same over the rest (edges, lines, spots), for comparison.
    flat_fraction
        Fraction of the measured pixels that count as flat.
    """

    score: float
    spectral_power: float
    n_peaks: int
    peaks: list
    flat_rms: float
    structure_rms: float
    flat_fraction: float

    def to_dict(self) -> dict:
        """Plain JSON-safe dict."""
        return asdict(self)


def _spectrum(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Fourier coefficients of the mean-free, windowed image (``fftshift``-ed, DC in the
    centre), scaled so that ``|F|**2`` is a periodogram (power per bin)."""
    w = (img - img.mean()) * window
    return np.fft.fftshift(np.fft.fft2(w)) / math.sqrt(float((window ** 2).sum()))


def invented_structure(restored, truth, *, mask=None, fit: bool = True,
                       peak_factor: float = 20.0, excess_factor: float = 4.0,
                       flat_threshold: float = 0.05, margin: int = 3
                       ) -> InventedStructure:
    """Measure the structure a restoration invented, against a known ground truth.

    The residual is ``r = restored - truth`` (after the least-squares gain + offset fit of
    :func:`~napari_microrestore.core.metrics.fit_gain_offset` when ``fit``, since a
    restoration cannot know the intensity calibration).

    **Spectral readout (the score).** Fourier coefficients (Hann window, mean removed) of
    ``r`` and the truth, and periodograms. A frequency bin holds *invented structure* when

    * the residual is coherent there: its power exceeds ``peak_factor`` times the local median
      of the residual spectrum (a 7 x 7 bin neighbourhood). Noise, white or coloured by the
      restoration, has an exponential periodogram, which exceeds 20 times its median in
      only 2**-20 of the bins; a line, a grid or ringing puts its power into a few bins;
    * the residual is *added* structure, not an error of the truth's own component at that
      frequency. Either the truth has (next to) nothing there (the residual's power exceeds
      ``excess_factor`` = 4 times the truth's largest power in the 3 x 3 bins around it), or
      the residual is neither in phase nor in anti-phase with the truth's component
      (``|cos phi| < 0.9``, ``phi`` the angle between the two Fourier coefficients) and the
      restoration has more power there than the truth by at least half the residual's
      (``P_restored > P_truth + P_residual / 2``). A truth component that the restoration
      lost or damped (anti-phase), amplified (in phase, e.g. after the gain fit of a blurred
      image) or shifted (no power gained) does not count: blur is not invention.

    Coherent structure added at a frequency where the truth is strong is caught only in
    part (its phase against the truth's is random); probes with sparse spectra
    (``lines-1d``, ``lines-2d``, ``siemens-star``) leave most of the spectrum free.

    The DC bin and its 5 x 5 neighbourhood are left out (residual illumination, the window's
    leakage). The score is ``sqrt(sum over those bins of (residual power - local median) /
    truth power)``: an RMS ratio, unit-free. A faint grid therefore scores far higher than
    white noise of the same energy, which spreads evenly over all bins.

    **Spatial readout.** The truth is *flat* where its gradient magnitude (after a 1 px
    Gaussian) is below ``flat_threshold`` of its largest gradient, more than ``margin`` px from
    any structure; ``flat_rms`` / ``structure_rms`` are the residual RMS there / elsewhere,
    relative to the truth's RMS contrast. It shows where the residual lives but does not tell
    noise from structure; the spectral score does.

    Parameters
    ----------
    restored, truth
        2-D images of the same shape (at least 32 x 32).
    mask
        Optional bool image: only these pixels count. The spectra are taken over the mask's
        bounding box, with the residual set to 0 outside the mask (as for pixels no frame
        covered).
    """
    from .metrics import fit_gain_offset

    res_img = as_float_image(restored, "restored", min_size=_MIN_SIDE).astype(np.float64)
    tru = as_float_image(truth, "truth", min_size=_MIN_SIDE).astype(np.float64)
    if res_img.shape != tru.shape:
        raise InputError(f"restored and truth must have the same shape; got {res_img.shape} "
                         f"and {tru.shape}")
    region = np.ones(tru.shape, bool) if mask is None else np.asarray(mask, bool)
    if region.shape != tru.shape:
        raise InputError(f"mask must have the images' shape {tru.shape}; got {region.shape}")
    if region.sum() < 64:
        raise InputError("the mask leaves fewer than 64 pixels to measure")
    if not (peak_factor > 1 and excess_factor >= 1 and 0 < flat_threshold < 1 and margin >= 0):
        raise InputError("peak_factor must be > 1, excess_factor >= 1, flat_threshold in "
                         "(0, 1) and margin >= 0")
    contrast = float(tru[region].std())
    if contrast == 0:
        raise InputError("the truth is constant over the measured region, so there is no "
                         "contrast to relate the residual to")
    if fit:
        gain, offset = fit_gain_offset(res_img, tru, mask=region)
        res_img = gain * res_img + offset
    resid = np.where(region, res_img - tru, 0.0)

    # spectral: coherent residual power where the truth has none, over the mask's bounding box
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    r_box, t_box = resid[box], tru[box]
    ny, nx = t_box.shape
    if min(ny, nx) < 16:
        raise InputError(f"the mask's bounding box ({ny} x {nx} px) is too small for a spectrum; "
                         f"it needs at least 16 x 16 px")
    window = np.outer(np.hanning(ny), np.hanning(nx))
    f_res, f_tru = _spectrum(r_box, window), _spectrum(t_box, window)
    p_res, p_tru = np.abs(f_res) ** 2, np.abs(f_tru) ** 2
    p_img = np.abs(f_tru + f_res) ** 2
    cos_phi = (f_tru.conj() * f_res).real / np.maximum(np.sqrt(p_tru * p_res), 1e-300)
    background = ndimage.median_filter(p_res, size=7, mode="wrap")
    truth_free = p_res > excess_factor * ndimage.maximum_filter(p_tru, size=3, mode="wrap")
    added = (np.abs(cos_phi) < 0.9) & (p_img > p_tru + 0.5 * p_res)
    cy, cx = ny // 2, nx // 2
    dc = np.zeros(p_res.shape, bool)
    dc[max(cy - 2, 0):cy + 3, max(cx - 2, 0):cx + 3] = True
    invented = (p_res > peak_factor * background) & (truth_free | added) & ~dc
    excess = np.where(invented, p_res - background, 0.0)
    total = float(p_tru.sum())
    power = float(excess.sum()) / max(total, 1e-300)
    # strongest peaks (one per conjugate pair: keep the upper half-plane)
    fy = (np.arange(ny) - cy) / ny
    fx = (np.arange(nx) - cx) / nx
    peaks = []
    upper = invented & ((fy[:, None] > 0) | ((fy[:, None] == 0) & (fx[None, :] > 0)))
    for i in np.argsort(excess[upper])[::-1][:5]:
        iy, ix = np.argwhere(upper)[i]
        f = math.hypot(fy[iy], fx[ix])
        peaks.append({"period": 1.0 / f, "angle": math.degrees(math.atan2(fy[iy], fx[ix])),
                      "amplitude": math.sqrt(2.0 * excess[iy, ix] / max(total, 1e-300))})

    # spatial: residual over the truth's flat regions and elsewhere
    smooth = ndimage.gaussian_filter(tru, 1.0)
    grad = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8.0
    structure = grad > flat_threshold * max(float(grad.max()), 1e-300)
    if margin:
        structure = ndimage.binary_dilation(structure, iterations=int(margin))
    flat = ~structure & region
    busy = structure & region

    def rms(sel: np.ndarray) -> float:
        return math.sqrt(float(np.mean(resid[sel] ** 2))) / contrast if sel.any() else 0.0

    return InventedStructure(score=math.sqrt(power), spectral_power=power,
                             n_peaks=int(invented.sum()), peaks=peaks, flat_rms=rms(flat),
                             structure_rms=rms(busy),
                             flat_fraction=float(flat.sum() / region.sum()))
