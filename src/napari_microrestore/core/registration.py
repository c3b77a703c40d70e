"""Burst registration: a phase-correlation start refined by ECC on a Gaussian pyramid.

Every frame of a (T, Y, X) burst is registered *directly* to one reference frame (no chaining,
so errors do not accumulate along the burst):

1. the frame and the reference are pre-filtered with a Gaussian sized to the noise and reduced
   to a pyramid with ``cv2.pyrDown``;
2. a coarse translation is found by phase correlation on the coarsest level (Hann window,
   spectrum weighted by the same Gaussian as the images, sub-pixel peak by an upsampled DFT),
   so shifts up to a third of the frame need no start;
3. ECC refines the transform level by level, coarse to fine, down to a level of 4x4-pixel
   blocks, each level starting from the previous one: ``cv2.findTransformECC``, except for a
   translation, which phase correlation already gives to 1/10 px of the coarsest level, so it
   starts one level finer with Gauss-Newton steps of the ECC objective (two or three from such
   a start; ``cv2.findTransformECC`` takes over where they do not converge);
4. Gauss-Newton steps of the same ECC objective (usually one) polish it at full resolution,
   with the reference's gradients computed once per burst and only the bounding box of the
   covered pixels warped: full-resolution accuracy without the set-up and iterations of
   full-resolution ECC calls, which is where the speed comes from;
5. the frame is warped into the reference frame, and its ECC correlation with the reference is
   measured at full resolution on every 4th row (a score; the rows sampled do not change the
   transform).

Conventions
-----------
Pixel coordinates are ``(x, y) = (column, row)`` in pixels with pixel centres on integers and
the origin at the centre of the top-left pixel (OpenCV's convention). A frame's transform ``A``
(2x3) maps a pixel of the *reference* frame to the position of the same content in the frame::

    frame(A @ (x, y, 1)) ~= reference(x, y)

so the frame is brought into the reference frame with
``cv2.warpAffine(frame, A, (X, Y), flags=INTER_LINEAR | WARP_INVERSE_MAP)`` (what
:func:`warp_frames` does). For a pure translation ``A = [[1, 0, dx], [0, 1, dy]]``, i.e.
``frame(y + dy, x + dx) = reference(y, x)``: the content moved by ``(+dy, +dx)`` pixels from
the reference to the frame. :func:`phase_correlation` returns the shift in the same convention.
Euclidean and affine transforms rotate about the origin (the top-left pixel), as OpenCV does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import cv2
import numpy as np

from .errors import CancelToken, InputError, ProgressCallback, check_cancel, report
from .metrics import noise_sigma

MOTIONS = ("translation", "euclidean", "affine")

_CV_MOTION = {
    "translation": cv2.MOTION_TRANSLATION,
    "euclidean": cv2.MOTION_EUCLIDEAN,
    "affine": cv2.MOTION_AFFINE,
}
_CV_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
}
MIN_FRAME_SIZE = 16
# the coarsest pyramid level keeps at least this many pixels along the shorter side
_COARSEST_SIDE = 96
# a frame whose warped field of view keeps less than this fraction of the reference frame is
# treated as lost (ECC wandered off)
_MIN_OVERLAP = 0.2
# ECC stops at this pyramid level by default (pixels of 4 x 4 full-resolution pixels): its
# estimate, within ~0.1 px, is well inside the basin of the full-resolution polish
_FINEST = 2
# full-resolution polish: at most _POLISH_STEPS Gauss-Newton steps, stopping after one that
# moves the frame by less than _POLISH_TOL px; the Hessian is summed over every
# _HESSIAN_STRIDE-th row. A step leaves about a tenth of the error it starts from, so after
# the typical first step of 0.1-0.2 px a second one moved frames by < 0.03 px, below the noise:
# on bench_registration's real bursts it changed no RMS error by more than 0.003 px.
_POLISH_STEPS = 3
_POLISH_TOL = 0.3
_HESSIAN_STRIDE = 3
# the final ECC score is measured on every _SCORE_STRIDE-th row
_SCORE_STRIDE = 4
# a translation's Gauss-Newton steps at a pyramid level stop after one shorter than _LEVEL_TOL
# px of the level (the full-resolution polish takes it from there); after _LEVEL_STEPS steps,
# or a step longer than _LEVEL_LONGEST px (not taken), ECC takes over
_LEVEL_TOL = 0.05
_LEVEL_STEPS = 10
_LEVEL_LONGEST = 2.0


def _finite_2d(a: Any, name: str) -> np.ndarray:
    img = np.asarray(a, dtype=np.float32)
    if img.ndim != 2:
        raise InputError(f"{name} must be a 2-D image (Y, X); got an array of shape {img.shape}")
    if not np.isfinite(img).all():
        raise InputError(f"{name} contains NaN or infinite values; registration needs finite "
                         f"pixels")
    return img


def phase_correlation(reference: np.ndarray, image: np.ndarray, *, upsample: int = 10,
                      window: bool = True, lowpass: float = 0.0) -> tuple[float, float, float]:
    """Translation between two images by phase correlation, to ``1 / upsample`` pixel.

    Parameters
    ----------
    reference, image
        2-D images of the same shape, any real dtype, finite.
    upsample
        Sub-pixel refinement factor: the correlation peak is located on a grid of
        ``1 / upsample`` pixel by an upsampled DFT around the integer peak (Guizar-Sicairos et
        al. 2008). ``1`` gives the integer peak.
    window
        Multiply both (mean-subtracted) images by a 2-D Hann window first, so that the image
        borders do not correlate. Turn it off only for periodic images.
    lowpass
        Standard deviation (px) of a Gaussian that smooths the correlation surface, i.e.
        weights the whitened cross-power spectrum by ``exp(-2 pi^2 lowpass^2 f^2)``. Whitening
        gives every frequency the same weight, so in noisy images the frequencies that hold
        only noise drown the peak; ``lowpass`` about the noise's Gaussian pre-filter sigma
        keeps them out. 0 (default) is plain phase correlation.

    Returns
    -------
    dy, dx
        Shift in pixels such that ``image(y, x) ~= reference(y - dy, x - dx)``: content at
        ``(y, x)`` in the reference appears at ``(y + dy, x + dx)`` in the image. The
        translation transform of this module is ``[[1, 0, dx], [0, 1, dy]]``. Shifts are
        unambiguous up to half the image size along each axis.
    peak
        Height of the normalised phase-correlation peak, at most 1: 1 for an exact circular
        shift without ``lowpass``, a few times ``1 / sqrt(Y * X)`` for unrelated images; a
        rough confidence (``lowpass`` and noise lower it).
    """
    ref = _finite_2d(reference, "reference")
    img = _finite_2d(image, "image")
    if ref.shape != img.shape:
        raise InputError(f"phase correlation needs two images of the same shape; got {ref.shape} "
                         f"and {img.shape}")
    if min(ref.shape) < 2:
        raise InputError(f"phase correlation needs images of at least 2x2 pixels; got {ref.shape}")
    if int(upsample) != upsample or upsample < 1:
        raise InputError(f"upsample must be a positive integer; got {upsample!r}")
    if not (math.isfinite(lowpass) and lowpass >= 0):
        raise InputError(f"lowpass must be a finite number >= 0 (pixels); got {lowpass!r}")
    upsample = int(upsample)
    a = ref - ref.mean()
    b = img - img.mean()
    if window:
        win = cv2.createHanningWindow(ref.shape[::-1], cv2.CV_32F)
        a = a * win
        b = b * win
    cross = np.fft.fft2(b) * np.conj(np.fft.fft2(a))
    mag = np.abs(cross)
    # whitening; bins without energy (e.g. a constant image) stay zero instead of dividing by 0
    cross = np.where(mag > 1e-12 * mag.max(), cross / np.maximum(mag, 1e-30), 0)
    if lowpass > 0:
        fy, fx = np.fft.fftfreq(cross.shape[0]), np.fft.fftfreq(cross.shape[1])
        k = -2.0 * (np.pi * lowpass) ** 2
        cross *= np.exp(k * fy ** 2)[:, None] * np.exp(k * fx ** 2)[None, :]
    surface = np.fft.ifft2(cross).real
    iy, ix = np.unravel_index(int(np.argmax(surface)), surface.shape)
    ny, nx = surface.shape
    dy = float(iy - ny if iy > ny // 2 else iy)
    dx = float(ix - nx if ix > nx // 2 else ix)
    peak = float(surface[iy, ix])
    if upsample > 1:
        # evaluate the inverse DFT on a fine grid of +-0.75 px around the integer peak
        half = math.ceil(0.75 * upsample)
        offsets = np.arange(-half, half + 1) / upsample
        ky = np.exp(2j * np.pi * np.outer(dy + offsets, np.fft.fftfreq(ny)))
        kx = np.exp(2j * np.pi * np.outer(np.fft.fftfreq(nx), dx + offsets))
        fine = (ky @ cross @ kx).real / (ny * nx)
        jy, jx = np.unravel_index(int(np.argmax(fine)), fine.shape)
        dy += float(offsets[jy])
        dx += float(offsets[jx])
        peak = max(peak, float(fine[jy, jx]))
    return dy, dx, peak


@dataclass
class RegistrationResult:
    """Outcome of :func:`register_burst`; arrays are indexed by frame as in the input.

    Attributes
    ----------
    aligned
        (T, Y, X) float32, every frame warped into the reference frame (input intensity units);
        pixels a frame does not cover are filled by replicating its edge (see ``coverage``).
    transforms
        (T, 2, 3) float64, maps reference-frame pixel coordinates ``(x, y, 1)`` to coordinates
        in frame t (apply with ``cv2.warpAffine(..., WARP_INVERSE_MAP)``, or
        :func:`warp_frames`); the identity for the reference frame.
    ecc
        (T,) float64, ECC correlation of each aligned frame with the reference at full
        resolution (zero-mean normalised cross-correlation of the Gaussian pre-filtered images
        over the pixels the frame covers, sampled on every 4th row: ~1e-3 from the value over
        all of them at 1024^2); 1 for the reference.
    converged
        (T,) bool; False when ECC diverged, did not converge, fell back to the phase-correlation
        translation, or ended below ``min_ecc``. Such frames are kept, never dropped.
    coverage
        (Y, X) bool, the pixels that every frame covers after warping.
    reference
        Index of the reference frame.
    motion
        One of :data:`MOTIONS`.
    messages
        One human-readable note per frame that did not converge.
    sigma
        Standard deviation (px) of the Gaussian pre-filter the registration used.
    """

    aligned: np.ndarray
    transforms: np.ndarray
    ecc: np.ndarray
    converged: np.ndarray
    coverage: np.ndarray
    reference: int
    motion: str
    messages: list[str] = field(default_factory=list)
    sigma: float = 0.0

    @property
    def shifts(self) -> np.ndarray:
        """(T, 2) float64 ``(dy, dx)`` per frame: the translation column of each transform, in
        pixels (the shift of the content from the reference to the frame, as in
        :func:`phase_correlation`; for euclidean / affine motion it is the displacement of the
        top-left pixel)."""
        return self.transforms[:, ::-1, 2].copy()

    def to_dict(self) -> dict:
        """JSON-serialisable summary: reference, motion, transforms, ecc, converged, messages,
        shifts and sigma, as plain Python lists and numbers."""
        return {
            "reference": int(self.reference),
            "motion": self.motion,
            "transforms": self.transforms.tolist(),
            "ecc": [float(v) for v in self.ecc],
            "converged": [bool(v) for v in self.converged],
            "messages": list(self.messages),
            "shifts": self.shifts.tolist(),
            "sigma": float(self.sigma),
        }


def _check_stack(frames: Any) -> tuple[Any, tuple[int, int, int]]:
    """Validate the shape and dtype of a (T, Y, X) stack without reading its pixels."""
    if not (hasattr(frames, "shape") and hasattr(frames, "__getitem__")):
        frames = np.asarray(frames)
    shape = tuple(int(n) for n in frames.shape)
    if len(shape) != 3:
        raise InputError(f"a burst must be a 3-D stack (T, Y, X); got shape {shape}")
    dtype = np.dtype(getattr(frames, "dtype", np.float32))
    if dtype.kind not in "biuf":
        raise InputError(f"frames must hold integer or float pixels; got dtype {dtype}")
    t, y, x = shape
    if t < 2:
        raise InputError(f"a burst needs at least 2 frames to register; got {t}")
    if min(y, x) < MIN_FRAME_SIZE:
        raise InputError(f"frames must be at least {MIN_FRAME_SIZE}x{MIN_FRAME_SIZE} pixels to "
                         f"register; got {y}x{x}")
    return frames, shape


def _read_frame(frames: Any, t: int, shape: tuple[int, int]) -> np.ndarray:
    img = np.asarray(frames[t], dtype=np.float32)
    if img.shape != shape:
        raise InputError(f"frame {t} has shape {img.shape}; expected {shape} like the stack")
    if not np.isfinite(img).all():
        raise InputError(f"frame {t} contains NaN or infinite values; registration needs "
                         f"finite pixels")
    return img


def _check_transforms(transforms: Any, n: Optional[int] = None) -> np.ndarray:
    """(T, 2, 3) float64 transforms, finite; ``n`` frames if given."""
    tr = np.asarray(transforms, dtype=np.float64)
    if tr.ndim != 3 or tr.shape[1:] != (2, 3) or (n is not None and tr.shape[0] != n):
        expected = f"({n}, 2, 3)" if n is not None else "(T, 2, 3)"
        raise InputError(f"transforms must have shape {expected}, one 2x3 matrix per frame; "
                         f"got {tr.shape}")
    if not np.isfinite(tr).all():
        raise InputError("transforms contain NaN or infinite values")
    return tr


def _warp(img: np.ndarray, transform: np.ndarray, flags: int, border: int,
          out: Optional[np.ndarray] = None,
          size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Frame ``img`` resampled on the reference frame's pixel grid (same shape), or on a grid
    of ``size = (width, height)`` pixels whose pixel ``(x, y)`` ``transform`` maps into the
    frame."""
    h, w = img.shape
    return cv2.warpAffine(img, transform, size or (w, h), dst=out,
                          flags=flags | cv2.WARP_INVERSE_MAP, borderMode=border)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of the products of two 2-D arrays (views allowed), in one pass without BLAS."""
    return float(np.einsum("ij,ij->", a, b))


def _covered_bounds(transform: np.ndarray, shape: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the reference frame, the columns ``[first, last)`` of the pixels ``(x, y)``
    whose source position ``transform @ (x, y, 1)`` lies inside the frame,
    ``[0, X - 1] x [0, Y - 1]`` (no border pixel is interpolated); ``first >= last`` for a row
    without any.

    The constraints are linear in x, so each row's covered pixels form one interval, and the
    covered region, an intersection of half-planes, is convex.
    """
    h, w = shape
    rows = np.arange(h, dtype=np.float64)
    lo = np.zeros(h)
    hi = np.full(h, w - 1.0)
    tol = 1e-6
    for (a, b, c), upper in zip(transform, (w - 1.0, h - 1.0), strict=True):
        offset = b * rows + c  # source coordinate at x = 0, per row
        if abs(a) > 1e-12:
            ends = np.stack([(-tol - offset) / a, (upper + tol - offset) / a])
            lo = np.maximum(lo, ends.min(0))
            hi = np.minimum(hi, ends.max(0))
        else:
            inside = (offset >= -tol) & (offset <= upper + tol)
            hi = np.where(inside, hi, -1.0)
    # integer column bounds per row (col >= lo <=> col >= ceil(lo) for integer cols)
    first = np.clip(np.ceil(lo), 0, w).astype(np.int64)
    last = np.clip(np.floor(hi), -1, w - 1).astype(np.int64) + 1
    return first, last


def _bounds_mask(first: np.ndarray, last: np.ndarray, w: int) -> np.ndarray:
    """(len(first), w) bool mask of the columns ``[first, last)`` of every row."""
    h = len(first)
    # fill runs of rows with equal bounds as rectangles: one or three runs for a translation,
    # where comparing every pixel's column would cost a few ms per call at 1024^2
    starts = np.flatnonzero(np.diff(first) | np.diff(last)) + 1
    if len(starts) > 32:
        cols = np.arange(w)
        return (cols >= first[:, None]) & (cols < last[:, None])
    mask = np.zeros((h, w), bool)
    for r0, r1 in zip(np.r_[0, starts], np.r_[starts, h]):
        if first[r0] < last[r0]:
            mask[r0:r1, first[r0]:last[r0]] = True
    return mask


def _covered(transform: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(Y, X) bool mask of the reference-frame pixels that a frame warped by ``transform``
    covers (see :func:`_covered_bounds`)."""
    return _bounds_mask(*_covered_bounds(transform, shape), shape[1])


def _check_shape(shape: Any) -> tuple[int, int]:
    """A frame's ``(Y, X)`` as two positive ints."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise InputError(f"shape must be (Y, X) with positive sizes; got {shape}")
    return shape


def coverage_mask(transforms: Any, shape: tuple[int, int]) -> np.ndarray:
    """(Y, X) bool mask of the reference-frame pixels that every frame covers.

    Parameters
    ----------
    transforms
        (T, 2, 3) transforms in the convention of :class:`RegistrationResult`.
    shape
        ``(Y, X)`` of a frame.
    """
    shape = _check_shape(shape)
    tr = _check_transforms(transforms)
    mask = np.ones(shape, bool)
    for a in tr:
        mask &= _covered(a, shape)
    return mask


MIN_MOTION_SPAN = 2.0  # px: below this the frames' positions give no direction


def motion_direction(transforms: Any, shape: tuple[int, int], *,
                     min_span: float = MIN_MOTION_SPAN) -> Optional[float]:
    """Direction of the stage motion through a burst, from where each frame's centre lands.

    In a TEM stream the stage moves between frames along the same line it moves during each
    exposure, so the frames' offsets point along the motion blur. The direction is the
    principal axis of the frame-centre displacements (the centre rather than the top-left
    pixel, so a euclidean / affine rotation does not read as motion).

    Parameters
    ----------
    transforms
        (T, 2, 3) transforms in the convention of :class:`RegistrationResult`.
    shape
        ``(Y, X)`` of a frame.
    min_span
        Pixels the centres must spread along that axis for a direction to be reported.

    Returns
    -------
    float or None
        Degrees in [0, 180), measured from +x towards +y (rows) as ``blur_angle`` in
        :func:`~napari_microrestore.core.degrade.simulate_burst`: 90 = the stage moves along
        the columns (vertically on screen). None for fewer than two frames or when the frames
        barely moved.
    """
    tr = _check_transforms(transforms)
    shape = _check_shape(shape)
    if len(tr) < 2:
        return None
    centre = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0, 1.0])
    d = tr @ centre - centre[:2]          # (T, 2) as (x, y)
    d -= d.mean(axis=0)
    evals, evecs = np.linalg.eigh(d.T @ d)
    axis = evecs[:, 1]
    along = d @ axis
    if float(along.max() - along.min()) < min_span:
        return None
    angle = float(np.degrees(np.arctan2(axis[1], axis[0])) % 180.0)
    return 0.0 if angle >= 180.0 else angle  # -1e-17 % 180 rounds to 180


def warp_frames(frames: Any, transforms: Any, *, interpolation: str = "linear",
                fill: Optional[float] = None) -> np.ndarray:
    """Warp every frame into the reference frame with given transforms.

    Parameters
    ----------
    frames
        (T, Y, X) stack, any integer or float dtype, or an array-like with ``shape``,
        ``dtype`` and ``__getitem__`` (frames are read one at a time).
    transforms
        (T, 2, 3) transforms mapping reference-frame pixel coordinates ``(x, y, 1)`` to frame
        coordinates, e.g. ``RegistrationResult.transforms`` or the ``transforms`` list of its
        :meth:`~RegistrationResult.to_dict`.
    interpolation
        ``"nearest"``, ``"linear"`` or ``"cubic"``.
    fill
        Value of the pixels that a frame does not cover (whose source position lies outside
        ``[0, X - 1] x [0, Y - 1]``, as in :func:`coverage_mask`). ``None`` (default)
        replicates the frame's edge pixels, which keeps the image finite and free of artificial
        edges for downstream networks; use :func:`coverage_mask` to know which pixels are real.
        A number (``np.nan`` included) fills them with that constant.

    Returns
    -------
    (T, Y, X) float32 in the input's intensity units.
    """
    frames, (n, h, w) = _check_stack(frames)
    tr = _check_transforms(transforms, n)
    if interpolation not in _CV_INTERPOLATION:
        raise InputError(f"interpolation must be one of {tuple(_CV_INTERPOLATION)}; "
                         f"got {interpolation!r}")
    flags = _CV_INTERPOLATION[interpolation]
    out = np.empty((n, h, w), np.float32)
    for t in range(n):
        _warp(_read_frame(frames, t, (h, w)), tr[t], flags, cv2.BORDER_REPLICATE, out=out[t])
        if fill is not None:
            out[t][~_covered(tr[t], (h, w))] = fill
    return out


def _auto_levels(shape: tuple[int, int]) -> int:
    """Pyramid levels so that the coarsest level keeps >= _COARSEST_SIDE px on its short side."""
    return max(0, math.floor(math.log2(min(shape) / _COARSEST_SIDE)))


def prefilter_sigma(image: np.ndarray) -> float:
    """Gaussian pre-filter sigma (px) that :func:`register_burst` uses by default.

    ``1 + 0.25 * noise / signal`` clipped to [1, 2], where ``noise`` is the white-noise
    standard deviation (:func:`~napari_microrestore.core.metrics.noise_sigma`) and ``signal``
    the standard deviation of the rest, both measured on the central 256x256 pixels of
    ``image``. The slope is gentle on purpose: on simulated noisy, motion-blurred bursts the
    sub-pixel accuracy was best for sigma between 1 and 1.5 px and degraded beyond 2 px, since
    the pyramid and the low-passed phase correlation already give a start close enough that
    the pre-filter is not needed to widen ECC's basin of convergence.
    """
    img = _finite_2d(image, "image")
    h, w = img.shape
    s = min(h, w, 256)
    y0, x0 = (h - s) // 2, (w - s) // 2
    crop = img[y0:y0 + s, x0:x0 + s]
    noise = noise_sigma(crop)
    signal = math.sqrt(max(float(crop.var()) - noise * noise, 1e-12 * float(crop.var()) + 1e-30))
    return float(np.clip(1.0 + 0.25 * noise / signal, 1.0, 2.0))


def _pyramid(img: np.ndarray, sigma: float, levels: int) -> list[np.ndarray]:
    out = [cv2.GaussianBlur(img, (0, 0), sigma) if sigma > 0 else img]
    for _ in range(levels):
        out.append(cv2.pyrDown(out[-1]))
    return out


def _max_move(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> float:
    """Largest distance (px) between where two transforms send the frame's corners."""
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], float)
    return float(np.linalg.norm(corners @ (a - b).T, axis=1).max())


class _Sample(NamedTuple):
    """A frame warped onto the bounding box of the reference-frame pixels it covers."""

    rows: slice         # rows of the box in the reference frame (with a stride)
    cols: slice         # columns of the box in the reference frame
    warped: np.ndarray  # the warped frame on the box, made zero-mean over the covered pixels
    mask: Optional[np.ndarray]  # float32 1 / 0 on the box where it is not a full rectangle
    count: int          # covered pixels in the box
    ref_mean: float     # mean of the (centred) reference over the covered pixels


class _EccObjective:
    """The ECC objective against one (pre-filtered) reference image, a frame or a level of
    its pyramid: the correlation, and inverse-compositional Gauss-Newton steps.

    The reference's Jacobian is computed once per burst, so a step costs one warp of the frame
    and a few sums of products, instead of the set-up and iterations of a
    ``cv2.findTransformECC`` call. Only the bounding box of the pixels the frame covers is
    warped and summed over; a translation covers a rectangle, so it needs no mask. Sums use
    ``np.einsum`` and OpenCV, never multi-threaded BLAS, whose thread hand-offs cost more than
    these single passes over memory. Linear interpolation, as in ECC. Transform parameters act
    about the frame centre, which keeps the normal equations well scaled.
    """

    def __init__(self, ref_f: np.ndarray, motion: str) -> None:
        h, w = ref_f.shape
        self.shape = (h, w)
        self.motion = motion
        # ECC ignores an intensity offset; a centred reference keeps float32 sums accurate
        self.ref = ref_f - np.float32(cv2.mean(ref_f)[0])
        self.centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
        self.xc = (np.arange(w, dtype=np.float32) - np.float32(self.centre[0]))[None, :]
        self.yc = (np.arange(h, dtype=np.float32) - np.float32(self.centre[1]))[:, None]
        gx = cv2.Sobel(ref_f, cv2.CV_32F, 1, 0, ksize=1, scale=0.5)
        gy = cv2.Sobel(ref_f, cv2.CV_32F, 0, 1, ksize=1, scale=0.5)
        self.jac = self._jacobian(gx, gy, self.xc, self.yc)

    def _sample(self, img_f: np.ndarray, warp: np.ndarray, stride: int = 1
                ) -> Optional[_Sample]:
        """``img_f`` warped by ``warp`` on every ``stride``-th row of the bounding box of the
        pixels it covers, zero-mean (and zero outside the covered pixels); None when it covers
        nothing."""
        first, last = _covered_bounds(warp, self.shape)
        inside = np.flatnonzero(first < last)
        if inside.size == 0:
            return None
        r0, r1 = int(inside[0]), int(inside[-1]) + 1  # the covered region is convex
        first, last = first[r0:r1:stride], last[r0:r1:stride]
        c0, c1 = int(first.min()), int(last.max())
        # box pixel (j, i) is reference pixel (c0 + j, r0 + stride * i)
        box = np.array(warp, np.float64)
        box[:, 2] += box[:, :2] @ (c0, r0)
        box[:, 1] *= stride
        warped = _warp(img_f, box, cv2.INTER_LINEAR, cv2.BORDER_REPLICATE,
                       size=(c1 - c0, len(first)))
        rows, cols = slice(r0, r1, stride), slice(c0, c1)
        if (first == c0).all() and (last == c1).all():
            mask, mask_u8, count = None, None, warped.size
        else:
            mask_u8 = _bounds_mask(first - c0, last - c0, c1 - c0).view(np.uint8)
            mask, count = mask_u8.astype(np.float32), int(np.count_nonzero(mask_u8))
        warped -= np.float32(cv2.mean(warped, mask_u8)[0])
        if mask is not None:
            warped *= mask
        return _Sample(rows, cols, warped, mask, count,
                       cv2.mean(self.ref[rows, cols], mask_u8)[0])

    def correlation(self, img_f: np.ndarray, warp: np.ndarray) -> float:
        """ECC correlation of ``img_f`` warped by ``warp`` with the reference, over the pixels
        it covers on every ``_SCORE_STRIDE``-th row: a score, not an estimate, whose sampling
        error, about ``(1 - ecc^2) / sqrt(pixels sampled)``, is ~1e-3 for 1024^2 frames."""
        s = self._sample(img_f, warp, _SCORE_STRIDE)
        if s is None:
            return 0.0
        ref = self.ref[s.rows, s.cols] - np.float32(s.ref_mean)
        if s.mask is not None:
            ref *= s.mask
        den = math.sqrt(_dot(s.warped, s.warped) * _dot(ref, ref))
        return _dot(s.warped, ref) / den if den > 0 else 0.0

    def step(self, img_f: np.ndarray, warp: np.ndarray) -> np.ndarray:
        """``warp`` after one Gauss-Newton step (unchanged where the step is undefined)."""
        s = self._sample(img_f, warp)
        if s is None:
            return warp
        img = s.warped
        ref = self.ref[s.rows, s.cols]
        img_norm = _dot(img, img)
        # The Hessian is summed over every _HESSIAN_STRIDE-th inner row of the box; it pairs
        # the reference's Jacobian with the warped frame's: their noises are independent, so it
        # is not inflated by gradient noise (which would shrink the step). The frame's offset
        # does not change its gradients; pixels next to uncovered ones see the zeros there,
        # which the mask then drops.
        bh, bw = img.shape
        sub = slice(1, bh - 1, _HESSIAN_STRIDE)
        n_sub = len(range(1, bh - 1, _HESSIAN_STRIDE))
        if img_norm <= 0 or n_sub == 0 or bw < 3:
            return warp
        ix = 0.5 * (img[sub, 2:] - img[sub, :-2])
        iy = 0.5 * (img[2::_HESSIAN_STRIDE][:n_sub, 1:-1] - img[0::_HESSIAN_STRIDE][:n_sub, 1:-1])
        rows = slice(s.rows.start + 1, s.rows.stop - 1, _HESSIAN_STRIDE)
        cols = slice(s.cols.start + 1, s.cols.stop - 1)
        jac_img = self._jacobian(ix, iy, self.xc[:, cols], self.yc[rows])
        in_sub = ix.size
        if s.mask is not None:
            inner = s.mask[sub, 1:-1] * s.mask[sub, 2:] * s.mask[sub, :-2]
            inner *= s.mask[2::_HESSIAN_STRIDE][:n_sub, 1:-1]
            inner *= s.mask[0::_HESSIAN_STRIDE][:n_sub, 1:-1]
            jac_img = [j * inner for j in jac_img]
            in_sub = int(np.count_nonzero(inner))
        if in_sub == 0:
            return warp
        # minimise |ref(W_d(x)) - gain * img(W(x))|^2 over d, then W <- W o W_d^-1; the
        # residual is zero outside the covered pixels (img is zero-mean there, so the gain
        # needs no centred reference)
        residual = cv2.addWeighted(img, _dot(img, ref) / img_norm, ref, -1.0, s.ref_mean)
        if s.mask is not None:
            residual *= s.mask
        gradient = np.array([_dot(j[s.rows, s.cols], residual) for j in self.jac])
        hessian = np.array([[_dot(a[rows, cols], b) for b in jac_img] for a in self.jac])
        hessian *= s.count / in_sub
        try:
            d = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return warp
        return self._compose(warp, d)

    def _jacobian(self, gx: np.ndarray, gy: np.ndarray, xc: np.ndarray,
                  yc: np.ndarray) -> list[np.ndarray]:
        """The K derivatives of an image warped by ``W_d`` with respect to ``d`` at ``d = 0``,
        from its gradients and the pixels' coordinates relative to the centre (broadcast)."""
        if self.motion == "translation":
            return [gx, gy]
        if self.motion == "euclidean":
            return [gy * xc - gx * yc, gx, gy]
        return [gx * xc, gx * yc, gx, gy * xc, gy * yc, gy]

    def _compose(self, warp: np.ndarray, d: np.ndarray) -> np.ndarray:
        """``warp o W_d^-1`` where ``W_d`` acts about the frame centre."""
        if self.motion == "translation":
            lin, shift = np.eye(2), d
        elif self.motion == "euclidean":
            c, s = math.cos(d[0]), math.sin(d[0])
            lin, shift = np.array([[c, -s], [s, c]]), d[1:]
        else:
            lin, shift = np.eye(2) + d[[0, 1, 3, 4]].reshape(2, 2), d[[2, 5]]
        step = np.eye(3)
        step[:2, :2] = lin
        step[:2, 2] = self.centre + shift - lin @ self.centre
        full = np.vstack([warp, [0.0, 0.0, 1.0]])
        return (full @ np.linalg.inv(step))[:2]


def _gauss_newton(objective: _EccObjective, img_f: np.ndarray, warp: np.ndarray, steps: int,
                  tol: float, longest: float) -> tuple[np.ndarray, bool]:
    """Up to ``steps`` Gauss-Newton steps of ``objective`` from ``warp``, stopping after one
    that moves the frame by less than ``tol`` px. A step longer than ``longest`` px means the
    linearisation does not hold: it is not taken. Returns the warp and whether it converged.

    (Keeping the transform of highest correlation instead of the last one would favour
    half-pixel positions, where linear interpolation smooths the noise away.)
    """
    for _ in range(steps):
        stepped = objective.step(img_f, warp)
        move = _max_move(warp, stepped, objective.shape)
        if move > longest:
            return warp, False
        warp = stepped
        if move < tol:
            return warp, True
    return warp, False


def _refine(ref_pyr: list[np.ndarray], img_pyr: list[np.ndarray], warp: np.ndarray,
            motion: str, criteria: tuple[int, int, float], coarsest: int, finest: int,
            objectives: dict[int, _EccObjective]) -> tuple[np.ndarray, Optional[str]]:
    """ECC coarse to fine, from level ``coarsest`` down to level ``finest``.

    At the levels in ``objectives`` (a translation's), Gauss-Newton steps of the ECC objective
    come first: from a start within a fraction of a pixel they converge in two or three steps,
    without the set-up of a ``cv2.findTransformECC`` call, which remains the fallback when they
    do not converge. ``warp`` and the returned warp are in full-resolution pixel coordinates:
    ``pyrDown`` maps pixel ``2 u`` to pixel ``u``, so only the translation column scales with
    the level. Returns the refined warp and None, or the best warp so far and why ECC failed.
    """
    for level in range(coarsest, finest - 1, -1):
        scale = 2.0 ** level
        w_l = warp.copy()
        w_l[:, 2] /= scale
        done = False
        if level in objectives:
            w_l, done = _gauss_newton(objectives[level], img_pyr[level], w_l,
                                      min(criteria[1], _LEVEL_STEPS), _LEVEL_TOL,
                                      _LEVEL_LONGEST)
        if not done:
            try:
                _, w_l = cv2.findTransformECC(ref_pyr[level], img_pyr[level],
                                              w_l.astype(np.float32), _CV_MOTION[motion],
                                              criteria, None, 1)
            except cv2.error as exc:
                # keep OpenCV's sentence, drop its source path and function name
                found = re.search(r"error: \([^)]*\) (.*?)(?: in function|$)", str(exc),
                                  re.DOTALL)
                reason = (found.group(1) if found else str(exc)).strip().rstrip(".")
                return warp, f"ECC failed at pyramid level {level} ({reason})"
        if not np.isfinite(w_l).all():
            return warp, f"ECC gave a non-finite transform at pyramid level {level}"
        warp = w_l.astype(np.float64)
        warp[:, 2] *= scale
    return warp, None


def register_burst(frames: Any, reference: Optional[int] = None, motion: str = "translation", *,
                   levels: Optional[int] = None, finest: Optional[int] = None,
                   sigma: Optional[float] = None, max_iter: int = 50, eps: float = 1e-4,
                   min_ecc: float = 0.2, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> RegistrationResult:
    """Register every frame of a burst directly to a reference frame.

    Parameters
    ----------
    frames
        (T, Y, X) stack with T >= 2 and frames of at least 16x16 pixels, any integer or float
        dtype, finite; or an array-like with ``shape``, ``dtype`` and ``__getitem__`` (a lazy
        reader), read one frame at a time.
    reference
        Index of the reference frame (negative indices count from the end); default ``T // 2``.
    motion
        ``"translation"``, ``"euclidean"`` (rotation + translation) or ``"affine"``.
    levels
        Number of ``cv2.pyrDown`` reductions below full resolution; phase correlation runs on
        the coarsest level. Default: as many as keep at least 96 pixels on the shorter side.
    finest
        Pyramid level at which ECC stops (0 = full resolution); default ``min(levels, 2)``.
        Above level 0 the transform is then polished at full resolution by Gauss-Newton steps
        of the ECC objective (usually one; with the reference's gradients computed once per
        burst), which replace the costly full-resolution ECC iterations. The result is always
        warped at full resolution. A translation's ECC starts one level below the phase
        correlation's (when that is not below ``finest``), with Gauss-Newton steps at each
        level and ``cv2.findTransformECC`` as their fallback.
    sigma
        Standard deviation, in full-resolution pixels, of the Gaussian pre-filter applied to
        every frame before registration (what ECC's ``gaussFiltSize`` does, done once per
        frame); default :func:`prefilter_sigma` of the reference frame (1 to 2 px, growing with
        the noise). The aligned output is not filtered.
    max_iter, eps
        ``cv2.findTransformECC`` stopping criteria at each pyramid level: at most ``max_iter``
        iterations, or stop when the correlation changes by less than ``eps``. A translation's
        Gauss-Newton steps at a level stop after one that moves the frame by less than 0.05 px
        of the level, or after ``min(max_iter, 10)`` steps (ECC then takes over).
    min_ecc
        Frames whose final ECC correlation is below this value are flagged as not converged.
    progress
        Optional ``progress(fraction, message)`` callback, called after each frame.
    cancel
        Optional :class:`~napari_microrestore.core.errors.CancelToken`, checked between frames.

    Returns
    -------
    RegistrationResult
        Frames that did not converge keep their best transform (at worst the phase-correlation
        translation), are flagged in ``converged`` and explained in ``messages``.
    """
    frames, (n, h, w) = _check_stack(frames)
    if motion not in MOTIONS:
        raise InputError(f"motion must be one of {MOTIONS}; got {motion!r}")
    ref_index = n // 2 if reference is None else reference
    if isinstance(ref_index, bool) or int(ref_index) != ref_index or not -n <= ref_index < n:
        raise InputError(f"reference must be a frame index in [0, {n - 1}]; got {reference!r}")
    ref_index = int(ref_index) % n
    max_levels = math.floor(math.log2(min(h, w) / 8))
    if levels is None:
        levels = _auto_levels((h, w))
    elif int(levels) != levels or not 0 <= levels <= max_levels:
        raise InputError(f"levels must be an integer in [0, {max_levels}] for {h}x{w} frames "
                         f"(the coarsest level keeps >= 8 px); got {levels!r}")
    levels = int(levels)
    if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
        raise InputError(f"sigma must be a finite number >= 0 (pixels); got {sigma!r}")
    if finest is not None and (int(finest) != finest or not 0 <= finest <= levels):
        raise InputError(f"finest must be an integer level in [0, levels={levels}]; "
                         f"got {finest!r}")
    if int(max_iter) != max_iter or max_iter < 1:
        raise InputError(f"max_iter must be a positive integer; got {max_iter!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise InputError(f"eps must be a finite number >= 0; got {eps!r}")
    if not math.isfinite(min_ecc):
        raise InputError(f"min_ecc must be a finite number (a correlation); got {min_ecc!r}")
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, int(max_iter), float(eps))

    check_cancel(cancel)
    ref = _read_frame(frames, ref_index, (h, w))
    if sigma is None:
        sigma = prefilter_sigma(ref)
    finest = min(levels, _FINEST) if finest is None else int(finest)
    ref_pyr = _pyramid(ref, sigma, levels)
    scale = 2.0 ** levels
    # phase correlation weights the spectrum by the Gaussian the coarsest level went through:
    # the pre-filter and the pyrDown kernels (variance 4^i full-res px^2 at level i)
    pc_lowpass = math.sqrt(sigma ** 2 + (4.0 ** levels - 1.0) / 3.0) / scale
    # A translation is all that phase correlation measures, to 1/10 px of the coarsest level:
    # ECC there would only add iterations (it converges slowly on such blurred images), so it
    # starts one level finer, well inside its basin. Other motions need it for the rotation.
    coarsest = levels - 1 if motion == "translation" and levels > finest else levels
    full = _EccObjective(ref_pyr[0], motion)
    objectives = ({level: full if level == 0 else _EccObjective(ref_pyr[level], motion)
                   for level in range(finest, coarsest + 1)} if motion == "translation" else {})
    aligned = np.empty((n, h, w), np.float32)
    transforms = np.tile(np.eye(2, 3), (n, 1, 1))
    ecc = np.ones(n)
    converged = np.ones(n, bool)
    coverage = np.ones((h, w), bool)
    messages: list[str] = []
    aligned[ref_index] = ref
    report(progress, 1.0 / n, f"reference frame {ref_index}")
    for done, t in enumerate((t for t in range(n) if t != ref_index), start=2):
        check_cancel(cancel)
        img = _read_frame(frames, t, (h, w))
        img_pyr = _pyramid(img, sigma, levels)
        dy, dx, _ = phase_correlation(ref_pyr[-1], img_pyr[-1], lowpass=pc_lowpass)
        start = np.array([[1.0, 0.0, dx * scale], [0.0, 1.0, dy * scale]])
        warp, failure = _refine(ref_pyr, img_pyr, start, motion, criteria, coarsest, finest,
                                objectives)
        # full-resolution polish: Gauss-Newton steps while a step moves the frame by more than
        # _POLISH_TOL px (one is usually enough; more add noise, not accuracy); a step longer
        # than a pixel of the finest ECC level is not taken
        if failure is None and finest > 0:
            warp, _ = _gauss_newton(full, img_pyr[0], warp, _POLISH_STEPS, _POLISH_TOL,
                                    2.0 ** finest)
        ecc[t] = full.correlation(img_pyr[0], warp)
        valid = _covered(warp, (h, w))
        transforms[t] = warp
        _warp(img, warp, cv2.INTER_LINEAR, cv2.BORDER_REPLICATE, out=aligned[t])
        coverage &= valid
        overlap = float(valid.mean())
        if failure is None and overlap < _MIN_OVERLAP:
            failure = (f"the registered frame covers only {overlap:.0%} of the reference frame "
                       f"(ECC wandered off)")
        if failure is None and ecc[t] < min_ecc:
            failure = f"its ECC correlation {ecc[t]:.3f} is below min_ecc={min_ecc:g}"
        if failure is not None:
            converged[t] = False
            messages.append(f"frame {t} did not converge: {failure}; kept shift (dy, dx) = "
                            f"({warp[1, 2]:.2f}, {warp[0, 2]:.2f}) px")
        report(progress, done / n, f"registered frame {t}")
    return RegistrationResult(aligned=aligned, transforms=transforms, ecc=ecc,
                              converged=converged, coverage=coverage, reference=ref_index,
                              motion=motion, messages=messages, sigma=float(sigma))
