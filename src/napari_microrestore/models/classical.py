"""Classical burst restorations, offered in the same picker as the learned models.

All take a *registered* burst ``(T, Y, X)`` (float, counts) and return one ``(Y, X)`` float32
image in the same units:

* ``registered-mean``: the mean of the registered frames (noise down by sqrt(T), blur kept);
* ``richardson-lucy``: Richardson-Lucy deconvolution of that mean with the motion PSF
  estimated from the burst (:func:`napari_microrestore.core.probes.estimate_degradation`);
* ``wiener``: Wiener deconvolution of the mean with the same PSF, regularised by the noise
  level estimated from the data.

numpy / scipy only (FFT convolution with reflective padding, so edges do not ring).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..core import degrade, metrics, probes
from ..core.errors import CancelToken, InputError, ProgressCallback, check_cancel, report

METHODS = ("registered-mean", "richardson-lucy", "wiener")


def _check_burst(burst) -> np.ndarray:
    b = np.asarray(burst, dtype=np.float32)
    if b.ndim == 2:
        b = b[None]
    if b.ndim != 3:
        raise InputError(f"a classical burst method needs (T, Y, X) frames; got shape {b.shape}")
    if not np.isfinite(b).all():
        raise InputError("the burst contains NaN or infinite values")
    return b


def estimate_psf(burst: np.ndarray) -> tuple[np.ndarray, dict]:
    """Motion PSF of a (registered) burst, from its estimated blur length and direction."""
    est = probes.estimate_degradation(burst)
    psf = degrade.motion_psf(max(est.blur_length, 1.0), est.blur_angle)
    return psf, {"blur_length": est.blur_length, "blur_angle": est.blur_angle}


def _pad_for(psf: np.ndarray) -> int:
    return max(psf.shape) // 2 + 1


def _fft_conv(img: np.ndarray, otf: np.ndarray) -> np.ndarray:
    return np.fft.irfft2(np.fft.rfft2(img) * otf, s=img.shape)


def _otf(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Optical transfer function of a centred PSF for images of ``shape`` (circular)."""
    big = np.zeros(shape, np.float64)
    ky, kx = psf.shape
    big[:ky, :kx] = psf
    big = np.roll(big, (-(ky // 2), -(kx // 2)), axis=(0, 1))
    return np.fft.rfft2(big)


def richardson_lucy(image: np.ndarray, psf: np.ndarray, *, iterations: int = 20,
                    cancel: Optional[CancelToken] = None,
                    progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """Richardson-Lucy deconvolution (non-negative data, flux preserving)."""
    img = np.asarray(image, np.float64)
    offset = min(float(img.min()), 0.0)
    img = img - offset + 1e-6  # RL needs positive data
    pad = _pad_for(psf)
    padded = np.pad(img, pad, mode="reflect")
    otf = _otf(psf, padded.shape)
    otf_conj = np.conj(otf)
    est = np.full_like(padded, padded.mean())
    for i in range(iterations):
        check_cancel(cancel)
        blurred = np.maximum(_fft_conv(est, otf), 1e-12)
        est *= _fft_conv(padded / blurred, otf_conj)
        report(progress, (i + 1) / iterations, f"Richardson-Lucy {i + 1}/{iterations}")
    return (est[pad:-pad, pad:-pad] + offset - 1e-6).astype(np.float32)


def wiener(image: np.ndarray, psf: np.ndarray, *, balance: Optional[float] = None) -> np.ndarray:
    """Wiener (Tikhonov) deconvolution with a Laplacian regulariser.

    ``conj(H) / (|H|^2 + balance |L|^2)`` with ``L`` the discrete Laplacian's transfer function.
    When ``balance`` is None it is chosen by generalised cross-validation (Golub, Heath & Wahba
    1979), evaluated in closed form in the Fourier domain over a log grid: no tuning against
    the answer, no noise model needed.
    """
    img = np.asarray(image, np.float64)
    mean = img.mean()
    lap = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
    pad = _pad_for(psf)
    padded = np.pad(img - mean, pad, mode="reflect")
    otf = _otf(psf, padded.shape)
    h2 = np.abs(otf) ** 2
    l2 = np.abs(_otf(lap, padded.shape)) ** 2
    spec = np.fft.rfft2(padded)
    if balance is None:
        y2 = np.abs(spec) ** 2
        best = None
        for lam in np.logspace(-6, 1, 36):
            one_minus_a = (lam * l2) / (h2 + lam * l2 + 1e-12)
            gcv = float((one_minus_a ** 2 * y2).sum()) / float(one_minus_a.sum()) ** 2
            if best is None or gcv < best[0]:
                best = (gcv, lam)
        balance = float(best[1])
    filt = np.conj(otf) / (h2 + balance * l2 + 1e-12)
    out = np.fft.irfft2(spec * filt, s=padded.shape)[pad:-pad, pad:-pad] + mean
    return out.astype(np.float32)


def restore_classical(method: str, burst, *, iterations: int = 20, balance: Optional[float] = None,
                      psf: Optional[np.ndarray] = None,
                      progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, dict]:
    """Run a classical method on a registered burst; returns (image, parameters used)."""
    if method not in METHODS:
        raise InputError(f"unknown classical method {method!r}; known: {', '.join(METHODS)}")
    b = _check_burst(burst)
    mean = b.mean(0)
    if method == "registered-mean":
        return mean.astype(np.float32), {"frames": int(b.shape[0])}
    info: dict = {"frames": int(b.shape[0])}
    if psf is None:
        psf, est = estimate_psf(b)
        info.update(est)
    check_cancel(cancel)
    if method == "richardson-lucy":
        info["iterations"] = iterations
        return richardson_lucy(mean, psf, iterations=iterations, cancel=cancel,
                               progress=progress), info
    out = wiener(mean, psf, balance=balance)
    info["balance"] = balance
    return out, info

