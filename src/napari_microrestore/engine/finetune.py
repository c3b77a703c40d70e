"""finetune(): adapt a shipped burst model to the user's own burst, in minutes.

Supported base models: the burst networks (task ``burst-deblur``: ``tem-burst-fast``,
``tem-burst``) and the 3-frames-as-channels baseline (task ``single-deblur``: ``tem-single``).
ssTEM, super-resolution and defocus models and the classical methods are refused with an
:class:`~napari_microrestore.core.errors.InputError`: their data are not a burst.

What happens, in order:

1. The burst is registered once to its reference frame (``core.registration``, as
   :func:`~napari_microrestore.engine.restore.restore` does) and normalised by the mean / std
   of the covered pixels, so the net sees exactly what it sees at inference.
2. A *holdout* crop (default: a square at the bottom-right corner of the covered region) is
   kept out of training: no training patch overlaps it. It gives the validation score and the
   preview, restored with the current weights every few seconds.
3. Random patches of the rest are cut from the registered stack with the same random flip
   for every frame and the target. Flips only, no 90-degree rotations: the motion blur of one
   microscope has one direction, and a rotation would teach the net a direction the user's
   data never have. The prediction is flipped back before the loss, so targets and blur
   kernels stay in the data's own orientation.
4. AdamW with a small learning rate and gradient clipping; the net stays in eval mode (frozen
   BatchNorm statistics, no dropout), since batches of a few patches of one scene would make
   poor BatchNorm statistics. The weights with the best holdout score are kept.

Training targets
----------------
* ``mode="pairs"``: the target is the user's clean ``reference`` image (same shape as one
  frame, in the reference frame's coordinates), mapped to the burst's intensity units by a
  gain + offset fitted on low-passed versions of both (so the motion blur of the burst does
  not bias the fit), and normalised like the burst. Loss: L1 + SSIM (``train.make_loss``),
  score: PSNR / SSIM on the holdout after a gain + offset fit; best = highest PSNR.
* ``mode="self-supervised"``: no clean image. Noise2Noise across the burst: the input is the
  registered burst *without* frame ``k`` (the nets are permutation invariant and take a
  variable number of frames), the target is the registered frame ``k``, whose noise is
  independent of the input frames. A plain Noise2Noise target would be wrong for a deblurring
  net: the expectation of frame ``k`` is the scene *blurred by frame k's motion*, so the net
  would learn to put the blur back. Instead the prediction is re-blurred by the burst's motion
  PSF (length and direction measured on the burst by ``core.probes.estimate_degradation``)
  before it is compared with frame ``k``: E[frame k] = PSF * scene, so the minimiser of the
  expected loss is the sharp scene. The loss is the squared error (whose minimiser is the
  mean; SSIM against a noisy target has no such property). The per-frame variation of the
  blur is not modelled (one PSF for the burst). Score without a reference: the same
  re-blurred loss on the holdout, averaged over every left-out frame (lower is better); with
  a ``reference`` (never trained on), PSNR as in pairs mode.

Cancel keeps the best weights: a cancelled fine-tune *returns* its best result with
``cancelled=True`` instead of raising ``Cancelled`` (the scheduler treats a raised
``Cancelled`` as "no result"). Cancelling before the first holdout score raises as usual.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import __version__
from ..core import metrics
from ..core.errors import CancelToken, InputError, ProgressCallback, check_cancel, report
from ..core.orient import Rotation
from ..models.zoo import PACKAGE_ZOO, ModelCard, get_card, list_cards, sha256_file, user_model_dir

MODES = ("pairs", "self-supervised")
SUPPORTED_TASKS = ("burst-deblur", "single-deblur")

#: Presets the widget offers (and the benchmark uses): budget in seconds, patch side, batch.
PRESETS: dict[str, dict[str, Any]] = {
    "CPU quick": {"budget_seconds": 120.0, "patch": 96, "batch": 4, "lr": 3e-4},
    "GPU": {"budget_seconds": 20.0, "patch": 128, "batch": 16, "lr": 3e-4},
}


@dataclass
class FinetuneUpdate:
    """A typed update sent while fine-tuning (the widget plots and previews these).

    ``score`` is the holdout score of this evaluation (PSNR in dB with a reference, else the
    self-supervised holdout loss); ``preview`` is the holdout crop restored with the current
    weights, in the input's units (only on evaluations), of the ``holdout`` crop ``(y, x,
    height, width)`` of the reference frame."""

    step: int
    seconds: float
    loss: Optional[float]
    score: Optional[float] = None
    best: Optional[float] = None
    preview: Optional[np.ndarray] = None
    holdout: Optional[tuple] = None


@dataclass
class FinetuneResult:
    """What :func:`finetune` (or :func:`adapt`) made; :func:`save_finetuned` writes it.

    ``net`` holds the best weights (CPU, eval mode); ``card`` is the model card without id /
    title / weights (filled by :func:`save_finetuned`); ``before`` / ``after`` are the holdout
    scores of the base model and of ``net``; ``preview_before`` / ``preview_after`` the holdout
    crop restored by each, in the input's units; ``holdout`` its ``(y, x, height, width)``."""

    net: Any
    card: dict
    base: ModelCard
    mode: str
    before: dict
    after: dict
    history: list = field(default_factory=list)
    best_step: int = 0
    steps: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    cancelled: bool = False
    holdout: tuple = (0, 0, 0, 0)
    preview_before: Optional[np.ndarray] = None
    preview_after: Optional[np.ndarray] = None


# --------------------------------------------------------------------------------------------
# preparation: registration, normalisation, target, holdout
# --------------------------------------------------------------------------------------------
@dataclass
class _Data:
    x: np.ndarray                  # (T, Y, X) registered, normalised
    coverage: np.ndarray           # (Y, X) bool
    mean: float
    std: float
    target: Optional[np.ndarray]   # (Y, X) normalised clean target (pairs) or None
    psf: Optional[np.ndarray]      # self-supervised motion PSF
    blur: dict                     # its measured length / angle (self-supervised)
    holdout: tuple                 # (y, x, h, w)
    region: tuple                  # (y0, y1, x0, x1) covered rows / cols
    frames_used: list
    reference: int
    registration: dict
    # the net's view: rotated until the stage motion runs along the columns (see
    # engine.restore.burst_orientation; None: as recorded); x, coverage (False outside the
    # frame), target, holdout and region are then on the rotated canvas, and the previews
    # are turned back
    rotation: Optional[Rotation] = None
    orientation: Optional[dict] = None
    # the holdout in the user's frame: as given, or the default one turned back (exact for
    # quarter turns; otherwise the box of the same size around where its centre comes from)
    holdout_shown: Optional[tuple] = None


def _turn_box(box: tuple, turn: Optional[Rotation], inverse: bool = False) -> tuple:
    """``(y, x, h, w)`` box of the frame on the canvas of ``turn`` (or back, ``inverse``): the
    box of the same size (swapped by an odd number of quarter turns) around where its centre
    lands, clipped to the target grid."""
    y, x, h, w = (int(v) for v in box)
    if turn is None:
        return (y, x, h, w)
    cy, cx = turn.point(y + (h - 1) / 2.0, x + (w - 1) / 2.0, inverse=inverse)
    if turn.k % 2:
        h, w = w, h
    gh, gw = turn.shape if inverse else turn.canvas
    h, w = min(h, gh), min(w, gw)
    y0 = int(np.clip(round(cy - (h - 1) / 2.0), 0, gh - h))
    x0 = int(np.clip(round(cx - (w - 1) / 2.0), 0, gw - w))
    return (y0, x0, h, w)


def _fully_covered(coverage: np.ndarray, h: int, w: int) -> np.ndarray:
    """(Y - h + 1, X - w + 1) bool: whether the h x w box at each top-left corner lies wholly
    in ``coverage``."""
    c = np.zeros((coverage.shape[0] + 1, coverage.shape[1] + 1), np.int64)
    c[1:, 1:] = np.cumsum(np.cumsum(coverage, 0), 1)
    inside = c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]
    return inside == h * w


def base_card(model: str | ModelCard) -> ModelCard:
    """The base model's card, checked to be a fine-tunable network."""
    card = model if isinstance(model, ModelCard) else get_card(model)
    if card.is_classical:
        raise InputError(f"model {card.id} is a classical method: there are no weights to "
                         "fine-tune")
    if card.task not in SUPPORTED_TASKS:
        raise InputError(f"fine-tuning supports burst models ({', '.join(SUPPORTED_TASKS)}); "
                         f"model {card.id} is a {card.task} model")
    return card


def _as_burst(data: Any, need: int) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise InputError(f"fine-tuning needs a (T, Y, X) burst; got shape {arr.shape}")
    if arr.shape[0] < need:
        raise InputError(f"this fine-tuning needs a burst of at least {need} frames; got "
                         f"{arr.shape[0]}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError("the burst contains NaN or infinite values")
    return arr


def default_holdout(coverage: np.ndarray, side: Optional[int] = None,
                    multiple: int = 8) -> tuple[int, int, int, int]:
    """A square at the bottom-right corner of the covered region (the wholly covered one
    nearest it when the region is not a rectangle): ``(y, x, h, w)``.

    Side: a quarter of the covered region's shorter side, 64 to 192 px (at least 32 px on
    small images), rounded down to ``multiple``."""
    y0, y1, x0, x1 = _covered_box(coverage)
    short = min(y1 - y0, x1 - x0)
    if side is None:
        side = int(np.clip(short // 4, 64, 192))
        side = min(side, max(32, short // 3))
    side = side // multiple * multiple
    if side < multiple or side > short:
        raise InputError(f"the covered region {y1 - y0}x{x1 - x0} px is too small for a "
                         "holdout crop")
    ok = _fully_covered(coverage, side, side)
    if ok[y1 - side, x1 - side]:
        return (y1 - side, x1 - side, side, side)
    # a covered region that is not a rectangle (a rotated view, an affine registration): the
    # wholly covered square nearest the bottom-right corner
    ys, xs = np.nonzero(ok)
    if not len(ys):
        raise InputError(f"no {side} px holdout square fits in the covered region")
    i = int(np.argmax(ys + xs))
    return (int(ys[i]), int(xs[i]), side, side)


def _covered_box(coverage: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(coverage.any(1)), np.flatnonzero(coverage.any(0))
    if not len(rows):
        raise InputError("the registered frames have no pixel in common")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _fit_reference(reference: np.ndarray, mean_img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``reference`` mapped to the burst's units: the gain + offset that best maps a low-passed
    reference onto the low-passed registered mean (low-passing first keeps the burst's motion
    blur from biasing the gain)."""
    from scipy.ndimage import gaussian_filter

    gain, offset = metrics.fit_gain_offset(gaussian_filter(reference, 6.0),
                                           gaussian_filter(mean_img, 6.0), mask=mask)
    if not gain > 0:
        raise InputError("the reference image does not resemble the burst (no positive "
                         "correlation with the registered frames); is it the same field?")
    return (gain * reference + offset).astype(np.float32)


def _prepare(frames: np.ndarray, card: ModelCard, mode: str, reference: Optional[np.ndarray],
             reference_frame: Optional[int], holdout: Optional[tuple],
             progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> _Data:
    from ..core.registration import register_burst
    from .restore import _normalise, _select_frames, burst_orientation

    n = frames.shape[0]
    ref = n // 2 if reference_frame is None else int(reference_frame)
    if not 0 <= ref < n:
        raise InputError(f"reference frame {reference_frame} is outside the burst's 0..{n - 1}")
    # the frames restore() would use, plus one more in self-supervised mode (one is left out)
    max_frames = card.frames["max"] + (1 if mode == "self-supervised" else 0)
    used = _select_frames(n, ref, max_frames)
    frames = frames[used]
    ref_local = used.index(ref)
    reg = register_burst(frames, reference=ref_local,
                         progress=None if progress is None else
                         (lambda f, m: progress(0.1 * f, f"registering: {m}")), cancel=cancel)
    cov = reg.coverage
    shape = cov.shape
    # the base model's view of the burst, as restore() gives it: rotated until the stage
    # motion runs along the columns (fine-tuning must see what inference does)
    orientation = burst_orientation(card, reg.aligned.shape, reg.transforms, frames=frames)
    turn: Optional[Rotation] = Rotation(shape, orientation["rotation_deg"])
    if turn.identity:
        turn = None
    aligned = reg.aligned
    x, mean, std = _normalise(aligned, cov if cov.any() else None)
    target = None
    if reference is not None:
        ref_img = np.asarray(reference)
        if ref_img.shape != frames.shape[1:]:
            raise InputError(f"the reference image must have a frame's shape "
                             f"{frames.shape[1:]}; got {ref_img.shape}")
        ref_img = ref_img.astype(np.float32)
        if not np.isfinite(ref_img).all():
            raise InputError("the reference image contains NaN or infinite values")
        target = (_fit_reference(ref_img, aligned.mean(0), cov) - mean) / std
    psf, blur = None, {}
    if mode == "self-supervised":
        from ..core import degrade, probes

        # read on the frames as recorded: a warp's interpolation smooths the noise, and the
        # estimate on registered frames often finds no blur (the PSF then does nothing)
        est = probes.estimate_degradation(frames)
        angle = float(est.blur_angle)  # the user's view; the PSF is used in the net's
        net_angle = (angle - orientation["rotation_deg"]) % 180.0
        psf = degrade.motion_psf(est.blur_length, net_angle) if est.blur_length > 0 \
            else np.ones((1, 1), np.float32)
        blur = {"blur_length": round(float(est.blur_length), 2), "blur_angle": round(angle, 1)}
    if turn is not None:   # into the net's view
        x = turn.forward(x)
        target = None if target is None else turn.forward(target)
        cov = turn.valid(cov)
    box = _covered_box(cov)
    shown_box = None
    if holdout is None:
        holdout = default_holdout(cov, multiple=card.multiple)
    else:
        holdout = tuple(int(v) for v in holdout)
        m = card.multiple
        if len(holdout) != 4:
            raise InputError(f"holdout must be (y, x, height, width); got {holdout}")
        hy, hx, hh, hw = holdout
        if (hh < m or hw < m or hy < 0 or hx < 0
                or hy + hh > shape[0] or hx + hw > shape[1]):
            raise InputError(f"holdout {holdout} (y, x, height, width) must lie inside the "
                             f"{shape[0]}x{shape[1]} frame and be at least {m} px")
        shown_box = (hy, hx, hh // m * m, hw // m * m)
        holdout = _turn_box(shown_box, turn)
        # scored where every registered frame covers it (the loss mask), so it may reach
        # past that region, but not lie wholly outside it
        if not cov[holdout[0]:holdout[0] + holdout[2], holdout[1]:holdout[1] + holdout[3]].any():
            raise InputError(f"holdout {tuple(int(v) for v in (hy, hx, hh, hw))} (y, x, "
                             "height, width) lies outside the region every registered frame "
                             "covers; move it inwards")
    if shown_box is None:
        shown_box = _turn_box(holdout, turn, inverse=True)
    return _Data(x=x.astype(np.float32), coverage=cov, mean=mean, std=std, target=target,
                 psf=psf, blur=blur, holdout=holdout, region=box, frames_used=used,
                 reference=ref_local, registration=reg.to_dict(), rotation=turn,
                 orientation=orientation, holdout_shown=shown_box)


# --------------------------------------------------------------------------------------------
# patches
# --------------------------------------------------------------------------------------------
def _patch_origins(d: _Data, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """All top-left corners (y, x) of patches inside the covered region that do not overlap
    the holdout crop."""
    y0, y1, x0, x1 = d.region
    ys, xs = np.arange(y0, y1 - patch + 1), np.arange(x0, x1 - patch + 1)
    if not len(ys) or not len(xs):
        raise InputError(f"the covered region {y1 - y0}x{x1 - x0} px is smaller than the "
                         f"{patch} px training patch")
    hy, hx, hh, hw = d.holdout
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    clear = (yy + patch <= hy) | (yy >= hy + hh) | (xx + patch <= hx) | (xx >= hx + hw)
    clear &= _fully_covered(d.coverage, patch, patch)[yy, xx]
    if not clear.any():
        raise InputError(f"no {patch} px training patch fits beside the holdout crop; use a "
                         "larger burst or a smaller patch")
    return yy[clear], xx[clear]


def _frame_sets(n: int, ref: int, mode: str, n_in: int, channels_in: bool,
                rng: np.random.Generator) -> tuple[list[int], Optional[int]]:
    """(input frame indices, left-out target frame or None) for one sample."""
    if mode == "pairs":
        frames = list(range(n))
        if channels_in:
            # the frames restore() feeds a channels net: n_in nearest the reference, in order
            start = min(max(0, ref - n_in // 2), n - n_in)
            frames = frames[start:start + n_in]
        return frames, None
    k = int(rng.integers(n))
    others = [i for i in range(n) if i != k]
    if channels_in:
        others = sorted(rng.choice(others, size=n_in, replace=False).tolist())
    return others, k


def _sample_batch(d: _Data, origins: tuple, rng: np.random.Generator, batch: int, patch: int,
                  mode: str, n_in: int, channels_in: bool) -> dict:
    ys, xs = origins
    xb, tb, mb, flips = [], [], [], []
    for _ in range(batch):
        i = int(rng.integers(len(ys)))
        sl = np.s_[ys[i]:ys[i] + patch, xs[i]:xs[i] + patch]
        inputs, k = _frame_sets(len(d.x), d.reference, mode, n_in, channels_in, rng)
        flip = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        x = d.x[(slice(None),) + sl][inputs]      # crop first: never copy whole frames
        if flip[0]:
            x = x[:, ::-1]
        if flip[1]:
            x = x[:, :, ::-1]
        xb.append(np.ascontiguousarray(x))
        tb.append(d.target[sl] if k is None else d.x[k][sl])
        mb.append(d.coverage[sl])
        flips.append(flip)
    return {"x": np.stack(xb), "y": np.stack(tb)[:, None].astype(np.float32),
            "mask": np.stack(mb)[:, None].astype(np.float32), "flips": flips}


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------
def _reblur(pred, psf_t):
    """Convolve (N, 1, H, W) ``pred`` with the motion PSF (zero padding; the loss mask drops
    the border it affects)."""
    import torch.nn.functional as F

    if psf_t is None or psf_t.shape[-1] == 1:
        return pred
    kh, kw = psf_t.shape[-2:]
    return F.conv2d(pred, psf_t.flip(-2, -1), padding=(kh // 2, kw // 2))


def _border_mask(mask, psf_t):
    """``mask`` with the border that zero padding of the re-blur corrupts set to 0."""
    if psf_t is None or psf_t.shape[-1] == 1:
        return mask
    kh, kw = psf_t.shape[-2:]
    m = mask.clone()
    m[..., : kh // 2, :] = 0
    m[..., m.shape[-2] - kh // 2:, :] = 0
    m[..., :, : kw // 2] = 0
    m[..., :, m.shape[-1] - kw // 2:] = 0
    return m


def _forward(net, x, channels_in: bool, device: str):
    import torch

    with torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                        enabled=device.startswith("cuda")):
        return net(x if channels_in else x[:, :, None]).float()


class _Holdout:
    """Scores the net on the holdout crop; keeps the inputs as tensors on the device."""

    def __init__(self, d: _Data, mode: str, n_in: int, channels_in: bool, device: str,
                 psf_t, border: int = 4):
        import torch

        hy, hx, hh, hw = d.holdout
        sl = np.s_[hy:hy + hh, hx:hx + hw]
        self.d, self.mode, self.device, self.channels_in = d, mode, device, channels_in
        self.psf_t, self.border = psf_t, border
        self.mask = d.coverage[sl]
        self.truth = None if d.target is None else d.target[sl]
        n = len(d.x)
        crop = torch.from_numpy(np.ascontiguousarray(d.x[(slice(None),) + sl])).to(device)
        pairs_inputs, _ = _frame_sets(n, d.reference, "pairs", n_in, channels_in, None)
        self.preview_input = crop[pairs_inputs][None]
        self.loo = []  # (inputs, target) for every left-out frame (self-supervised)
        if mode == "self-supervised":
            for k in range(n):
                others = [i for i in range(n) if i != k]
                if channels_in:  # the n_in frames nearest k
                    others = sorted(sorted(others, key=lambda i: abs(i - k))[:n_in])
                self.loo.append((crop[others][None], crop[k][None, None]))
        m = torch.from_numpy(self.mask.astype(np.float32))[None, None].to(device)
        self.loss_mask = _border_mask(m, psf_t)
        # the preview turned back in place, onto the holdout as the user sees it
        turn = d.rotation
        self.turn_back = None if turn is None else Rotation(
            (hw, hh) if turn.k % 2 else (hh, hw), turn.phi, canvas=(hh, hw))

    def __call__(self, net) -> tuple[dict, np.ndarray]:
        """(scores, preview in the input's units). Scores: ``psnr`` / ``ssim`` with a reference,
        ``loss`` (self-supervised holdout loss) in self-supervised mode, and ``score``: the
        value that decides the best weights (higher is better)."""
        import torch

        with torch.inference_mode():
            pred = _forward(net, self.preview_input, self.channels_in, self.device)
            pred_np = pred[0, 0].cpu().numpy()
            scores: dict = {}
            if self.mode == "self-supervised":
                losses = []
                for inp, tgt in self.loo:
                    p = _reblur(_forward(net, inp, self.channels_in, self.device), self.psf_t)
                    err = ((p - tgt) ** 2 * self.loss_mask).sum() / self.loss_mask.sum()
                    losses.append(float(err))
                scores["loss"] = float(np.mean(losses))
                scores["score"] = -scores["loss"]
        if self.truth is not None:
            r = metrics.compare(pred_np, self.truth, mask=self.mask, border=self.border, fit=True)
            scores.update(psnr=float(r["psnr"]), ssim=float(r["ssim"]))
            scores["score"] = scores["psnr"]
        if self.turn_back is not None:  # the user's orientation (corners outside: the mean)
            pred_np = self.turn_back.inverse(pred_np, fill="zeros")
        preview = (pred_np * self.d.std + self.d.mean).astype(np.float32)
        return scores, np.ascontiguousarray(preview)


def finetune(model: str | ModelCard, data: Any, *, mode: str = "pairs",
             reference: Optional[np.ndarray] = None, budget_seconds: Optional[float] = 120.0,
             steps: Optional[int] = None, lr: float = 3e-4, patch: int = 96, batch: int = 4,
             device: str = "cpu", holdout: Optional[tuple] = None,
             reference_frame: Optional[int] = None, eval_seconds: Optional[float] = None,
             seed: int = 0, threads: Optional[int] = None, data_name: str = "burst",
             stop: Optional[CancelToken] = None, progress: Optional[ProgressCallback] = None,
             on_update: Optional[Callable[[FinetuneUpdate], None]] = None,
             cancel: Optional[CancelToken] = None) -> FinetuneResult:
    """Fine-tune ``model`` on the burst ``data`` ((T, Y, X) raw frames, acquisition order).

    ``mode``: ``"pairs"`` (needs ``reference``: the clean image of the reference frame's
    field) or ``"self-supervised"`` (``reference``, if given, only scores the holdout).
    Stops after ``budget_seconds`` of wall-clock time (registration and scoring included) or
    ``steps`` optimiser steps, whichever comes first (at least one must be given; at least one
    step is made). ``patch``
    (rounded to the net's multiple) and ``batch`` set the training batch, ``lr`` AdamW's
    learning rate, ``holdout`` the ``(y, x, height, width)`` crop kept out of training (default: see
    :func:`default_holdout`), ``eval_seconds`` how often the holdout is scored and previewed
    (default: a twentieth of the budget, at least 1 s; every 10 steps without a budget).
    ``threads``: torch CPU threads while it runs (default: all cores; restored after).
    ``data_name`` describes the data in the card (the layer's name).

    Returns the best weights on the holdout; a run stopped by ``cancel`` or ``stop`` returns
    them too, with ``cancelled=True`` (see the module notes). ``stop`` exists for the napari
    widget: the scheduler drops the result of a job whose own cancel token was set, so the
    widget's Cancel sets ``stop`` instead to end the run early and still get its best weights.
    """
    from .restore import resolve_device

    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "pairs" and reference is None:
        raise InputError("pairs mode needs a clean reference image of the burst's field")
    if budget_seconds is None and steps is None:
        raise InputError("give a time budget or a number of steps")
    if budget_seconds is not None and not budget_seconds > 0:
        raise InputError(f"the time budget must be positive; got {budget_seconds}")
    if steps is not None and steps < 1:
        raise InputError(f"steps must be at least 1; got {steps}")
    if not lr > 0 or batch < 1 or patch < 16:
        raise InputError(f"lr must be > 0, batch >= 1 and patch >= 16; got {lr}, {batch}, "
                         f"{patch}")
    card = base_card(model)
    channels_in = card.task == "single-deblur"
    n_in = card.frames["max"] if channels_in else 0
    need = (n_in or 2) + (1 if mode == "self-supervised" else 0)
    frames = _as_burst(data, max(need, card.frames["min"]))
    dev = resolve_device(device)
    import torch

    from ..models.zoo import load_model
    from .train import make_loss

    t0 = time.perf_counter()  # after the one-time import of torch

    prev_threads = torch.get_num_threads()
    if dev == "cpu":
        torch.set_num_threads(int(threads or os.cpu_count() or 1))
    device_name = _device_name(dev)
    try:
        report(progress, 0.0, "registering the burst")
        d = _prepare(frames, card, mode, reference, reference_frame, holdout, progress, cancel)
        patch = max(card.multiple, patch // card.multiple * card.multiple)
        origins = _patch_origins(d, patch)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = load_model(card, device=dev)      # a fresh copy: restore()'s cache is untouched
        net.eval()
        psf_t = None if d.psf is None else torch.from_numpy(
            np.asarray(d.psf, np.float32))[None, None].to(dev)
        score_holdout = _Holdout(d, mode, n_in, channels_in, dev, psf_t)
        check_cancel(cancel)
        before, preview_before = score_holdout(net)
        best = {"score": before["score"], "step": 0, "headline": _headline(before),
                "state": copy.deepcopy(net.state_dict())}
        history = [{"step": 0, "seconds": round(time.perf_counter() - t0, 3), "loss": None,
                    **before}]
        if on_update is not None:
            on_update(FinetuneUpdate(0, time.perf_counter() - t0, None, _headline(before),
                                     _headline(before), preview_before, d.holdout_shown))
        # foreach: one fused update for all tensors, instead of a Python loop per tensor that
        # holds the GIL (and so slows the GUI thread) far longer
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, foreach=True)
        loss_fn = make_loss({"l1": 1.0, "ssim": 1.0})
        if budget_seconds is not None:
            eval_every = eval_seconds or max(1.0, budget_seconds / 20)
        step, last_eval, t_eval, cancelled = 0, time.perf_counter(), 0.0, False

        def evaluate(upd: FinetuneUpdate) -> None:
            """Score the holdout now; keep the weights if best; put the score and preview in
            ``upd`` and in the last history entry."""
            nonlocal best
            scores, preview = score_holdout(net)
            if scores["score"] > best["score"]:
                best = {"score": scores["score"], "step": step, "headline": _headline(scores),
                        "state": copy.deepcopy(net.state_dict())}
            history[-1].update(scores)
            upd.score, upd.preview = _headline(scores), preview
            upd.holdout = d.holdout_shown
            upd.best = best["headline"]

        step_time = 0.0
        while True:
            now = time.perf_counter()
            elapsed = now - t0
            if steps is not None and step >= steps:
                break
            # stop early enough that the last step and the final holdout score fit the budget
            # (but make one step, however slow the preparation was)
            if (budget_seconds is not None and step > 0
                    and elapsed + step_time + t_eval > budget_seconds):
                break
            if (cancel is not None and cancel.cancelled) or (stop is not None and stop.cancelled):
                cancelled = True
                break
            ts = time.perf_counter()
            b = _sample_batch(d, origins, rng, batch, patch, mode, n_in, channels_in)
            x, y, m = (torch.from_numpy(b[k]).to(dev) for k in ("x", "y", "mask"))
            pred = _forward(net, x, channels_in, dev)
            # undo the flips so targets and the blur kernel stay in the data's orientation
            pred = torch.stack([p.flip(*[ax for ax, f in zip((-2, -1), fl) if f])
                                if any(fl) else p for p, fl in zip(pred, b["flips"])])
            if mode == "pairs":
                total, _ = loss_fn(pred, y, m)
            else:
                mm = _border_mask(m, psf_t)
                total = ((_reblur(pred, psf_t) - y) ** 2 * mm).sum() / mm.sum().clamp_min(1.0)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            step_time = 0.8 * step_time + 0.2 * (time.perf_counter() - ts) if step > 1 \
                else time.perf_counter() - ts
            loss = float(total.detach())
            now = time.perf_counter()
            due = (now - last_eval >= eval_every) if budget_seconds is not None \
                else step % 10 == 0
            last = (steps is not None and step >= steps) or (
                budget_seconds is not None and now - t0 + step_time + t_eval > budget_seconds)
            upd = FinetuneUpdate(step, now - t0, loss)
            history.append({"step": step, "seconds": round(now - t0, 3), "loss": loss})
            if due or last:
                te = time.perf_counter()
                evaluate(upd)
                t_eval = time.perf_counter() - te
                last_eval = time.perf_counter()
            upd.best = best["headline"]
            if on_update is not None:
                on_update(upd)
            frac = (now - t0) / budget_seconds if budget_seconds is not None else step / steps
            if steps is not None and budget_seconds is not None:
                frac = max(frac, step / steps)
            report(progress, 0.1 + 0.9 * frac, f"step {step}, loss {loss:.4f}")
        if cancelled and step > 0 and "score" not in history[-1]:
            # stopped between two scores: score the latest weights too before choosing
            upd = FinetuneUpdate(step, time.perf_counter() - t0, history[-1]["loss"])
            evaluate(upd)
            if on_update is not None:
                on_update(upd)
        net.load_state_dict(best["state"])
        after, preview_after = score_holdout(net) if best["step"] else (before, preview_before)
        net = net.cpu().eval()
    finally:
        if dev == "cpu":
            torch.set_num_threads(prev_threads)
    seconds = time.perf_counter() - t0
    result = FinetuneResult(
        net=net, card={}, base=card, mode=mode, before=before, after=after, history=history,
        best_step=int(best["step"]), steps=step, seconds=round(seconds, 3), device=dev,
        cancelled=cancelled, holdout=d.holdout_shown,
        preview_before=preview_before, preview_after=preview_after)
    params = {"mode": mode, "budget_seconds": budget_seconds, "steps": steps, "lr": lr,
              "patch": patch, "batch": batch, "holdout": list(result.holdout),
              "reference_frame": reference_frame, "seed": seed,
              "reference_given": reference is not None}
    data_info = {"name": data_name, "shape": [int(v) for v in frames.shape],
                 "frames_used": d.frames_used, "registration": {
                     k: d.registration[k] for k in ("reference", "motion", "shifts", "ecc")},
                 "motion_direction": d.orientation}
    if d.blur:
        data_info["measured_motion_blur"] = d.blur
    result.card = _card_dict(card, result, params, data_info, device_name)
    report(progress, 1.0, "cancelled: kept the best weights" if cancelled else "done")
    return result


def _headline(scores: dict) -> Optional[float]:
    """The number shown to the user: PSNR (dB) with a reference, else the holdout loss."""
    if "psnr" in scores:
        return scores["psnr"]
    return scores.get("loss")


def _device_name(dev: str) -> str:
    import torch

    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(dev)
    return f"{dev} ({torch.get_num_threads()} threads)"


def _card_dict(base: ModelCard, res: FinetuneResult, params: dict, data_info: dict,
               device_name: str) -> dict:
    """The card of the fine-tuned model, without id / title / weights (see save_finetuned)."""
    sha = (base.weights or {}).get("sha256")
    licence = base.training.get("licence", "")
    replay = ", ".join(f"{k}={v!r}" for k, v in params.items()
                       if k not in ("reference_given",))
    ref_arg = ", reference=<clean image>" if params["reference_given"] else ""
    return {
        "task": base.task, "architecture": base.architecture, "kwargs": base.kwargs,
        "input": base.input,
        "training": {
            "base_model": base.id, "base_sha256": sha, "mode": res.mode,
            "data": [f"user data: {data_info['name']} {tuple(data_info['shape'])}"],
            "data_details": data_info,
            "licence": (f"fine-tuned from {base.id}; inherits its terms: {licence}"
                        if licence else f"fine-tuned from {base.id}"),
            "steps": res.steps, "best_step": res.best_step, "seconds": res.seconds,
            "device": device_name, "cancelled": res.cancelled,
            "parameters": params,
            "command": (f"napari_microrestore.engine.finetune.finetune({base.id!r}, <burst "
                        f"{data_info['name']}>{ref_arg}, {replay})"),
            "version": __version__,
        },
        "metrics": {
            "split": f"holdout crop (y, x, h, w) = {list(res.holdout)} of the fine-tuning "
                     "burst, never trained on",
            "values": {**{f"before_{k}": round(v, 4) for k, v in res.before.items()
                          if k != "score"},
                       **{f"after_{k}": round(v, 4) for k, v in res.after.items()
                          if k != "score"}},
        },
        "description": (f"{base.title or base.id}, fine-tuned ({res.mode}) on the user's "
                        f"burst {data_info['name']}. " + (base.description or "")).strip(),
    }


# --------------------------------------------------------------------------------------------
# BatchNorm adaptation as a result that saves like a fine-tune
# --------------------------------------------------------------------------------------------
def adapt(model: str | ModelCard, data: Any, *, reference_frame: Optional[int] = None,
          passes: int = 20, device: str = "cpu", data_name: str = "burst",
          progress: Optional[ProgressCallback] = None,
          cancel: Optional[CancelToken] = None) -> FinetuneResult:
    """Re-estimate the BatchNorm statistics of ``model`` on the registered burst ``data``
    (:func:`engine.adapt.adapt_bn`); no weight changes. Raises InputError for nets without
    BatchNorm (the burst nets have none; ``tem-single`` has)."""
    import torch

    from ..models.zoo import load_model
    from .adapt import adapt_bn, burst_batches
    from .restore import resolve_device

    card = base_card(model)
    channels_in = card.task == "single-deblur"
    n_in = card.frames["max"] if channels_in else 0
    frames = _as_burst(data, max(n_in, 2, card.frames["min"]))
    dev = resolve_device(device)
    t0 = time.perf_counter()
    d = _prepare(frames, card, "pairs", None, reference_frame, None, progress, cancel)
    net = load_model(card, device=dev)
    score_holdout = _Holdout(d, "pairs", n_in, channels_in, dev, None)
    _, preview_before = score_holdout(net)
    y0, y1, x0, x1 = d.region
    region = d.x[:, y0:y1, x0:x1]
    if channels_in:
        start = min(max(0, d.reference - n_in // 2), len(region) - n_in)
        region = region[start:start + n_in]
    batches = burst_batches(region, passes=passes, multiple=card.multiple)
    batches = [(b[:, :, 0] if channels_in else b).to(dev) for b in batches]
    adapted = adapt_bn(net, batches, progress=None if progress is None else
                       (lambda f, m: progress(0.1 + 0.9 * f, m)), cancel=cancel)
    with torch.inference_mode():
        _, preview_after = score_holdout(adapted)
    result = FinetuneResult(
        net=adapted.cpu().eval(), card={}, base=card, mode="adapt-bn", before={}, after={},
        seconds=round(time.perf_counter() - t0, 3), device=dev,
        holdout=d.holdout_shown, preview_before=preview_before,
        preview_after=preview_after)
    params = {"mode": "adapt-bn", "passes": passes, "reference_frame": reference_frame,
              "reference_given": False}
    data_info = {"name": data_name, "shape": [int(v) for v in frames.shape],
                 "frames_used": d.frames_used}
    result.card = _card_dict(card, result, params, data_info, _device_name(dev))
    result.card["training"]["command"] = (f"napari_microrestore.engine.finetune.adapt("
                                          f"{card.id!r}, <burst {data_name}>, passes={passes}, "
                                          f"reference_frame={reference_frame!r})")
    return result


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def save_finetuned(result: FinetuneResult, model_id: str, folder: Optional[Path | str] = None,
                   *, title: Optional[str] = None, overwrite: bool = False) -> ModelCard:
    """Write ``result`` as a new model (card YAML + fp16 safetensors with its sha256) into
    ``folder`` (default: the user's model folder, so the Restore picker lists it at once).

    Refuses an id of a shipped model, and an id already saved in ``folder`` unless
    ``overwrite``. Returns the card as read back from disk."""
    from ..models.zoo import save_model

    model_id = (model_id or "").strip()
    if not model_id:
        raise InputError("give the new model an id")
    shipped = {c.id for c in list_cards() if c.source == "zoo"}
    if model_id in shipped or (PACKAGE_ZOO / f"{model_id}.yaml").exists():
        raise InputError(f"{model_id!r} is the id of a shipped model; choose another id")
    folder = Path(folder) if folder is not None else user_model_dir()
    if (folder / f"{model_id}.yaml").exists() and not overwrite:
        raise InputError(f"a model {model_id!r} already exists in {folder}; choose another id")
    card = dict(result.card)
    card["id"] = model_id
    card["title"] = title or f"{model_id} (fine-tuned from {result.base.id})"
    saved = save_model(result.net, card, folder)
    if sha256_file(saved.weights_path) != saved.weights["sha256"]:
        raise InputError(f"the weights written for {model_id} fail their checksum")
    return saved


__all__ = [
    "MODES",
    "PRESETS",
    "SUPPORTED_TASKS",
    "FinetuneResult",
    "FinetuneUpdate",
    "adapt",
    "base_card",
    "default_holdout",
    "finetune",
    "save_finetuned",
]

