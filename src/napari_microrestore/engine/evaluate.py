"""evaluate(): the zoo's validation protocol, whose numbers go into the model cards.

Burst models: bursts simulated from the held-out sections of the training stacks (the last
``val_fraction`` of each, never trained on), Poisson doses and motion blur drawn from the given
ranges, the stage moving in any direction, restored through the same :func:`~napari_microrestore.engine.restore.restore` path a
user's data take (ECC registration included), and scored against the clean reference crop
after a best gain + offset fit, ``border`` px ignored. The ECC-registered mean of the same
frames (same registration) is scored alongside, and the gain over it reported.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from ..core import degrade, metrics
from ..core.errors import CancelToken, InputError, ProgressCallback, check_cancel, report
from ..models.zoo import ModelCard, get_card
from .data import load_sections
from .restore import card_ensemble, restore

DEFAULT_SOURCES = ("sstem/gerhard_vnc_stack1.tif", "sstem/isbi2012_train_volume.tif",
                   "sstem/epfl_fibsem_train_slices.tif")


def evaluate_burst(model: str | ModelCard, *, sources: Sequence[str] = DEFAULT_SOURCES,
                   val_fraction: float = 0.2, n_bursts: int = 24, size: int = 256,
                   frames: int = 5, dose: tuple[float, float] = (12.0, 80.0),
                   blur_length: tuple[float, float] = (6.0, 14.0),
                   blur_angle: tuple[float, float] = (0.0, 180.0), border: int = 24,
                   seed: int = 2021, device: str = "auto",
                   progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None,
                   ensemble: Optional[str] = None) -> dict:
    """Score a burst model on simulated bursts from held-out sections (see module doc).

    The stage-motion direction of each burst is drawn uniformly from ``blur_angle`` (degrees
    from +x towards +y; default: any direction), as a user's stage may move any way."""
    card = model if isinstance(model, ModelCard) else get_card(model)
    if not card.is_burst:
        raise InputError(f"model {card.id} is a {card.task} model, not a burst model")
    sections = load_sections(list(sources), split="val", val_fraction=val_fraction)
    rng = np.random.default_rng(seed)
    rows = []
    t0 = time.perf_counter()
    for i in range(n_bursts):
        check_cancel(cancel)
        img = sections[int(rng.integers(len(sections)))]
        margin = int(np.ceil(blur_length[1] * (frames + 1))) + 8
        h, w = img.shape
        sy, sx = min(h, size + 2 * margin), min(w, size + 2 * margin)
        y0, x0 = int(rng.integers(0, h - sy + 1)), int(rng.integers(0, w - sx + 1))
        b = degrade.simulate_burst(img[y0:y0 + sy, x0:x0 + sx] + 1.0, frames,
                                   shape=(size, size), blur_length=blur_length, dose=dose,
                                   blur_angle=blur_angle, rng=rng)
        res = restore(b.frames, card, device=device, ensemble=ensemble)
        mean = res.registration.aligned.mean(0)
        m = metrics.compare(res.image, b.ground_truth, fit=True, border=border)
        base = metrics.compare(mean, b.ground_truth, fit=True, border=border)
        rows.append({"psnr": m["psnr"], "ssim": m["ssim"], "mean_psnr": base["psnr"],
                     "mean_ssim": base["ssim"], "dose": b.params["dose"],
                     # the reference frame's blur (the others jitter around it)
                     "blur_length": b.params["blur_lengths"][b.reference],
                     "blur_angle": b.params["blur_angles"][b.reference] % 180.0,
                     "rotation_deg": (res.provenance.get("motion_direction") or {}).get(
                         "rotation_deg")})
        report(progress, (i + 1) / n_bursts, f"burst {i + 1}/{n_bursts}")
    agg = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "mean_psnr",
                                                            "mean_ssim")}
    agg["gain_over_mean_db"] = agg["psnr"] - agg["mean_psnr"]
    return {
        "model": card.id, "protocol": {
            "sources": list(sources), "split": f"last {val_fraction:.0%} of each stack",
            "bursts": n_bursts, "size": size, "frames": frames, "dose": list(dose),
            "blur_length": list(blur_length), "motion_angle": list(blur_angle),
            "border": border, "seed": seed,
            "scoring": "gain + offset fit to the ground truth"},
        "values": {k: round(v, 4) for k, v in agg.items()},
        "per_burst": rows, "seconds": round(time.perf_counter() - t0, 1),
    }


def _sources(card: ModelCard) -> list[str]:
    data = card.training.get("data", [])
    return [data] if isinstance(data, str) else list(data)


def evaluate_sr2x(card: ModelCard, *, doses: Sequence[float] = (20.0, 50.0, 200.0),
                  val_fraction: float = 0.2, size: int = 128, border: int = 24,
                  seed: int = 2021, device: str = "auto",
                  cancel: Optional[CancelToken] = None, ensemble: Optional[str] = None) -> dict:
    """Held-out sections, 2x2-binned and Poisson-noised at each dose, restored by the model and
    by bicubic up-sampling, scored against the clean section (fit, border at full size).

    The baseline is bicubic up-sampling of the noisy input (``bicubic_psnr``, ``gain_db``).
    Also reported, to read the gain against: ``noise_free_bicubic_psnr``, bicubic up-sampling
    of the binned section *before* noise (what perfect denoising followed by bicubic would
    score; the real sections' own noise and pixel-scale texture keep it well below the
    model's reach at high doses), and ``per_source``, the mean gain per stack.
    """
    import cv2

    def up(a: np.ndarray) -> np.ndarray:
        return cv2.resize(a, (2 * size, 2 * size), interpolation=cv2.INTER_CUBIC)

    sources = _sources(card)
    rng = np.random.default_rng(seed)
    per_dose, by_source = {}, {}
    for dose in doses:
        rows = []
        for src in sources:
            for img in load_sections([src], split="val", val_fraction=val_fraction):
                check_cancel(cancel)
                h, w = img.shape
                y0, x0 = (h - 2 * size) // 2, (w - 2 * size) // 2
                hr = img[y0:y0 + 2 * size, x0:x0 + 2 * size].astype(np.float32) + 1.0
                clean = degrade.downsample2x(hr)
                lr = degrade.poisson_gaussian_noise(clean, dose, rng=rng)
                out = restore(lr, card, device=device, ensemble=ensemble).image
                m = metrics.compare(out, hr, fit=True, border=border)
                b = metrics.compare(up(lr), hr, fit=True, border=border)
                c = metrics.compare(up(clean), hr, fit=True, border=border)["psnr"]
                rows.append((m["psnr"], m["ssim"], b["psnr"], b["ssim"], c))
                by_source.setdefault(src, []).append(m["psnr"] - b["psnr"])
        a = np.mean(rows, axis=0)
        per_dose[f"dose {dose:g}"] = {"psnr": round(a[0], 3), "ssim": round(a[1], 4),
                                      "bicubic_psnr": round(a[2], 3),
                                      "bicubic_ssim": round(a[3], 4),
                                      "gain_db": round(a[0] - a[2], 3),
                                      "noise_free_bicubic_psnr": round(a[4], 3)}
    gains = [v["gain_db"] for v in per_dose.values()]
    return {"model": card.id,
            "protocol": {"sources": sources, "split": f"last {val_fraction:.0%} of each stack",
                         "crop": 2 * size, "doses": list(doses), "border": border, "seed": seed,
                         "degradation": "2x2 area binning + Poisson noise",
                         "scoring": "gain + offset fit to the ground truth"},
            "values": {"min_gain_over_bicubic_db": round(min(gains), 3),
                       "mean_gain_over_bicubic_db": round(float(np.mean(gains)), 3)},
            "per_level": per_dose,
            "per_source": {k: {"mean_gain_over_bicubic_db": round(float(np.mean(v)), 3),
                               "sections": len(v) // len(doses)}
                           for k, v in by_source.items()}}


# Gaussian filter widths (px) of the defocus protocol's smoothing baseline
GAUSSIAN_SIGMAS = (0.7, 1.0, 1.5, 2.0)


def evaluate_defocus(card: ModelCard, *, border: int = 24, device: str = "auto",
                     cancel: Optional[CancelToken] = None,
                     ensemble: Optional[str] = None) -> dict:
    """Every real defocus pair, on the validation rows only (never trained on)."""
    from scipy import ndimage

    from .data import DefocusSampler

    pairs = DefocusSampler({"patch": 128}, "val").validation_pairs()
    levels: dict = {}
    for blurred, sharp, amount in pairs:
        check_cancel(cancel)
        out = restore(blurred, card, device=device, ensemble=ensemble).image
        m = metrics.compare(out, sharp, fit=True, border=border)
        b = metrics.compare(blurred, sharp, fit=True, border=border)
        # the simplest denoiser, its width tuned with the answer in hand (an upper bound for
        # a Gaussian filter): what the model must beat to be more than a smoothing
        g = max(metrics.compare(ndimage.gaussian_filter(blurred, s), sharp, fit=True,
                                border=border)["psnr"] for s in GAUSSIAN_SIGMAS)
        levels.setdefault(f"{amount:+.2f} um", []).append((m["psnr"], m["ssim"], b["psnr"],
                                                          b["ssim"], g))
    per = {}
    for k, rows in sorted(levels.items(), key=lambda kv: float(kv[0].split()[0])):
        a = np.mean(rows, axis=0)
        per[k] = {"psnr": round(a[0], 3), "ssim": round(a[1], 4), "input_psnr": round(a[2], 3),
                  "input_ssim": round(a[3], 4), "gain_db": round(a[0] - a[2], 3),
                  "best_gaussian_gain_db": round(a[4] - a[2], 3), "pairs": len(rows)}
    gains = [v["gain_db"] for v in per.values()]
    gauss = [v["best_gaussian_gain_db"] for v in per.values()]
    return {"model": card.id,
            "protocol": {"data": "defocus/dfnn_microtubules single pairs + z-stack",
                         "split": "rows 592-799 of every image (training used rows 0-559)",
                         "alignment": "in-focus image shifted onto the defocused image's grid "
                                      "(ECC translation, Fourier shift); input and output are "
                                      "scored against the same aligned image",
                         "border": border, "scoring": "gain + offset fit to the in-focus image",
                         "baseline": "best of Gaussian filters sigma "
                                     f"{GAUSSIAN_SIGMAS} px per pair (tuned on the answer)"},
            "values": {"min_gain_over_input_db": round(min(gains), 3),
                       "mean_gain_over_input_db": round(float(np.mean(gains)), 3),
                       "levels_at_or_above_2db": int(sum(g >= 2.0 for g in gains)),
                       "levels": len(gains),
                       "mean_best_gaussian_gain_db": round(float(np.mean(gauss)), 3)},
            "per_level": per}


def evaluate_sstem(card: ModelCard, *, val_fraction: float = 0.2, border: int = 24,
                   seed: int = 2021, device: str = "auto",
                   cancel: Optional[CancelToken] = None, ensemble: Optional[str] = None) -> dict:
    """Held-out sections of each stack: (1) removed and restored from the real neighbours,
    against the real section, vs the average of the two neighbours; (2) damaged by a simulated
    fold / precipitates, restored with the artefact mask, vs the damaged section."""
    from ..core import io
    from .data import shared_data_dir

    rng = np.random.default_rng(seed)
    rows = {"missing": [], "fold": [], "precipitates": []}
    for src in _sources(card):
        st = np.asarray(io.read(shared_data_dir() / src, lazy=False).data, np.float32)
        n_val = max(3, int(round(len(st) * val_fraction)))
        val = st[-n_val:]
        for s in range(1, len(val) - 1):
            check_cancel(cancel)
            truth = val[s]
            trio = val[s - 1:s + 2].copy()
            trio[1] = 0
            out = restore(trio, card, device=device, sections=[1], ensemble=ensemble).image[1]
            avg = 0.5 * (val[s - 1] + val[s + 1])
            m = metrics.compare(out, truth, fit=True, border=border)
            b = metrics.compare(avg, truth, fit=True, border=border)
            rows["missing"].append((m["psnr"], m["ssim"], b["psnr"], b["ssim"]))
            for kind, fn in (("fold", degrade.fold), ("precipitates", degrade.precipitates)):
                damaged, mask = fn(truth, rng=rng)
                trio = val[s - 1:s + 2].copy()
                trio[1] = damaged
                masks = np.zeros(trio.shape, bool)
                masks[1] = mask
                out = restore(trio, card, device=device, masks=masks, ensemble=ensemble).image[1]
                m = metrics.compare(out, truth, fit=True, border=border)
                b = metrics.compare(damaged, truth, fit=True, border=border)
                rows[kind].append((m["psnr"], m["ssim"], b["psnr"], b["ssim"]))
    per = {}
    for k, r in rows.items():
        a = np.mean(r, axis=0)
        base = "neighbour_average" if k == "missing" else "damaged_input"
        per[k] = {"psnr": round(a[0], 3), "ssim": round(a[1], 4), f"{base}_psnr": round(a[2], 3),
                  f"{base}_ssim": round(a[3], 4), "gain_db": round(a[0] - a[2], 3),
                  "sections": len(r)}
    return {"model": card.id,
            "protocol": {"sources": _sources(card), "split": f"last {val_fraction:.0%} of each stack",
                         "border": border, "seed": seed,
                         "scoring": "gain + offset fit to the real section"},
            "values": {"missing_gain_over_neighbour_average_db": per["missing"]["gain_db"],
                       "fold_gain_db": per["fold"]["gain_db"],
                       "precipitates_gain_db": per["precipitates"]["gain_db"]},
            "per_level": per}


def evaluate(card: ModelCard, *, device: str = "auto", seed: int = 2021,
             ensemble: Optional[str] = None, **burst_kw) -> dict:
    """The zoo protocol for the card's task. ``ensemble``: the self-ensemble restore() runs
    with (None: the card's); the protocol records it unless it is "none"."""
    if card.is_burst:
        res = evaluate_burst(card, device=device, seed=seed, ensemble=ensemble, **burst_kw)
    elif card.task == "sr2x":
        res = evaluate_sr2x(card, device=device, seed=seed, ensemble=ensemble)
    elif card.task == "defocus":
        res = evaluate_defocus(card, device=device, ensemble=ensemble)
    elif card.task == "sstem":
        res = evaluate_sstem(card, device=device, seed=seed, ensemble=ensemble)
    else:
        raise InputError(f"no evaluation protocol for task {card.task!r}")
    used = card_ensemble(card, ensemble)
    if used != "none":
        res["protocol"]["ensemble"] = used
    return res
