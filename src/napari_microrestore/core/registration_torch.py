"""Burst registration in torch, batched over frames, on any device (a GPU for live streams).

A port of :func:`~napari_microrestore.core.registration.register_burst` for translation
motion, with the same steps, constants and conventions, written so that a whole burst is
registered by a fixed sequence of batched tensor operations:

1. every frame is pre-filtered by the same Gaussian (``cv2.getGaussianKernel`` taps, reflect-101
   borders like ``cv2.GaussianBlur``) and reduced to a pyramid (the ``cv2.pyrDown`` kernel);
2. the coarse translation comes from phase correlation on the coarsest level (OpenCV's Hann
   window, whitened cross-power spectrum weighted by the Gaussian the level went through,
   integer peak then an upsampled DFT to 1/10 px);
3. ECC (the iteration of ``cv2.findTransformECC``: zero-mean images over the warped frame's
   mask, illumination factor lambda, Gauss-Newton update) refines it level by level, coarse to
   ``finest``, with a FIXED number of iterations per level; a frame whose correlation changes by
   less than ``eps`` is frozen by a mask, so the answer is OpenCV's stopping rule while the
   work stays static (no host synchronisation, CUDA-graph friendly);
4. Gauss-Newton steps of the ECC objective polish it at full resolution (the reference's
   gradients serve every frame; the same stopping rules as core, applied by masks);
5. frames are warped with ``grid_sample`` (bilinear, edge replicated) and scored.

Every result stays on the device; :meth:`TorchRegistration.to_numpy` turns it into core's
:class:`~napari_microrestore.core.registration.RegistrationResult`.

Per-frame work does not depend on the reference (pre-filter, pyramid, image gradients, the
windowed and whitened spectrum of the coarsest level: a whitened cross-power spectrum is the
product of the two whitened spectra). :class:`FrameFeatures` holds it, so a stream registers
each new window by computing the NEW frame's features only (:class:`StreamRegistrar`), then
the cross-power spectra and the ECC / polish iterations of the window's frame pairs.

Conventions are core's: a frame's 2x3 transform maps reference pixel coordinates ``(x, y, 1)``
(pixel centres on integers) to the frame, ``frame(y + dy, x + dx) ~ reference(y, x)`` with
``A = [[1, 0, dx], [0, 1, dy]]``. Differences from core, all below 0.01 px on test bursts:
OpenCV quantises interpolation positions to 1/32 px and ``grid_sample`` does not; sums are
float32 products accumulated in float64.

torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import cv2
import numpy as np

from .errors import InputError
from .registration import (
    _FINEST,
    _HESSIAN_STRIDE,
    _MIN_OVERLAP,
    _POLISH_STEPS,
    _POLISH_TOL,
    MIN_FRAME_SIZE,
    RegistrationResult,
    _auto_levels,
    prefilter_sigma,
)

if TYPE_CHECKING:
    import torch

# ECC iterations per pyramid level. Translation ECC converges in 3-6 iterations from the
# phase-correlation start; frames that converge earlier are frozen, so extra ones only cost time.
ECC_ITERATIONS = 10
# sub-pixel factor of the phase-correlation peak, as core's phase_correlation default
_UPSAMPLE = 10

# failure codes of TorchRegistration.failure
_OK, _ECC_FAILED, _NON_FINITE, _LOST, _LOW_ECC = 0, 1, 2, 3, 4


# ------------------------------------------------------------------------------ small helpers
def _sep_filter(x: torch.Tensor, taps: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Separable filter of ``(B, C, H, W)`` with reflect-101 borders (OpenCV's default), then
    every ``stride``-th pixel from the first (``cv2.pyrDown`` keeps even pixels)."""
    import torch.nn.functional as F

    b, c, h, w = x.shape
    k = taps.numel()
    r = k // 2
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), taps.view(1, 1, 1, k),
                 stride=(1, stride))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), taps.view(1, 1, k, 1),
                 stride=(stride, 1))
    return y.reshape(b, c, y.shape[-2], y.shape[-1])


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences ``0.5 (x[i+1] - x[i-1])`` of ``(B, 1, H, W)`` with reflect-101
    borders (zero at the edges): ``cv2.Sobel(ksize=1, scale=0.5)`` and ECC's ``[-0.5, 0, 0.5]``."""
    import torch.nn.functional as F

    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    gx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
    gy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
    return gx, gy


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-batch sums of ``a * b`` over the last two axes, accumulated in float64."""
    import torch

    return (a * b).sum(dim=(-2, -1), dtype=torch.float64)


def _theta(transforms: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``affine_grid`` thetas (normalised coordinates, ``align_corners=True``) of 2x3 pixel
    transforms: ``N A N^-1`` with ``N`` mapping pixel ``[0, n - 1]`` to ``[-1, 1]``."""
    import torch

    a = transforms.to(torch.float64)
    sx, sy = 2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)
    lin = a[:, :, :2].clone()
    lin[:, 0, 1] *= sx / sy
    lin[:, 1, 0] *= sy / sx
    # N A N^-1 (p) = N (A (N^-1 p)); N^-1 q = (q + 1) / s
    shift = torch.stack([
        sx * (a[:, 0, 0] / sx + a[:, 0, 1] / sy + a[:, 0, 2]) - 1.0,
        sy * (a[:, 1, 0] / sx + a[:, 1, 1] / sy + a[:, 1, 2]) - 1.0,
    ], dim=1)
    return torch.cat([lin, shift[:, :, None]], dim=2).to(torch.float32)


def _warp(x: torch.Tensor, transforms: torch.Tensor, padding: str) -> torch.Tensor:
    """``(B, C, H, W)`` images resampled on the reference grid: ``out(p) = x(A p)``, bilinear;
    ``padding`` ``"border"`` replicates edges (core's BORDER_REPLICATE), ``"zeros"`` is
    OpenCV's default constant border of ECC."""
    import torch.nn.functional as F

    b, c, h, w = x.shape
    grid = F.affine_grid(_theta(transforms, h, w), [b, c, h, w], align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def _translations(t: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` ``(dx, dy)`` -> ``(B, 2, 3)`` translation transforms."""
    import torch

    a = torch.zeros(t.shape[0], 2, 3, dtype=t.dtype, device=t.device)
    a[:, 0, 0] = 1.0
    a[:, 1, 1] = 1.0
    a[:, :, 2] = t
    return a


def _interval(offset: torch.Tensor, n: int, lo: float, hi: float) -> torch.Tensor:
    """``(B, n)`` bool: pixels ``i`` with ``lo <= i + offset <= hi`` (offset ``(B,)``)."""
    import torch

    pos = torch.arange(n, device=offset.device, dtype=torch.float64)[None] + offset[:, None]
    return (pos >= lo) & (pos <= hi)


def _covered(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, 1, H, W)`` float mask of core's ``_covered`` for translations ``t`` (``(B, 2)``
    ``(dx, dy)``): source position inside ``[0, X - 1] x [0, Y - 1]`` (1e-6 px tolerance)."""
    cols = _interval(t[:, 0], w, -1e-6, w - 1 + 1e-6)
    rows = _interval(t[:, 1], h, -1e-6, h - 1 + 1e-6)
    return (rows[:, None, :, None] & cols[:, None, None, :]).float()


def _nearest_mask(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, 1, H, W)`` float mask of ``warpAffine(ones, INTER_NEAREST)``, ECC's image mask:
    the nearest source pixel ``floor(p + t + 0.5)`` lies inside the frame."""
    cols = _interval(t[:, 0], w, -0.5, w - 0.5 - 1e-9)
    rows = _interval(t[:, 1], h, -0.5, h - 0.5 - 1e-9)
    return (rows[:, None, :, None] & cols[:, None, None, :]).float()


def _solve2(h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solutions of batched 2x2 systems ``h d = g`` (closed form, no host synchronisation,
    unlike ``torch.linalg.solve``'s error check) and where they are defined."""
    import torch

    det = h[:, 0, 0] * h[:, 1, 1] - h[:, 0, 1] * h[:, 1, 0]
    ok = torch.isfinite(det) & (det.abs() > 1e-300)
    inv_det = torch.where(ok, 1.0 / torch.where(ok, det, torch.ones_like(det)),
                          torch.zeros_like(det))
    d0 = (h[:, 1, 1] * g[:, 0] - h[:, 0, 1] * g[:, 1]) * inv_det
    d1 = (h[:, 0, 0] * g[:, 1] - h[:, 1, 0] * g[:, 0]) * inv_det
    d = torch.stack([d0, d1], dim=1)
    return d, ok & torch.isfinite(d).all(dim=1)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b != 0``, else 0."""
    import torch

    nz = b != 0
    return torch.where(nz, a / torch.where(nz, b, torch.ones_like(b)), torch.zeros_like(a))


# ----------------------------------------------------------------------------- data classes
@dataclass
class FrameFeatures:
    """Reference-independent work of a batch of frames, on the device.

    Attributes
    ----------
    levels
        One ``(B, 3, h_l, w_l)`` float32 tensor per pyramid level ``l = 0 .. L`` (0 = full
        resolution): the pre-filtered frame, its x gradient and its y gradient.
    spectrum
        ``(B, h_L, w_L)`` complex64: FFT of the coarsest level, mean-subtracted, Hann-windowed
        and whitened (unit magnitude; zero where the spectrum has no energy).
    """

    levels: list
    spectrum: Any

    def select(self, index: torch.Tensor) -> FrameFeatures:
        """The features of frames ``index`` (a 1-D long tensor on the device)."""
        return FrameFeatures([lv.index_select(0, index) for lv in self.levels],
                             self.spectrum.index_select(0, index))

    def put(self, index: torch.Tensor, other: FrameFeatures) -> None:
        """Overwrite frames ``index`` in place with ``other``'s (same level shapes)."""
        for mine, theirs in zip(self.levels, other.levels, strict=True):
            mine.index_copy_(0, index, theirs)
        self.spectrum.index_copy_(0, index, other.spectrum)


@dataclass
class TorchRegistration:
    """Outcome of a torch registration: core's result fields as device tensors.

    ``aligned`` (T, Y, X) float32, edges replicated; ``translations`` (T, 2) float64
    ``(dx, dy)`` (the transforms' last column); ``ecc`` (T,) float64; ``failure`` (T,) int8
    (0 converged, 1 ECC failed at level ``fail_level``, 2 non-finite, 3 lost: coverage below
    20 %, 4 ECC below ``min_ecc``); ``coverage`` (Y, X) bool; ``reference`` index of the
    reference frame (an int, or a 1-element device tensor in a stream); ``sigma`` the
    pre-filter; ``min_ecc`` the threshold used.
    """

    aligned: Any
    translations: Any
    ecc: Any
    failure: Any
    fail_level: Any
    coverage: Any
    reference: Any
    sigma: float
    min_ecc: float

    @property
    def transforms(self) -> torch.Tensor:
        """(T, 2, 3) float64 translation transforms (reference -> frame coordinates)."""
        return _translations(self.translations)

    @property
    def converged(self) -> torch.Tensor:
        """(T,) bool, as core's ``converged``."""
        return self.failure == _OK

    def to_numpy(self) -> RegistrationResult:
        """Core's :class:`RegistrationResult` on the host (synchronises with the device),
        with one message per frame that did not converge, worded as core's."""
        ecc = self.ecc.cpu().numpy().astype(np.float64)
        failure = self.failure.cpu().numpy()
        level = self.fail_level.cpu().numpy()
        t = self.translations.cpu().numpy().astype(np.float64)
        transforms = np.tile(np.eye(2, 3), (len(t), 1, 1))
        transforms[:, :, 2] = t
        cov = self.coverage.cpu().numpy()
        messages = []
        for i, code in enumerate(failure):
            if code == _OK:
                continue
            why = {
                _ECC_FAILED: f"ECC failed at pyramid level {int(level[i])} (the correlation "
                             f"would decrease: images may be uncorrelated or non-overlapped)",
                _NON_FINITE: f"ECC gave a non-finite transform at pyramid level "
                             f"{int(level[i])}",
                _LOST: "the registered frame covers less than "
                       f"{_MIN_OVERLAP:.0%} of the reference frame (ECC wandered off)",
                _LOW_ECC: f"its ECC correlation {ecc[i]:.3f} is below "
                          f"min_ecc={self.min_ecc:g}",
            }[int(code)]
            messages.append(f"frame {i} did not converge: {why}; kept shift (dy, dx) = "
                            f"({t[i, 1]:.2f}, {t[i, 0]:.2f}) px")
        ref = self.reference
        ref = int(ref.reshape(-1)[0]) if hasattr(ref, "reshape") else int(ref)
        return RegistrationResult(
            aligned=self.aligned.float().cpu().numpy(), transforms=transforms, ecc=ecc,
            converged=failure == _OK, coverage=cov, reference=ref, motion="translation",
            messages=messages, sigma=float(self.sigma))


# ------------------------------------------------------------------------------ registrar
class TorchRegistrar:
    """Translation registration of frames of one shape on one device, batched over frames.

    Holds everything that depends only on the frame shape and the settings (filter taps, Hann
    window, low-pass weights, DFT grids), so :meth:`features` and :meth:`register` run
    without creating host data or synchronising with the device (they can be captured in a
    CUDA graph).

    Parameters
    ----------
    shape
        ``(Y, X)`` of the frames, at least 16x16.
    sigma
        Gaussian pre-filter (px), e.g. :func:`~napari_microrestore.core.registration.
        prefilter_sigma` of a reference frame; fixed for the registrar so that features are
        reusable across windows.
    device
        A torch device string.
    levels, finest
        As in :func:`~napari_microrestore.core.registration.register_burst` (defaults: the
        coarsest level keeps >= 96 px; ECC stops at ``min(levels, 2)``).
    iterations, eps
        ECC iterations per level (fixed work) and the correlation change below which a frame
        stops moving (OpenCV's ``eps``).
    min_ecc
        Frames whose final correlation is below this are flagged.
    """

    def __init__(self, shape: tuple[int, int], *, sigma: float, device: str = "cpu",
                 levels: Optional[int] = None, finest: Optional[int] = None,
                 iterations: int = ECC_ITERATIONS, eps: float = 1e-4,
                 min_ecc: float = 0.2) -> None:
        import torch

        h, w = (int(v) for v in shape)
        if min(h, w) < MIN_FRAME_SIZE:
            raise InputError(f"frames must be at least {MIN_FRAME_SIZE}x{MIN_FRAME_SIZE} pixels "
                             f"to register; got {h}x{w}")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise InputError(f"sigma must be a finite number >= 0 (pixels); got {sigma!r}")
        max_levels = math.floor(math.log2(min(h, w) / 8))
        if levels is None:
            levels = _auto_levels((h, w))
        elif int(levels) != levels or not 0 <= levels <= max_levels:
            raise InputError(f"levels must be an integer in [0, {max_levels}] for {h}x{w} "
                             f"frames (the coarsest level keeps >= 8 px); got {levels!r}")
        levels = int(levels)
        finest = min(levels, _FINEST) if finest is None else finest
        if int(finest) != finest or not 0 <= finest <= levels:
            raise InputError(f"finest must be an integer level in [0, levels={levels}]; "
                             f"got {finest!r}")
        if int(iterations) != iterations or iterations < 1:
            raise InputError(f"iterations must be a positive integer; got {iterations!r}")
        if not (math.isfinite(eps) and eps >= 0):
            raise InputError(f"eps must be a finite number >= 0; got {eps!r}")
        if not math.isfinite(min_ecc):
            raise InputError(f"min_ecc must be a finite number (a correlation); got {min_ecc!r}")
        self.shape = (h, w)
        self.sigma = float(sigma)
        self.device = torch.device(device)
        self.levels, self.finest = levels, int(finest)
        self.iterations, self.eps, self.min_ecc = int(iterations), float(eps), float(min_ecc)
        dev = self.device
        f32 = {"dtype": torch.float32, "device": dev}
        taps = None
        if sigma > 0:
            k = round(sigma * 8 + 1) | 1  # cv2.GaussianBlur's size for float images
            if k // 2 >= min(h, w):
                raise InputError(f"sigma={sigma:g} px is too large for {h}x{w} frames")
            taps = torch.tensor(cv2.getGaussianKernel(k, sigma).ravel(), **f32)
        self._gauss = taps
        self._pyr = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], **f32) / 16.0
        sizes = [(h, w)]
        for _ in range(levels):
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
        self.sizes = sizes
        ch, cw = sizes[-1]
        self._hann = torch.from_numpy(cv2.createHanningWindow((cw, ch), cv2.CV_32F)).to(dev)
        scale = 2.0 ** levels
        # the Gaussian the coarsest level went through: pre-filter + pyrDown kernels
        lowpass = math.sqrt(sigma ** 2 + (4.0 ** levels - 1.0) / 3.0) / scale
        fy = np.fft.fftfreq(ch)
        fx = np.fft.fftfreq(cw)
        g = -2.0 * (np.pi * lowpass) ** 2
        self._lowpass = torch.from_numpy(
            (np.exp(g * fy ** 2)[:, None] * np.exp(g * fx ** 2)[None, :]).astype(np.float32)
        ).to(dev)
        half = math.ceil(0.75 * _UPSAMPLE)
        self._offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=dev) / _UPSAMPLE
        self._fy = torch.from_numpy(fy).to(dev)
        self._fx = torch.from_numpy(fx).to(dev)
        self._rows = slice(1, h - 1, _HESSIAN_STRIDE)
        self._n_sub = len(range(1, h - 1, _HESSIAN_STRIDE))

    # -------------------------------------------------------------------- per-frame work
    def features(self, frames: torch.Tensor) -> FrameFeatures:
        """Features of ``(B, Y, X)`` float32 frames on the registrar's device."""
        import torch

        x = frames.to(self.device, torch.float32)[:, None]
        if self._gauss is not None:
            x = _sep_filter(x, self._gauss)
        levels = []
        for lv in range(self.levels + 1):
            if lv:
                x = _sep_filter(x, self._pyr, stride=2)
            gx, gy = _gradients(x)
            levels.append(torch.cat([x, gx, gy], dim=1))
        coarse = x[:, 0]
        coarse = (coarse - coarse.mean(dim=(-2, -1), keepdim=True)) * self._hann
        spec = torch.fft.fft2(coarse)
        mag = spec.abs()
        keep = mag > 1e-6 * mag.amax(dim=(-2, -1), keepdim=True)
        spec = torch.where(keep, spec / torch.where(keep, mag, torch.ones_like(mag)),
                           torch.zeros_like(spec))
        return FrameFeatures(levels, spec)

    # ------------------------------------------------------------------------ per pair
    def _phase_correlation(self, spec: torch.Tensor, ref_spec: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` float64 ``(dx, dy)`` at the coarsest level: core's phase_correlation of
        each frame against the reference (1/10 px)."""
        import torch

        ch, cw = self.sizes[-1]
        cross = spec * ref_spec.conj() * self._lowpass
        surface = torch.fft.ifft2(cross).real
        idx = surface.flatten(1).argmax(dim=1)
        iy, ix = idx // cw, idx % cw
        dy = torch.where(iy > ch // 2, iy - ch, iy).to(torch.float64)
        dx = torch.where(ix > cw // 2, ix - cw, ix).to(torch.float64)
        # inverse DFT on a 1/10 px grid of +-0.75 px around the integer peak
        k = self._offsets.numel()
        ang_y = 2 * math.pi * (dy[:, None] + self._offsets)[:, :, None] * self._fy[None, None]
        ang_x = 2 * math.pi * self._fx[None, :, None] * (dx[:, None] + self._offsets)[:, None]
        ky = torch.polar(torch.ones_like(ang_y), ang_y).to(torch.complex64)
        kx = torch.polar(torch.ones_like(ang_x), ang_x).to(torch.complex64)
        fine = (ky @ cross @ kx).real
        j = fine.flatten(1).argmax(dim=1)
        dy = dy + self._offsets[j // k]
        dx = dx + self._offsets[j % k]
        return torch.stack([dx, dy], dim=1)

    def _ecc(self, feats: FrameFeatures, ref: FrameFeatures, t: torch.Tensor,
             failure: torch.Tensor, fail_level: torch.Tensor):
        """ECC coarse to fine (``cv2.findTransformECC``'s iteration, translation), fixed work.

        ``t`` is the full-resolution ``(B, 2)`` ``(dx, dy)`` start; returns the refined ``t``,
        ``failure`` and ``fail_level`` (a failing frame keeps the previous level's result).
        """
        import torch

        for lv in range(self.levels, self.finest - 1, -1):
            scale = 2.0 ** lv
            img = feats.levels[lv]
            tmpl = ref.levels[lv][:, :1]
            h, w = img.shape[-2:]
            t_lv = t / scale
            start = t_lv
            active = failure == _OK
            last_rho = torch.full_like(t[:, 0], -1.0)
            for _ in range(self.iterations):
                warped = _warp(img, _translations(t_lv), "zeros")
                mask = _nearest_mask(t_lv, h, w)
                count = mask.sum(dim=(-2, -1), dtype=torch.float64)[:, 0]
                iw, jac = warped[:, :1], warped[:, 1:]
                img_mean = _safe_div(_dot(iw, mask)[:, 0], count)
                tmp_mean = _safe_div(_dot(tmpl, mask)[:, 0], count)
                img_zm = torch.where(mask > 0, iw - img_mean.float()[:, None, None, None], iw)
                tmp_zm = (tmpl - tmp_mean.float()[:, None, None, None]) * mask
                img_norm2 = _dot(img_zm * mask, img_zm)[:, 0]
                tmp_norm2 = _dot(tmp_zm, tmp_zm)[:, 0]
                hess = _dot(jac[:, :, None], jac[:, None, :])           # (B, 2, 2)
                corr = _dot(tmp_zm, img_zm)[:, 0]
                rho = corr / torch.sqrt(img_norm2 * tmp_norm2)
                img_proj = _dot(jac, img_zm)                             # (B, 2)
                tmp_proj = _dot(jac, tmp_zm)
                iph, solvable = _solve2(hess, img_proj)
                lam_n = img_norm2 - (img_proj * iph).sum(dim=1)
                lam_d = corr - (tmp_proj * iph).sum(dim=1)
                bad = (lam_d <= 0) | torch.isnan(rho) | ~solvable
                lam = _safe_div(lam_n, lam_d)
                err = lam.float()[:, None, None, None] * tmp_zm - img_zm
                dp, _ = _solve2(hess, _dot(jac, err))
                newly = active & bad
                failure = torch.where(newly, torch.full_like(failure, _ECC_FAILED), failure)
                fail_level = torch.where(newly, torch.full_like(fail_level, lv), fail_level)
                t_lv = torch.where(newly[:, None], start, t_lv)
                active = active & ~bad
                t_lv = torch.where(active[:, None], t_lv + dp, t_lv)
                active = active & ((rho - last_rho).abs() >= self.eps)
                last_rho = rho
            non_finite = (failure == _OK) & ~torch.isfinite(t_lv).all(dim=1)
            failure = torch.where(non_finite, torch.full_like(failure, _NON_FINITE), failure)
            fail_level = torch.where(non_finite, torch.full_like(fail_level, lv), fail_level)
            t_lv = torch.where(non_finite[:, None], start, t_lv)
            t = t_lv * scale
        return t, failure, fail_level

    def _sample(self, img_f: torch.Tensor, ref_f: torch.Tensor, t: torch.Tensor):
        """Coverage mask and its count, the warped frame, and frame and reference made
        zero-mean over the covered pixels and zero elsewhere (core's
        ``_FullResolution._sample``)."""
        import torch

        h, w = self.shape
        valid = _covered(t, h, w)
        count = valid.sum(dim=(-2, -1), dtype=torch.float64)[:, 0]
        warped = _warp(img_f, _translations(t), "border")
        mi = _safe_div(_dot(warped, valid)[:, 0], count).float()[:, None, None, None]
        mr = _safe_div(_dot(ref_f, valid)[:, 0], count).float()[:, None, None, None]
        return valid, count, warped, (warped - mi) * valid, (ref_f - mr) * valid

    def _polish(self, feats: FrameFeatures, ref: FrameFeatures, t: torch.Tensor,
                failure: torch.Tensor) -> torch.Tensor:
        """Core's full-resolution Gauss-Newton polish, its stopping rules applied by masks."""
        import torch

        img_f = feats.levels[0][:, :1]
        ref_f, ref_g = ref.levels[0][:, :1], ref.levels[0][:, 1:]
        rows, n_sub = self._rows, self._n_sub
        jac_sub = ref_g[:, :, rows, 1:-1]
        going = failure == _OK
        for _ in range(_POLISH_STEPS):
            valid, count, warped, img, refz = self._sample(img_f, ref_f, t)
            img_norm = _dot(img, img)[:, 0]
            gain = _safe_div(_dot(img, refz)[:, 0], img_norm)
            residual = gain.float()[:, None, None, None] * img - refz
            grad = _dot(ref_g, residual)                                   # (B, 2)
            ix = 0.5 * (warped[:, :, rows, 2:] - warped[:, :, rows, :-2])
            iy = 0.5 * (warped[:, :, 2::_HESSIAN_STRIDE, 1:-1][:, :, :n_sub]
                        - warped[:, :, 0::_HESSIAN_STRIDE, 1:-1][:, :, :n_sub])
            valid_sub = valid[:, :, rows, 1:-1]
            in_sub = valid_sub.sum(dim=(-2, -1), dtype=torch.float64)[:, 0]
            jac_img = torch.cat([ix, iy], dim=1) * valid_sub
            hess = _dot(jac_sub[:, :, None], jac_img[:, None, :])
            hess = hess * _safe_div(count, in_sub)[:, None, None]
            d, ok = _solve2(hess, grad)
            ok = ok & (count > 0) & (img_norm > 0) & (in_sub > 0)
            move = torch.where(ok, torch.linalg.vector_norm(d, dim=1), torch.zeros_like(count))
            take = going & ok & (move <= 2.0 ** self.finest)
            t = torch.where(take[:, None], t - d, t)
            going = going & (move <= 2.0 ** self.finest) & (move >= _POLISH_TOL)
        return t

    def register(self, frames: torch.Tensor, feats: FrameFeatures,
                 reference: torch.Tensor) -> TorchRegistration:
        """Register every frame of ``frames`` ``(T, Y, X)`` (features ``feats``) to frame
        ``reference`` (a 1-element long tensor on the device).

        Results are in the order of ``frames``; the reference gets the identity.
        """
        import torch

        n = frames.shape[0]
        h, w = self.shape
        dev = self.device
        ref = feats.select(reference)
        is_ref = torch.arange(n, device=dev) == reference
        t = self._phase_correlation(feats.spectrum, ref.spectrum) * 2.0 ** self.levels
        failure = torch.zeros(n, dtype=torch.int8, device=dev)
        fail_level = torch.zeros(n, dtype=torch.int64, device=dev)
        t, failure, fail_level = self._ecc(feats, ref, t, failure, fail_level)
        if self.finest > 0:
            t = self._polish(feats, ref, t, failure)
        t = torch.where(is_ref[:, None], torch.zeros_like(t), t)
        failure = torch.where(is_ref, torch.zeros_like(failure), failure)
        valid, count, _, img, refz = self._sample(feats.levels[0][:, :1],
                                                  ref.levels[0][:, :1], t)
        den = torch.sqrt(_dot(img, img)[:, 0] * _dot(refz, refz)[:, 0])
        ecc = torch.where(is_ref, torch.ones_like(den), _safe_div(_dot(img, refz)[:, 0], den))
        overlap = count / float(h * w)
        ok = failure == _OK
        failure = torch.where(ok & (overlap < _MIN_OVERLAP), torch.full_like(failure, _LOST),
                              failure)
        ok = failure == _OK
        failure = torch.where(ok & (ecc < self.min_ecc), torch.full_like(failure, _LOW_ECC),
                              failure)
        raw = frames.to(dev, torch.float32)[:, None]
        aligned = _warp(raw, _translations(t), "border")[:, 0]
        aligned = torch.where(is_ref[:, None, None], raw[:, 0], aligned)
        coverage = valid[:, 0].bool().all(dim=0)
        return TorchRegistration(aligned=aligned, translations=t, ecc=ecc, failure=failure,
                                 fail_level=fail_level, coverage=coverage, reference=reference,
                                 sigma=self.sigma, min_ecc=self.min_ecc)


# ------------------------------------------------------------------------ public functions
def _host_stack(frames: Any) -> np.ndarray:
    """Validated (T, Y, X) float32 numpy stack (host-side checks: shape, dtype, finite)."""
    arr = np.asarray(frames)
    if arr.ndim != 3:
        raise InputError(f"a burst must be a 3-D stack (T, Y, X); got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"frames must hold integer or float pixels; got dtype {arr.dtype}")
    if arr.shape[0] < 2:
        raise InputError(f"a burst needs at least 2 frames to register; got {arr.shape[0]}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError("the burst contains NaN or infinite values; registration needs finite "
                         "pixels")
    return arr


def register_burst_torch(frames: Any, reference: Optional[int] = None, *, device: str = "cpu",
                         sigma: Optional[float] = None, levels: Optional[int] = None,
                         finest: Optional[int] = None, iterations: int = ECC_ITERATIONS,
                         eps: float = 1e-4, min_ecc: float = 0.2) -> TorchRegistration:
    """Register a (T, Y, X) burst to frame ``reference`` (default ``T // 2``) with torch.

    The batched equivalent of core's ``register_burst(frames, reference, "translation", ...)``
    (same parameters; ``iterations`` replaces ``max_iter``). ``frames`` is a numpy array or a
    torch tensor (kept on its device if it is one); ``sigma`` defaults to core's
    :func:`prefilter_sigma` of the reference frame. Call ``.to_numpy()`` on the result for
    core's :class:`RegistrationResult`.
    """
    import torch

    if isinstance(frames, torch.Tensor):
        if frames.ndim != 3 or frames.shape[0] < 2:
            raise InputError(f"a burst must be a (T, Y, X) stack with T >= 2; got shape "
                             f"{tuple(frames.shape)}")
        stack = frames.to(device, torch.float32)
        host = None
    else:
        host = _host_stack(frames)
        stack = torch.from_numpy(host).to(device)
    n = stack.shape[0]
    ref = n // 2 if reference is None else reference
    if isinstance(ref, bool) or int(ref) != ref or not -n <= ref < n:
        raise InputError(f"reference must be a frame index in [0, {n - 1}]; got {reference!r}")
    ref = int(ref) % n
    if sigma is None:
        ref_img = host[ref] if host is not None else stack[ref].cpu().numpy()
        sigma = prefilter_sigma(ref_img)
    reg = TorchRegistrar(tuple(stack.shape[1:]), sigma=sigma, device=device, levels=levels,
                         finest=finest, iterations=iterations, eps=eps, min_ecc=min_ecc)
    index = torch.full((1,), ref, dtype=torch.int64, device=reg.device)
    out = reg.register(stack, reg.features(stack), index)
    out.reference = ref
    return out


def warp_frames_torch(frames: torch.Tensor, transforms: torch.Tensor, *,
                      padding: str = "border") -> torch.Tensor:
    """Warp ``(T, Y, X)`` frames into the reference frame with ``(T, 2, 3)`` transforms (core's
    convention), bilinear; ``padding="border"`` replicates edges as core's ``warp_frames``."""
    import torch

    if frames.ndim != 3 or tuple(transforms.shape) != (frames.shape[0], 2, 3):
        raise InputError(f"need (T, Y, X) frames and (T, 2, 3) transforms; got "
                         f"{tuple(frames.shape)} and {tuple(transforms.shape)}")
    if padding not in ("border", "zeros"):
        raise InputError(f"padding must be 'border' or 'zeros'; got {padding!r}")
    tr = transforms.to(frames.device, torch.float64)
    return _warp(frames.float()[:, None], tr, padding)[:, 0]


class StreamRegistrar:
    """Sliding-window registration of a stream: each frame's features are computed once.

    Frames live in a ring of ``window`` slots on the device; :meth:`push` stores a new frame
    and its features (overwriting the oldest), :meth:`register` registers the current window
    to its centre frame (``window // 2`` in time order) and returns the result in time order.
    Both are fixed sequences of device operations: the slot and reference indices are device
    tensors updated by device-side copies from tables made here.

    Parameters
    ----------
    window
        Frames per window (>= 2).
    shape, sigma, device, **kwargs
        As :class:`TorchRegistrar`.
    """

    def __init__(self, window: int, shape: tuple[int, int], *, sigma: float,
                 device: str = "cpu", **kwargs: Any) -> None:
        import torch

        if isinstance(window, bool) or int(window) != window or window < 2:
            raise InputError(f"window must be an integer >= 2 frames; got {window!r}")
        self.window = int(window)
        self.registrar = TorchRegistrar(shape, sigma=sigma, device=device, **kwargs)
        dev = self.registrar.device
        h, w = self.registrar.shape
        self.frames = torch.zeros(self.window, h, w, device=dev)
        empty = self.registrar.features(torch.zeros(1, h, w, device=dev))
        self.features = FrameFeatures(
            [lv.repeat(self.window, 1, 1, 1) for lv in empty.levels],
            empty.spectrum.repeat(self.window, 1, 1))
        self.count = 0
        wn = self.window
        # phase p = index of the newest frame modulo the window:
        # slot of the newest frame, slot of the centre frame, slots in time order
        slots = torch.arange(wn, device=dev)
        self._slot_table = slots[:, None]
        self._ref_table = ((slots - wn + 1 + wn // 2) % wn)[:, None]
        self._order_table = (slots[:, None] - wn + 1 + slots[None, :]) % wn
        self.slot = torch.zeros(1, dtype=torch.int64, device=dev)
        self.ref_slot = torch.zeros(1, dtype=torch.int64, device=dev)
        self.order = torch.zeros(wn, dtype=torch.int64, device=dev)

    @property
    def full(self) -> bool:
        """Whether ``window`` frames have been pushed."""
        return self.count >= self.window

    def set_phase(self, count: int) -> None:
        """Point the index tensors at the slots of the window whose newest frame is number
        ``count - 1`` (device-side copies only)."""
        p = (count - 1) % self.window
        self.slot.copy_(self._slot_table[p])
        self.ref_slot.copy_(self._ref_table[p])
        self.order.copy_(self._order_table[p])

    def ingest(self, frame: torch.Tensor) -> None:
        """Store ``frame`` ``(Y, X)`` (on the device) and its features in slot ``self.slot``."""
        x = frame.to(self.registrar.device, self.frames.dtype)[None]
        self.frames.index_copy_(0, self.slot, x)
        self.features.put(self.slot, self.registrar.features(x))

    def push(self, frame: torch.Tensor) -> None:
        """Add the next frame of the stream (a ``(Y, X)`` tensor)."""
        if tuple(frame.shape) != self.registrar.shape:
            raise InputError(f"frame has shape {tuple(frame.shape)}; the stream's frames are "
                             f"{self.registrar.shape}")
        self.count += 1
        self.set_phase(self.count)
        self.ingest(frame)

    def register_window(self) -> TorchRegistration:
        """Registration of the window pointed at by the index tensors, in time order
        (reference = ``window // 2``); needs a full window."""
        res = self.registrar.register(self.frames, self.features, self.ref_slot)
        o = self.order
        return TorchRegistration(
            aligned=res.aligned.index_select(0, o),
            translations=res.translations.index_select(0, o),
            ecc=res.ecc.index_select(0, o), failure=res.failure.index_select(0, o),
            fail_level=res.fail_level.index_select(0, o), coverage=res.coverage,
            reference=self.window // 2, sigma=res.sigma, min_ecc=res.min_ecc)

    def register(self) -> TorchRegistration:
        """Registration of the last ``window`` frames pushed (see :meth:`register_window`)."""
        if not self.full:
            raise InputError(f"the stream has {self.count} frame(s); a window needs "
                             f"{self.window}")
        return self.register_window()
