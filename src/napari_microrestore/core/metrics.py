"""Image quality metrics: PSNR, SSIM, PCC against a reference, and no-reference estimates.

Conventions
-----------
* All metrics take ``(image, reference)``: ``image`` is the one being judged, ``reference``
  the ground truth. They are computed in float64 and returned as Python floats.
* ``data_range`` defaults to the dynamic range of the *reference* (``max - min``), so a
  restoration of 16-bit counts is scored in counts, not after a silent 0-1 normalisation.
* ``mask`` (bool, same shape) restricts the score to a region, e.g. the region that every
  frame of a registered burst covers. ``border`` ignores that many pixels on every side.
* SSIM is the Gaussian-window SSIM of Wang et al. 2004 and agrees with
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=...)`` (tested to 1e-4); ``ssim_torch`` is the
  same quantity as a differentiable torch function, for losses.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np
from scipy import ndimage

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Wang et al. 2004 constants, as in scikit-image
_K1, _K2 = 0.01, 0.03
_SIGMA = 1.5
_TRUNCATE = 3.5
_RADIUS = int(_TRUNCATE * _SIGMA + 0.5)  # 5: an 11x11 window, as skimage's win_size


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _as_image(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D image (Y, X); got an array of shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(f"{name} must be a real-valued numeric image; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return arr


def _pair(image, reference) -> tuple[np.ndarray, np.ndarray]:
    img = _as_image(image, "image")
    ref = _as_image(reference, "reference")
    if img.shape != ref.shape:
        raise InputError(
            f"image and reference must have the same shape; got {img.shape} and {ref.shape}"
        )
    return img, ref


def _region(shape: tuple[int, int], mask, border: int) -> np.ndarray:
    """Bool array of the pixels that count: ``mask`` minus a ``border``-wide frame."""
    if border < 0:
        raise InputError(f"border must be >= 0 pixels; got {border}")
    region = np.ones(shape, bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != tuple(shape):
            raise InputError(f"mask must have the image's shape {tuple(shape)}; got {m.shape}")
        region &= m.astype(bool)
    if border:
        if 2 * border >= min(shape):
            raise InputError(f"border of {border} px leaves nothing of a {shape} image")
        frame = np.zeros(shape, bool)
        frame[border:-border, border:-border] = True
        region &= frame
    if not region.any():
        raise InputError("the mask (and border) leave no pixel to measure")
    return region


def _data_range(ref: np.ndarray, region: np.ndarray, data_range: Optional[float]) -> float:
    if data_range is None:
        vals = ref[region]
        data_range = float(vals.max() - vals.min())
        if data_range == 0:
            raise InputError(
                "the reference is constant, so its data range is 0: pass data_range explicitly"
            )
    elif not (data_range > 0 and math.isfinite(data_range)):
        raise InputError(f"data_range must be a positive finite number; got {data_range}")
    return float(data_range)


# --------------------------------------------------------------------------------------------
# full-reference metrics
# --------------------------------------------------------------------------------------------
def psnr(image, reference, *, data_range: Optional[float] = None, mask=None,
         border: int = 0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range**2 / MSE)``.

    Returns ``inf`` for identical images.
    """
    img, ref = _pair(image, reference)
    region = _region(img.shape, mask, border)
    rng = _data_range(ref, region, data_range)
    mse = float(np.mean((img[region] - ref[region]) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(rng * rng / mse)


def pcc(image, reference, *, mask=None, border: int = 0) -> float:
    """Pearson correlation coefficient between the two images (over ``mask``), in [-1, 1]."""
    img, ref = _pair(image, reference)
    region = _region(img.shape, mask, border)
    a = img[region] - img[region].mean()
    b = ref[region] - ref[region].mean()
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    if den == 0:
        raise InputError("PCC is undefined when an image is constant over the measured region")
    return float(np.dot(a, b) / den)


def ssim_map(image, reference, *, data_range: Optional[float] = None) -> np.ndarray:
    """Per-pixel SSIM (Gaussian window, sigma 1.5), the map whose mean :func:`ssim` reports.

    The outer 5 pixels depend on the (reflecting) boundary handling; :func:`ssim` leaves them
    out, as scikit-image does.
    """
    img, ref = _pair(image, reference)
    rng = _data_range(ref, np.ones(ref.shape, bool), data_range)
    return _ssim_map(img, ref, rng)


def _ssim_map(img: np.ndarray, ref: np.ndarray, data_range: float) -> np.ndarray:
    if min(img.shape) < 2 * _RADIUS + 1:
        raise InputError(
            f"SSIM needs images of at least {2 * _RADIUS + 1}x{2 * _RADIUS + 1} pixels; "
            f"got {img.shape}"
        )

    def filt(a):
        return ndimage.gaussian_filter(a, sigma=_SIGMA, truncate=_TRUNCATE, mode="reflect")

    ux, uy = filt(img), filt(ref)
    uxx, uyy, uxy = filt(img * img), filt(ref * ref), filt(img * ref)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def ssim(image, reference, *, data_range: Optional[float] = None, mask=None,
         border: int = 0) -> float:
    """Mean structural similarity (Gaussian window, sigma 1.5, population covariance).

    Without ``mask``/``border`` this equals scikit-image's ``structural_similarity`` with
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``: the mean of the SSIM
    map over all pixels at least 5 px from the edge. With a mask, the mean over the mask
    within that interior.
    """
    img, ref = _pair(image, reference)
    region = _region(img.shape, mask, border)
    rng = _data_range(ref, region, data_range)
    smap = _ssim_map(img, ref, rng)
    interior = np.zeros(img.shape, bool)
    interior[_RADIUS:-_RADIUS, _RADIUS:-_RADIUS] = True
    region = region & interior
    if not region.any():
        raise InputError("the mask leaves no pixel at least 5 px away from the image edge")
    return float(smap[region].mean(dtype=np.float64))


def fit_gain_offset(image, reference, *, mask=None, border: int = 0) -> tuple[float, float]:
    """Least-squares ``(gain, offset)`` such that ``gain * image + offset ~= reference``.

    Scoring after this fit judges structure rather than a global intensity calibration,
    which a restoration cannot know (the evaluation protocol of the model zoo).
    """
    img, ref = _pair(image, reference)
    region = _region(img.shape, mask, border)
    x, y = img[region], ref[region]
    xm, ym = x.mean(), y.mean()
    var = float(np.dot(x - xm, x - xm))
    if var == 0:
        return 0.0, float(ym)
    gain = float(np.dot(x - xm, y - ym) / var)
    return gain, float(ym - gain * xm)


def compare(image, reference, *, mask=None, border: int = 0, fit: bool = False,
            data_range: Optional[float] = None) -> dict:
    """PSNR, SSIM and PCC of ``image`` against ``reference`` in one dict.

    ``fit=True`` first maps ``image`` by the best gain + offset (see :func:`fit_gain_offset`);
    the dict then also holds ``gain`` and ``offset``.
    """
    img, ref = _pair(image, reference)
    out: dict = {}
    if fit:
        gain, offset = fit_gain_offset(img, ref, mask=mask, border=border)
        img = gain * img + offset
        out.update(gain=gain, offset=offset)
    out["psnr"] = psnr(img, ref, data_range=data_range, mask=mask, border=border)
    out["ssim"] = ssim(img, ref, data_range=data_range, mask=mask, border=border)
    out["pcc"] = pcc(img, ref, mask=mask, border=border)
    return out


# --------------------------------------------------------------------------------------------
# differentiable SSIM for losses
# --------------------------------------------------------------------------------------------
def _gauss_1d(torch, dtype, device):
    x = torch.arange(-_RADIUS, _RADIUS + 1, dtype=dtype, device=device)
    g = torch.exp(-(x * x) / (2 * _SIGMA * _SIGMA))
    return g / g.sum()


def ssim_torch(image: "torch.Tensor", reference: "torch.Tensor", *,
               data_range: float | "torch.Tensor" = 1.0, reduction: str = "mean"):
    """Differentiable SSIM of (N, C, H, W) tensors, the same quantity as :func:`ssim`.

    The Gaussian window is applied without padding, so the result covers exactly the interior
    that :func:`ssim` averages. ``data_range`` may be a tensor of shape (N,) for per-sample
    ranges. ``reduction``: ``"mean"`` (a scalar), ``"none"`` (per sample, shape (N,)).
    A loss is ``1 - ssim_torch(pred, target)``.
    """
    import torch
    import torch.nn.functional as F

    if image.shape != reference.shape or image.dim() != 4:
        raise InputError(
            "ssim_torch needs two (N, C, H, W) tensors of the same shape; got "
            f"{tuple(image.shape)} and {tuple(reference.shape)}"
        )
    n, c, h, w = image.shape
    if min(h, w) < 2 * _RADIUS + 1:
        raise InputError(f"ssim_torch needs at least 11x11 pixels; got {h}x{w}")
    g = _gauss_1d(torch, image.dtype, image.device)
    gy = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    gx = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def filt(t):
        return F.conv2d(F.conv2d(t, gy, groups=c), gx, groups=c)

    ux, uy = filt(image), filt(reference)
    vx = filt(image * image) - ux * ux
    vy = filt(reference * reference) - uy * uy
    vxy = filt(image * reference) - ux * uy
    dr = torch.as_tensor(data_range, dtype=image.dtype, device=image.device)
    if dr.dim() == 1:
        dr = dr.view(-1, 1, 1, 1)
    c1, c2 = (_K1 * dr) ** 2, (_K2 * dr) ** 2
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_sample = smap.flatten(1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise InputError(f"reduction must be 'mean' or 'none'; got {reduction!r}")


# --------------------------------------------------------------------------------------------
# no-reference estimates
# --------------------------------------------------------------------------------------------
# Immerkaer's mask: the difference of two Laplacians, blind to planes and (mostly) edges
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def noise_sigma(image, *, mask=None) -> float:
    """Standard deviation of additive white noise, estimated without a reference.

    Immerkaer (1996) fast noise variance estimation, made robust: the image is filtered with
    the mask ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` (which cancels any locally planar signal; white
    noise of std ``s`` comes out with std ``6 s``), and the median absolute response (instead of
    the mean) over the flattest 50 % of the image (ranked by local gradient) keeps edges and
    texture from counting as noise. For Poisson noise this is the noise at a typical
    intensity. In the image's units.
    """
    img = _as_image(image, "image")
    if min(img.shape) < 8:
        raise InputError(f"noise estimation needs at least 8x8 pixels; got {img.shape}")
    resp = ndimage.convolve(img, _IMMERKAER, mode="reflect")[1:-1, 1:-1]
    grad = np.hypot(ndimage.sobel(img, 0), ndimage.sobel(img, 1))[1:-1, 1:-1]
    region = _region(img.shape, mask, 0)[1:-1, 1:-1]
    if not region.any():
        raise InputError("the mask leaves no pixel at least 1 px away from the image edge")
    flat = grad[region] <= np.median(grad[region])
    r = np.abs(resp[region][flat])
    # the response of N(0, s^2) noise is N(0, 36 s^2); median |N(0, 1)| = 0.6745
    return float(np.median(r) / (0.6744897501960817 * 6.0))


def sharpness(image, *, mask=None, noise: Optional[float] = None) -> float:
    """No-reference sharpness: noise-corrected RMS gradient relative to the signal contrast.

    ``sqrt(max(E|grad I|^2 - 4 s^2, 0)) / sqrt(max(var I - s^2, eps))`` with forward
    differences, where ``s`` is the noise std (estimated by :func:`noise_sigma` unless given):
    white noise adds ``2 s^2`` per direction to the squared gradient and ``s^2`` to the variance,
    so the estimate measures the signal's own edges, not the noise. Units 1/px; invariant to
    gain and offset; higher is sharper. Useful to compare restorations of the same scene when
    no reference exists.
    """
    img = _as_image(image, "image")
    s = noise_sigma(img, mask=mask) if noise is None else float(noise)
    gy = np.diff(img, axis=0)[:, :-1]
    gx = np.diff(img, axis=1)[:-1, :]
    g2 = gy * gy + gx * gx
    core = img[:-1, :-1]
    if mask is not None:
        m = _region(img.shape, mask, 0)[:-1, :-1]
        g2, core = g2[m], core[m]
    signal_var = max(float(core.var()) - s * s, 1e-12 * max(float(core.var()), 1e-30))
    grad = max(float(g2.mean()) - 4.0 * s * s, 0.0)
    return math.sqrt(grad / signal_var)


def no_reference(image, *, mask=None) -> dict:
    """No-reference readouts: ``noise`` (std, image units), ``sharpness`` (1/px) and
    ``snr`` (signal std / noise std)."""
    img = _as_image(image, "image")
    s = noise_sigma(img, mask=mask)
    vals = img if mask is None else img[_region(img.shape, mask, 0)]
    sig = math.sqrt(max(float(vals.var()) - s * s, 0.0))
    return {
        "noise": s,
        "sharpness": sharpness(img, mask=mask, noise=s),
        "snr": sig / s if s > 0 else math.inf,
    }
