"""evaluate(): the zoo's validation protocol, whose numbers go into the model cards.

Burst models: bursts simulated from the held-out sections of the training stacks (the last
``val_fraction`` of each, never trained on), Poisson doses and motion blur drawn from the given
ranges, restored through the same :func:`~napari_microrestore.engine.restore.restore` path a
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
from .restore import restore

DEFAULT_SOURCES = ("sstem/gerhard_vnc_stack1.tif", "sstem/isbi2012_train_volume.tif",
                   "sstem/epfl_fibsem_train_slices.tif")


def evaluate_burst(model: str | ModelCard, *, sources: Sequence[str] = DEFAULT_SOURCES,
                   val_fraction: float = 0.2, n_bursts: int = 24, size: int = 256,
                   frames: int = 5, dose: tuple[float, float] = (12.0, 80.0),
                   blur_length: tuple[float, float] = (6.0, 14.0), border: int = 24,
                   seed: int = 2021, device: str = "auto",
                   progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> dict:
    """Score a burst model on simulated bursts from held-out sections (see module doc)."""
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
                                   rng=rng)
        res = restore(b.frames, card, device=device)
        mean = res.registration.aligned.mean(0)
        m = metrics.compare(res.image, b.ground_truth, fit=True, border=border)
        base = metrics.compare(mean, b.ground_truth, fit=True, border=border)
        rows.append({"psnr": m["psnr"], "ssim": m["ssim"], "mean_psnr": base["psnr"],
                     "mean_ssim": base["ssim"], "dose": b.params.get("dose"),
                     "blur_length": b.params.get("blur_length")})
        report(progress, (i + 1) / n_bursts, f"burst {i + 1}/{n_bursts}")
    agg = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "mean_psnr",
                                                            "mean_ssim")}
    agg["gain_over_mean_db"] = agg["psnr"] - agg["mean_psnr"]
    return {
        "model": card.id, "protocol": {
            "sources": list(sources), "split": f"last {val_fraction:.0%} of each stack",
            "bursts": n_bursts, "size": size, "frames": frames, "dose": list(dose),
            "blur_length": list(blur_length), "border": border, "seed": seed,
            "scoring": "gain + offset fit to the ground truth"},
        "values": {k: round(v, 4) for k, v in agg.items()},
        "per_burst": rows, "seconds": round(time.perf_counter() - t0, 1),
    }
