"""Classical burst restorations, offered in the same picker as the learned models.

All take a *registered* burst ``(T, Y, X)`` (float, counts) and return one ``(Y, X)`` float32
image in the same units:

* ``registered-mean``: the mean of the registered frames (noise down by sqrt(T), blur kept);
* ``richardson-lucy``: Richardson-Lucy deconvolution of that mean (``RL_ITERATIONS``
  iterations) with the motion PSF estimated from the burst
  (:func:`napari_microrestore.core.probes.estimate_degradation`);
* ``wiener``: Wiener deconvolution of the mean with the same PSF, its regularisation chosen
  by generalised cross-validation on one frame as recorded, divided by the number of frames
  averaged.

The PSF and the Wiener balance are measured on the frames *as recorded*
(``restore_classical(..., recorded=)``), not on the registered ones: a registration's
sub-pixel warp interpolates, which smooths the noise. The blur estimator and GCV assume white
noise; on warped frames the first reads most blurred bursts as unblurred and the second
under-regularises. When less than ``MIN_BLUR`` px of blur is measured there is nothing to
undo and both deconvolutions return the registered mean (``info["deconvolved"]`` is False):
sharpening noise with a one-pixel PSF only amplifies it.

numpy / scipy only (FFT convolution with reflective padding, so edges do not ring).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..core import degrade, probes
from ..core.errors import CancelToken, InputError, ProgressCallback, check_cancel, report

METHODS = ("registered-mean", "richardson-lucy", "wiener")

# Richardson-Lucy iterations: RL amplifies the noise as it goes. Chosen on the zoo's burst
# protocol (doses 12-80 counts/px, 6-14 px of blur, PSF estimated), where 10 and 20 iterations
# gained less on average than 5 and lost against the registered mean on some bursts; data of
# higher dose bear more (``iterations=``)
RL_ITERATIONS = 5
# less measured blur (px) than this is not deconvolved: the estimator reads up to ~3 px on
# unblurred bursts of some scenes, and undoing a few px of blur gains little against the noise
MIN_BLUR = 4.0


def _check_burst(burst) -> np.ndarray:
    b = np.asarray(burst, dtype=np.float32)
    if b.ndim == 2:
        b = b[None]
    if b.ndim != 3:
        raise InputError(f"a classical burst method needs (T, Y, X) frames; got shape {b.shape}")
    if not np.isfinite(b).all():
        raise InputError("the burst contains NaN or infinite values")
    return b


def estimate_psf(frames: np.ndarray) -> tuple[Optional[np.ndarray], dict]:
    """Motion PSF of a burst ``(T, Y, X)`` (or one frame), from its estimated blur length and
    direction; None when less than ``MIN_BLUR`` px of blur is found.

    Pass frames as recorded: warped (registered) frames have smoothed noise, which the
    estimator, assuming white noise, mistakes for the absence of blur.
    """
    est = probes.estimate_degradation(frames)
    info = {"blur_length": round(float(est.blur_length), 2),
            "blur_angle": round(float(est.blur_angle), 2)}
    if est.blur_length < MIN_BLUR:
        return None, info
    return degrade.motion_psf(est.blur_length, est.blur_angle), info


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


def richardson_lucy(image: np.ndarray, psf: np.ndarray, *, iterations: int = RL_ITERATIONS,
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


_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
# the log grid of Wiener balances that GCV searches (0.2 decades apart)
_BALANCES = np.logspace(-6, 2, 41)
# GCV reads its balance on at most this central crop (px a side): the balance is a
# per-frequency noise-to-signal ratio, independent of the image's size
_GCV_CROP = 1024


def _wiener_setup(image: np.ndarray, psf: np.ndarray):
    img = np.asarray(image, np.float64)
    mean = img.mean()
    pad = _pad_for(psf)
    padded = np.pad(img - mean, pad, mode="reflect")
    otf = _otf(psf, padded.shape)
    return mean, pad, padded, otf, np.abs(otf) ** 2, np.abs(_otf(_LAPLACIAN, padded.shape)) ** 2


def gcv_balance(image: np.ndarray, psf: np.ndarray) -> float:
    """The Wiener balance that generalised cross-validation picks for ``image`` (Golub, Heath
    & Wahba 1979; closed form in the Fourier domain over a log grid, no noise model needed).

    GCV assumes white noise. Give it a frame as recorded: on a registered (warped) frame, or
    the mean of several, the smoothed noise passes for signal and GCV under-regularises (on
    the zoo's bursts, often by more than a decade, and the result loses against the
    registered mean).
    """
    img = np.asarray(image, np.float64)
    ny, nx = img.shape
    y0, x0 = max(0, (ny - _GCV_CROP) // 2), max(0, (nx - _GCV_CROP) // 2)
    _, _, padded, _, h2, l2 = _wiener_setup(img[y0:y0 + _GCV_CROP, x0:x0 + _GCV_CROP], psf)
    y2 = np.abs(np.fft.rfft2(padded)) ** 2
    best = None
    for lam in _BALANCES:
        one_minus_a = (lam * l2) / (h2 + lam * l2 + 1e-12)
        gcv = float((one_minus_a ** 2 * y2).sum()) / float(one_minus_a.sum()) ** 2
        if best is None or gcv < best[0]:
            best = (gcv, float(lam))
    return best[1]


def wiener(image: np.ndarray, psf: np.ndarray, *, balance: Optional[float] = None) -> np.ndarray:
    """Wiener (Tikhonov) deconvolution with a Laplacian regulariser.

    ``conj(H) / (|H|^2 + balance |L|^2)`` with ``L`` the discrete Laplacian's transfer function.
    When ``balance`` is None it is chosen on ``image`` itself by :func:`gcv_balance` (right
    for a frame with white noise; for the mean of registered frames, see
    :func:`restore_classical`).
    """
    if balance is None:
        balance = gcv_balance(image, psf)
    mean, pad, padded, otf, h2, l2 = _wiener_setup(image, psf)
    filt = np.conj(otf) / (h2 + float(balance) * l2 + 1e-12)
    out = np.fft.irfft2(np.fft.rfft2(padded) * filt, s=padded.shape)[pad:-pad, pad:-pad] + mean
    return out.astype(np.float32)


def restore_classical(method: str, burst, *, recorded=None, iterations: int = RL_ITERATIONS,
                      balance: Optional[float] = None, psf: Optional[np.ndarray] = None,
                      progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, dict]:
    """Run a classical method on a registered burst; returns (image, parameters used).

    Parameters
    ----------
    method
        One of ``METHODS``.
    burst
        The registered burst ``(T, Y, X)`` (or one image).
    recorded
        The frames as recorded (before registration), on which the PSF and the Wiener
        balance are measured; default ``burst`` itself (right when it was not warped).
    iterations, balance
        Richardson-Lucy iterations; Wiener balance. None: GCV on one frame as recorded,
        divided by the number of frames averaged (the mean's noise variance is that much
        lower; :func:`gcv_balance` says why not GCV on the mean itself).
    psf
        A known PSF (odd sides, sum 1) instead of the measured one.

    The returned ``info`` has ``frames``, ``deconvolved`` (False when no blur of at least
    ``MIN_BLUR`` px was measured: the registered mean is returned), the measured
    ``blur_length`` / ``blur_angle``, and ``iterations`` or ``balance``.
    """
    if method not in METHODS:
        raise InputError(f"unknown classical method {method!r}; known: {', '.join(METHODS)}")
    b = _check_burst(burst)
    mean = b.mean(0)
    if method == "registered-mean":
        return mean.astype(np.float32), {"frames": int(b.shape[0])}
    info: dict = {"frames": int(b.shape[0])}
    measured = b if recorded is None else _check_burst(recorded)
    if psf is None:
        psf, est = estimate_psf(measured)
        info.update(est)
        if psf is None:
            info["deconvolved"] = False
            info["note"] = (f"no motion blur of at least {MIN_BLUR:g} px measured: "
                            "the registered mean, not deconvolved")
            report(progress, 1.0, info["note"])
            return mean.astype(np.float32), info
    info["deconvolved"] = True
    check_cancel(cancel)
    if method == "richardson-lucy":
        info["iterations"] = int(iterations)
        return richardson_lucy(mean, psf, iterations=iterations, cancel=cancel,
                               progress=progress), info
    if balance is None:
        balance = gcv_balance(measured[len(measured) // 2], psf) / b.shape[0]
        info["balance_from"] = "GCV on a recorded frame / frames averaged"
    info["balance"] = float(balance)
    return wiener(mean, psf, balance=balance), info
