"""Benchmark of burst registration (``napari_microrestore.core.registration``).

Bursts are simulated from real ssTEM sections (``<shared data>/sstem/*.tif``): every frame is
the SAME section shifted by a known sub-pixel amount (up to +-40 px in y and x, in steps of
1/32 px, Lanczos-4 resampling of a larger crop, then cropped; frames as large as the section
see it extended by mirroring), motion-blurred by a centred symmetric line kernel
of 6-14 px (mostly vertical, so the blur adds no shift) and given Poisson noise at a mean of 12
counts per pixel. The recovered transforms (relative to the reference frame T//2) are compared
with the true shifts: a frame's error is the RMS, over its pixels, of the distance between where
the recovered and the true transform send them (for a translation, the error of the shift;
euclidean and affine fits are judged on the whole frame). Tables give the RMS and the maximum of
the frames' errors.

Tables printed (Markdown):

1. accuracy of ``register_burst`` on several sections / bursts;
2. speed on 5 x 1024 x 1024 bursts, side by side in the same run and thread setting:
   ``register_burst`` against plain full-resolution ``cv2.findTransformECC`` with the same
   motion model, the same stopping criteria and the same Gaussian pre-filter
   (``gaussFiltSize``), started from a full-resolution phase-correlation estimate (timed with
   and without the phase correlation) and from the identity. A failure is a frame flagged by
   the method or off by more than 1 px.

Usage::

    python benchmarks/bench_registration.py [--quick] [--threads N]

The data folder is ``$MICRORESTORE_SHARED_DATA`` (default ``<repo>/../shared/data``); the
benchmark exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark of burst registration.")
    parser.add_argument("--quick", action="store_true", help="fewer bursts (< 1 minute)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for OpenCV and BLAS, the same for every method (default 1)")
    parser.add_argument("--max-iter", type=int, default=50, help="ECC iterations (per level)")
    parser.add_argument("--eps", type=float, default=1e-4, help="ECC correlation tolerance")
    return parser.parse_args(argv)


# BLAS reads its thread count when numpy is imported: set it before, like cv2.setNumThreads
if __name__ == "__main__":
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(_parse_args().threads)

import cv2
import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from napari_microrestore.core.registration import (
    phase_correlation,
    register_burst,
)

DATA = Path(os.environ.get("MICRORESTORE_SHARED_DATA", REPO.parent / "shared" / "data"))
MAX_SHIFT = 40.0          # px, each axis
BLUR_RANGE = (6.0, 14.0)  # motion-blur length, px
BLUR_ANGLE_SPREAD = 20.0  # degrees around vertical
MEAN_COUNTS = 12.0        # Poisson counts per pixel on average
FAIL_PX = 1.0             # a frame whose shift error exceeds this counts as a failure
N_FRAMES = 5


# ---------------------------------------------------------------- degradation (local helpers)
def line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Centred, point-symmetric motion-blur kernel: a line of ``length`` px at ``angle_deg``
    (0 = along x, 90 = along y), anti-aliased by bilinear splatting, summing to 1."""
    half = math.ceil(length / 2) + 1
    k = np.zeros((2 * half + 1, 2 * half + 1), np.float64)
    u = np.linspace(-length / 2, length / 2, int(length * 8) + 1)
    ys = half + u * math.sin(math.radians(angle_deg))
    xs = half + u * math.cos(math.radians(angle_deg))
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            np.add.at(k, (y0 + dy, x0 + dx), wy * wx)
    return (k / k.sum()).astype(np.float32)


def make_burst(section: np.ndarray, size: int, rng: np.random.Generator,
               n_frames: int = N_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """Burst of ``n_frames`` (size x size) frames of one section and the true (dy, dx) of the
    content in each frame (frame(y, x) = section(y - dy, x - dx) up to blur and noise)."""
    margin = int(MAX_SHIFT) + 24
    big = size + 2 * margin
    h, w = section.shape
    # frames as large as the section see the section extended by mirroring at its borders
    py, px = max(0, big - h), max(0, big - w)
    scene = cv2.copyMakeBorder(section.astype(np.float32), py // 2, py - py // 2, px // 2,
                               px - px // 2, cv2.BORDER_REFLECT)
    y0, x0 = (scene.shape[0] - big) // 2, (scene.shape[1] - big) // 2
    crop = scene[y0:y0 + big, x0:x0 + big]
    # multiples of 1/32 px, which cv2.warpAffine resamples exactly (its sub-pixel grid)
    shifts = np.round(rng.uniform(-MAX_SHIFT, MAX_SHIFT, (n_frames, 2)) * 32) / 32
    frames = np.empty((n_frames, size, size), np.float32)
    for t, (dy, dx) in enumerate(shifts):
        m = np.array([[1, 0, dx], [0, 1, dy]], np.float64)
        moved = cv2.warpAffine(crop, m, (big, big), flags=cv2.INTER_LANCZOS4,
                               borderMode=cv2.BORDER_REFLECT)
        k = line_kernel(rng.uniform(*BLUR_RANGE),
                        90.0 + rng.uniform(-BLUR_ANGLE_SPREAD, BLUR_ANGLE_SPREAD))
        blurred = cv2.filter2D(moved, -1, k, borderType=cv2.BORDER_REFLECT)
        frames[t] = blurred[margin:margin + size, margin:margin + size]
    frames = np.clip(frames, 0, None)
    frames *= MEAN_COUNTS / frames.mean()
    return rng.poisson(frames).astype(np.uint16), shifts


def relative_shifts(true: np.ndarray, reference: int) -> np.ndarray:
    """True (dy, dx) of each frame relative to the reference frame."""
    return true - true[reference]


# ---------------------------------------------------------------- methods
@dataclass
class Outcome:
    transforms: np.ndarray  # (T, 2, 3) recovered, reference-frame pixel -> frame pixel
    failed: np.ndarray      # (T,) bool, the method reported a failure


def gauss_ksize(sigma: float) -> int:
    """Odd kernel size whose OpenCV default sigma, 0.3 ((k - 1) / 2 - 1) + 0.8, is ~ sigma."""
    return max(1, 2 * round((sigma - 0.8) / 0.3 + 1) + 1)


def plain_ecc(frames: np.ndarray, motion: str, starts: np.ndarray, sigma: float,
              max_iter: int, eps: float) -> Outcome:
    """Full-resolution cv2.findTransformECC of every frame against the middle one."""
    mode = {"translation": cv2.MOTION_TRANSLATION, "euclidean": cv2.MOTION_EUCLIDEAN,
            "affine": cv2.MOTION_AFFINE}[motion]
    crit = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, max_iter, eps)
    n, h, w = frames.shape
    ref_t = n // 2
    ref = frames[ref_t].astype(np.float32)
    transforms = np.tile(np.eye(2, 3), (n, 1, 1))
    failed = np.zeros(n, bool)
    for t in range(n):
        if t == ref_t:
            continue
        img = frames[t].astype(np.float32)
        warp = np.array([[1, 0, starts[t, 1]], [0, 1, starts[t, 0]]], np.float32)
        try:
            _, warp = cv2.findTransformECC(ref, img, warp, mode, crit, None, gauss_ksize(sigma))
        except cv2.error:
            failed[t] = True
        cv2.warpAffine(img, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
        transforms[t] = warp
    return Outcome(transforms, failed)


def phase_correlation_starts(frames: np.ndarray) -> np.ndarray:
    """Full-resolution phase-correlation (dy, dx) of every frame against the middle one."""
    ref = frames[len(frames) // 2].astype(np.float32)
    return np.array([phase_correlation(ref, f.astype(np.float32))[:2] for f in frames])


# ---------------------------------------------------------------- measurement
def errors(outcome: Outcome, true: np.ndarray, reference: int, shape: tuple[int, int]
           ) -> np.ndarray:
    """Registration error (px) of every frame but the reference: the RMS over the frame's
    pixels of the distance between where the recovered and the true transform send them
    (for a translation, the error of the shift)."""
    h, w = shape
    mx, my = (w - 1) / 2, (h - 1) / 2
    sxx, syy = (w - 1) * (2 * w - 1) / 6, (h - 1) * (2 * h - 1) / 6
    moments = np.array([[sxx, mx * my, mx], [mx * my, syy, my], [mx, my, 1.0]])  # E[p p^T]
    d = relative_shifts(true, reference)
    truth = np.tile(np.eye(2, 3), (len(d), 1, 1))
    truth[:, 0, 2], truth[:, 1, 2] = d[:, 1], d[:, 0]
    diff = outcome.transforms - truth
    err = np.sqrt(np.einsum("tij,jk,tik->t", diff, moments, diff))
    return np.delete(err, reference)


@dataclass
class Row:
    errs: list
    fails: int = 0
    seconds: float = 0.0

    def add(self, outcome: Outcome, true: np.ndarray, reference: int, shape: tuple[int, int],
            seconds: float) -> None:
        e = errors(outcome, true, reference, shape)
        self.errs.append(e)
        self.fails += int(np.sum(np.delete(outcome.failed, reference) | (e > FAIL_PX)))
        self.seconds += seconds

    def stats(self) -> tuple[float, float, int, int]:
        e = np.concatenate(self.errs)
        return float(np.sqrt(np.mean(e ** 2))), float(e.max()), self.fails, e.size


def timed(fn, repeats: int):
    """(result, best wall time in s) of ``fn()`` over ``repeats`` runs."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def load(name: str) -> np.ndarray:
    path = DATA / "sstem" / name
    if not path.exists():
        sys.exit(f"bench_registration: data file {path} not found; set MICRORESTORE_SHARED_DATA "
                 f"to the folder that holds sstem/{name}")
    return tifffile.imread(path)


def accuracy_table(quick: bool) -> None:
    sets = [("gerhard_vnc_stack1.tif", 512, (0, 6, 12, 18)),
            ("isbi2012_train_volume.tif", 384, (0, 10, 20)),
            ("epfl_fibsem_train_slices.tif", 512, (0, 13))]
    motions = ("translation",) if quick else ("translation", "euclidean", "affine")
    bursts_per_section = 1 if quick else 2
    print(f"### Accuracy: bursts of {N_FRAMES} frames, shifts up to +-{MAX_SHIFT:g} px, "
          f"motion blur {BLUR_RANGE[0]:g}-{BLUR_RANGE[1]:g} px (vertical +-"
          f"{BLUR_ANGLE_SPREAD:g} deg), Poisson noise at {MEAN_COUNTS:g} counts/px\n")
    print("| data | frame | sections | bursts | motion | RMS error (px) | max error (px) "
          "| lowest ECC | failures | time / burst (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, size, sections in sets:
        stack = load(name)
        sections = sections[:1] if quick else sections
        bursts = []
        for s in sections:
            rng = np.random.default_rng(1000 + s)
            for _ in range(bursts_per_section):
                bursts.append(make_burst(stack[s], size, rng))
        for motion in motions:
            row, lowest = Row([]), 1.0
            for frames, true in bursts:
                t0 = time.perf_counter()
                res = register_burst(frames, motion=motion)
                row.add(Outcome(res.transforms, ~res.converged), true, res.reference,
                        frames.shape[1:], time.perf_counter() - t0)
                lowest = min(lowest, float(np.delete(res.ecc, res.reference).min()))
            rms, mx, fails, count = row.stats()
            print(f"| {name.split('_')[0]} | {size}x{size} | {len(sections)} | {len(bursts)} "
                  f"| {motion} | {rms:.3f} | {mx:.3f} | {lowest:.3f} | {fails}/{count} "
                  f"| {row.seconds / len(bursts):.3f} |", flush=True)
    print()


def speed_table(quick: bool, threads: int, max_iter: int, eps: float) -> None:
    stack = load("gerhard_vnc_stack1.tif")
    sections = (3,) if quick else (3, 9, 15)
    motions = ("translation",) if quick else ("translation", "euclidean", "affine")
    repeats = 2 if quick else 3
    print(f"### Speed: {N_FRAMES} x 1024 x 1024 bursts ({len(sections)} sections), "
          f"cv2.setNumThreads({threads}) and {threads} BLAS thread(s) for every method, ECC "
          f"criteria max_iter={max_iter}, eps={eps:g}, best of {repeats} runs per burst "
          f"(plain ECC from identity: 1 run)\n")
    print("| motion | method | time / burst (s) | register_burst speed-up | RMS error (px) "
          "| max error (px) | failures |")
    print("|---|---|---|---|---|---|---|")
    bursts = [make_burst(stack[s], 1024, np.random.default_rng(2000 + s)) for s in sections]
    labels = {
        "ours": "register_burst (pyramid ECC + full-res Gauss-Newton polish)",
        "ours_full": "register_burst, ECC down to full resolution (finest=0)",
        "pc": "plain full-res ECC from full-res phase correlation (PC time counted)",
        "pc_free": "plain full-res ECC from full-res phase correlation (PC time not counted)",
        "identity": "plain full-res ECC from identity",
    }
    for motion in motions:
        rows = {k: Row([]) for k in labels}
        for frames, true in bursts:
            ref, shape = len(frames) // 2, frames.shape[1:]
            for key, finest in (("ours", None), ("ours_full", 0)):
                res, sec = timed(partial(register_burst, frames, motion=motion, finest=finest,
                                         max_iter=max_iter, eps=eps), repeats)
                rows[key].add(Outcome(res.transforms, ~res.converged), true, ref, shape, sec)
            sigma = res.sigma  # the same Gaussian pre-filter for plain ECC (gaussFiltSize)
            starts, sec_pc = timed(partial(phase_correlation_starts, frames), repeats)
            out, sec = timed(partial(plain_ecc, frames, motion, starts, sigma, max_iter, eps),
                             repeats)
            rows["pc"].add(out, true, ref, shape, sec + sec_pc)
            rows["pc_free"].add(out, true, ref, shape, sec)
            identity = np.zeros((len(frames), 2))
            out, sec = timed(partial(plain_ecc, frames, motion, identity, sigma, max_iter, eps),
                             1)
            rows["identity"].add(out, true, ref, shape, sec)
        base = rows["ours"].seconds
        for key, row in rows.items():
            rms, mx, fails, count = row.stats()
            print(f"| {motion} | {labels[key]} | {row.seconds / len(bursts):.3f} "
                  f"| {row.seconds / base:.1f}x | {rms:.3f} | {mx:.3f} | {fails}/{count} |",
                  flush=True)
    print()


def main() -> None:
    args = _parse_args()
    if not (DATA / "sstem").is_dir():
        sys.exit(f"bench_registration: shared data not found at {DATA}; set "
                 f"MICRORESTORE_SHARED_DATA to the folder that holds sstem/")
    cv2.setNumThreads(args.threads)
    t0 = time.perf_counter()
    accuracy_table(args.quick)
    speed_table(args.quick, args.threads, args.max_iter, args.eps)
    print(f"_total benchmark time {time.perf_counter() - t0:.0f} s, OpenCV {cv2.__version__}, "
          f"numpy {np.__version__}_")


if __name__ == "__main__":
    main()
