"""run_probe(): push a synthetic pattern through a degradation and a model, and score it.

The headless form of the Probes widget (and of a probe experiment in a script): a pattern of
:mod:`~napari_microrestore.core.probes` whose ground truth is known exactly is degraded like
the user's data (blur and noise estimated from it by
:func:`~napari_microrestore.core.probes.estimate_degradation`) or as given, restored by a
model of the zoo through :func:`~napari_microrestore.engine.restore.restore`, and scored:
PSNR / SSIM / PCC of the degraded and the restored image against the truth (after a gain +
offset fit), and the structure each *invented*
(:func:`~napari_microrestore.core.probes.invented_structure`).

How the pattern is degraded depends on what the model restores:

* burst models (``burst-deblur``, ``single-deblur``): a ``(T, Y, X)`` burst of a moving stage
  by :func:`~napari_microrestore.core.probes.degrade_probe` (motion blur, Poisson noise);
  the "degraded" image scored is its reference frame;
* ``defocus``: a Gaussian defocus of ``defocus`` px (sigma) and Poisson noise;
* ``sr2x``: 2x area down-sampling and Poisson noise (the degraded image is scored after
  nearest-neighbour up-sampling back to the truth's grid).

ssTEM models restore sections from their neighbours; a single pattern cannot probe them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .. import __version__
from ..core import degrade, metrics, probes
from ..core.errors import CancelToken, InputError, ProgressCallback, check_cancel, report
from ..models.zoo import ModelCard, get_card

PROBE_TASKS = ("burst-deblur", "single-deblur", "defocus", "sr2x")
_BORDER = 8          # px left out of the metrics at the image edges


@dataclass
class ProbeResult:
    """Everything a probe experiment made and measured.

    ``truth`` and ``restored`` are ``(Y, X)`` float32 on the degraded data's intensity scale
    (``restored`` is twice the size for ``sr2x`` models, and ``truth`` then has that size);
    ``degraded`` is the model's input (a ``(T, Y, X)`` burst or a ``(Y, X)`` image);
    ``metrics`` and ``invented`` have the keys ``"degraded"`` and ``"restored"``; ``mask`` the
    pixels scored (the region every registered frame covers, less an 8 px border).
    """

    truth: np.ndarray
    degraded: np.ndarray
    restored: np.ndarray
    metrics: dict
    invented: dict
    mask: np.ndarray
    provenance: dict
    estimate: Optional[dict] = None
    restore_provenance: dict = field(default_factory=dict)


def _upsample(img: np.ndarray, zoom: int) -> np.ndarray:
    return np.kron(img, np.ones((zoom, zoom), np.float32)) if zoom > 1 else img


def run_probe(pattern: str, model: str | ModelCard, *, shape: tuple[int, int] = (256, 256),
              like: Any = None, blur_length: Optional[float] = None,
              blur_angle: Optional[float] = None, dose: Optional[float] = None,
              defocus: float = 2.0, n_frames: Optional[int] = None, invert: bool = False,
              seed: int = 0, device: str = "auto",
              progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None) -> ProbeResult:
    """Degrade probe ``pattern`` (a key of :data:`~napari_microrestore.core.probes.PROBES`),
    restore it with ``model`` (a zoo id or card) and score both against the truth.

    Parameters
    ----------
    shape
        ``(Y, X)`` of the probe in px (of the model's input for ``sr2x``: the truth is then
        twice as large).
    like
        Real data (a ``(Y, X)`` image or a ``(T, Y, X)`` burst) whose blur and noise the probe
        should have, measured by ``estimate_degradation``; ``blur_length``, ``blur_angle`` and
        ``dose`` given as well override the estimate.
    blur_length, blur_angle, dose
        Motion blur (px, degrees from +x towards +y) and counts per pixel at the probe's mean
        intensity; ``None`` takes them from ``like``, else the defaults 10 px, 90 degrees, 20
        counts. Blur applies to burst models only.
    defocus
        Gaussian defocus sigma in px, for ``defocus`` models.
    n_frames
        Burst length; default the model card's default.
    invert
        Dark features on a bright background (bright-field TEM) instead of bright on dark.
    seed
        Seeds the pattern (``spots-lines``), the burst's motion and the noise.
    device
        For learned models, as :func:`~napari_microrestore.engine.restore.restore`.
    """
    card = model if isinstance(model, ModelCard) else get_card(model)
    if card.task not in PROBE_TASKS:
        raise InputError(f"model {card.id} restores {card.task!r} data, which a single probe "
                         f"image cannot test; probes test {', '.join(PROBE_TASKS)} models")
    if pattern not in probes.PROBES:
        raise InputError(f"unknown probe {pattern!r}; choose one of {', '.join(probes.PROBES)}")
    t0 = time.perf_counter()
    gen = np.random.default_rng(seed)
    zoom = card.scale if card.task == "sr2x" else 1
    ny, nx = (int(v) * zoom for v in shape)
    clean = probes.make_probe(pattern, (ny, nx), rng=gen, invert=invert)
    check_cancel(cancel)

    estimate = None
    if like is not None:
        report(progress, 0.02, "measuring blur and noise of the data to imitate")
        estimate = probes.estimate_degradation(np.asarray(like))
        check_cancel(cancel)
    given = {k: float(v) for k, v in (("blur_length", blur_length), ("blur_angle", blur_angle),
                                      ("dose", dose)) if v is not None}
    if "dose" in given and not given["dose"] > 0:
        raise InputError(f"dose must be a positive number of counts per pixel; got {dose!r}")
    report(progress, 0.05, f"degrading the {pattern} probe")

    params: dict[str, Any] = {"pattern": pattern, "shape": [int(v) for v in shape],
                              "seed": int(seed), "invert": bool(invert), **given}
    if card.is_burst:
        n = card.frames["default"] if n_frames is None else int(n_frames)
        if not card.frames["min"] <= n <= card.frames["max"] or n < 2:
            raise InputError(f"model {card.id} takes {card.frames['min']}-{card.frames['max']} "
                             f"frames; got n_frames={n}")
        defaults = {} if estimate is not None else {"blur_length": 10.0, "blur_angle": 90.0,
                                                    "dose": 20.0}
        burst = probes.degrade_probe(clean, estimate, n_frames=n, rng=gen,
                                     **(defaults | given))
        truth, degraded = burst.ground_truth, burst.frames
        degraded_2d = burst.frames[burst.reference]
        params.update(n_frames=n, reference=int(burst.reference), degradation=burst.params)
    else:
        if estimate is not None and estimate.dose is not None:
            counts = float(estimate.dose)
        else:
            counts = 20.0 if estimate is None else max(
                (estimate.mean_intensity / max(estimate.noise_sigma, 1e-12)) ** 2, 1.0)
        counts = given.get("dose", counts)
        scale = counts / float(clean.mean())
        truth = (clean * scale).astype(np.float32)
        if card.task == "defocus":
            blurred = degrade.defocus(truth, defocus)
            params.update(defocus=float(defocus))
        else:
            blurred = degrade.downsample2x(truth)
        degraded = degrade.poisson_gaussian_counts(np.maximum(blurred, 0.0), rng=gen)
        degraded_2d = _upsample(degraded, zoom)
        params.update(dose=counts, noise="poisson")
    check_cancel(cancel)

    def sub(lo: float, hi: float) -> Optional[ProgressCallback]:
        if progress is None:
            return None
        return lambda f, m: progress(lo + (hi - lo) * f, f"{card.id}: {m}")

    from .restore import restore

    res = restore(degraded, card, device=device, progress=sub(0.1, 0.9), cancel=cancel)
    restored = np.asarray(res.image, np.float32)
    if restored.shape != truth.shape:
        raise InputError(f"model {card.id} returned an image of shape {restored.shape}, not "
                         f"the probe's {truth.shape}")
    report(progress, 0.92, "scoring")
    mask = np.zeros(truth.shape, bool)
    mask[_BORDER:-_BORDER, _BORDER:-_BORDER] = True
    if res.registration is not None and card.is_burst:
        mask &= np.asarray(res.registration.coverage, bool)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if (len(rows) < 32 or len(cols) < 32 or rows[-1] - rows[0] < 31 or cols[-1] - cols[0] < 31
            or np.ptp(truth[mask]) == 0):
        raise InputError(f"the scored part of the {pattern} probe (inside an {_BORDER} px border "
                         f"and the region every frame covers) is smaller than 32 x 32 px or has "
                         f"no structure; use a larger probe or less motion")
    scores, invented = {}, {}
    for name, img in (("degraded", degraded_2d), ("restored", restored)):
        check_cancel(cancel)
        scores[name] = metrics.compare(img, truth, mask=mask, fit=True)
        invented[name] = probes.invented_structure(img, truth, mask=mask).to_dict()
    prov = {"operation": "probe", "model": card.id, "task": card.task,
            "device": res.provenance.get("device"), "version": __version__,
            "parameters": params, "like": estimate.to_dict() if estimate else None,
            "seconds": round(time.perf_counter() - t0, 3)}
    report(progress, 1.0, "done")
    return ProbeResult(truth=np.asarray(truth, np.float32), degraded=degraded,
                       restored=restored, metrics=scores, invented=invented, mask=mask,
                       provenance=prov, estimate=estimate.to_dict() if estimate else None,
                       restore_provenance=res.provenance)


def describe_invented(invented: dict) -> str:
    """One plain sentence on an :class:`~napari_microrestore.core.probes.InventedStructure`
    dict, for the widget and the log."""
    score = float(invented["score"])
    if score < 1e-3 or not invented["peaks"]:
        return ("no invented periodic structure (residual: "
                f"{100 * invented['flat_rms']:.1f} % of the truth's contrast where it is flat)")
    top = invented["peaks"][0]
    return (f"invented structure at {100 * score:.1f} % of the truth's contrast, strongest: a "
            f"period of {top['period']:.1f} px at {top['angle'] % 180:.0f} deg "
            f"({invented['n_peaks']} frequency bins)")

