"""Make the README figure from generated data only (no file from ../shared/data).

A synthetic probe is pushed through a simulated TEM stream burst (core/degrade), registered
(core/registration) and averaged, and restored by the shipped `tem-burst` model
(engine.restore); the panels show one raw frame, the registered mean, the restoration and the
ground truth, with PSNR / SSIM after a gain + offset fit (core/metrics).

    python docs/make_figures.py            # writes docs/images/probe_burst.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from napari_microrestore.core import degrade, metrics, probes, registration
from napari_microrestore.engine.restore import restore

OUT = Path(__file__).resolve().parent / "images"


def _to_u8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def main() -> int:
    rng = np.random.default_rng(3)
    scene = probes.make_probe("spots-lines", (384, 384), rng=rng)
    burst = degrade.simulate_burst(scene, 5, shape=(256, 256), blur_length=10, dose=20,
                                   origin=(64, 64), rng=rng)
    reg = registration.register_burst(burst.frames)
    mean = reg.aligned.mean(0)
    restored = restore(burst.frames, "tem-burst", device="cpu").image
    gt = burst.ground_truth
    border = 24
    panels = [("one raw frame", burst.frames[burst.reference]),
              ("registered mean of 5", mean), ("tem-burst", restored), ("ground truth", gt)]
    tiles = []
    for title, img in panels:
        gain, offset = metrics.fit_gain_offset(img, gt, border=border)
        fitted = gain * img + offset
        if img is gt:
            label = title
        else:
            m = metrics.compare(img, gt, fit=True, border=border)
            label = f"{title}: PSNR {m['psnr']:.1f} dB, SSIM {m['ssim']:.2f}"
        lo, hi = np.percentile(gt, [0.5, 99.5])
        tile = Image.fromarray(_to_u8(fitted, lo, hi)).convert("RGB")
        canvas = Image.new("RGB", (tile.width, tile.height + 22), "white")
        canvas.paste(tile, (0, 22))
        ImageDraw.Draw(canvas).text((4, 5), label, fill="black")
        tiles.append(canvas)
        print(label)
    fig = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height),
                    "white")
    x = 0
    for t in tiles:
        fig.paste(t, (x, 0))
        x += t.width + 8
    OUT.mkdir(parents=True, exist_ok=True)
    fig.save(OUT / "probe_burst.png", optimize=True)
    print(f"wrote {OUT / 'probe_burst.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
