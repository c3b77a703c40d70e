"""Fine-tuning gain vs time: dB on a held-out crop of the user's burst, before / after
fine-tuning with the widget's code path (``engine.finetune.finetune`` with the widget's preset:
"CPU quick" on the CPU, "GPU" with ``--device cuda``).

    python benchmarks/bench_finetune.py                     # CPU, 30 / 60 / 120 s budgets
    python benchmarks/bench_finetune.py --device cuda       # GPU preset (target: 20 s)
    python benchmarks/bench_finetune.py --budgets 20 --modes pairs --scenarios long-blur

Data. The "user's own data" are bursts simulated as in ``engine.data.BurstSampler`` (moving
stage, motion blur, Poisson noise; ``core.degrade.simulate_burst``) from a real clean section
of the *validation* split (last 20 %) of the shared ssTEM / FIB-SEM stacks, which the shipped
models never trained on; the ground truth is that section. Scenarios:

* ``as-trained``: degradations inside the training ranges (vertical motion, 10 px blur,
  20 counts / px): what fine-tuning adds when the user's data resemble the training data;
* ``horizontal``: the user's stage moves along X (blur angle 0 degrees), 10 px blur, 20
  counts / px. The shipped models learned motion along the columns, and the engine turns a
  burst until its motion runs along them (``engine.restore.burst_orientation``,
  ``core.orient``), here by an exact quarter turn (before any turn the base model lost ~3 dB
  here, which fine-tuning won back);
* ``long-blur``: vertical motion, 24 px blur (beyond the trained 6-14), 20 counts / px: a
  faster stage than the training one;
* ``diagonal``: as ``long-blur`` with the stage moving at 30 degrees, which the engine turns
  by -60 degrees (interpolated, on a larger canvas): fine-tuning on a rotated view;
* ``low-dose``: vertical motion, 14 px blur, 6 counts / px (below the trained 12-80).

The TEM stream data under ``tem_stream/`` are too noisy to serve as clean ground truth, so the
real 13-frame liquid-cell stream is used for a self-supervised run whose holdout *loss* is
reported (no dB: there is no truth). The holdout crop (bottom-right 128 x 128 px of the
covered region) is never trained on; PSNR there is measured against the truth after a gain +
offset fit, with a 4 px border ignored. Skips cleanly when ``../shared/data`` is absent.
Timings depend on the machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

from napari_microrestore.core import degrade, io, metrics
from napari_microrestore.core.registration import register_burst
from napari_microrestore.engine.data import shared_data_dir
from napari_microrestore.engine.finetune import PRESETS, finetune

SCENARIOS = {
    "as-trained": {"source": "sstem/gerhard_vnc_stack1.tif", "blur_angle": 90.0,
                   "blur_length": 10.0, "dose": 20.0},
    "horizontal": {"source": "sstem/gerhard_vnc_stack1.tif", "blur_angle": 0.0,
                   "blur_length": 10.0, "dose": 20.0},
    "diagonal": {"source": "sstem/gerhard_vnc_stack1.tif", "blur_angle": 30.0,
                 "blur_length": 24.0, "dose": 20.0},
    "long-blur": {"source": "sstem/gerhard_vnc_stack1.tif", "blur_angle": 90.0,
                  "blur_length": 24.0, "dose": 20.0},
    "low-dose": {"source": "sstem/epfl_fibsem_train_slices.tif", "blur_angle": 90.0,
                 "blur_length": 14.0, "dose": 6.0},
}
STREAM = "tem_stream/liquid_cell_gold_growth_13frames.tif"


def make_burst(scenario: dict, size: int, seed: int) -> degrade.Burst:
    """A 5-frame burst simulated from the last (validation) section of the scenario's stack."""
    stack = io.read(shared_data_dir() / scenario["source"], lazy=True)
    clean = np.asarray(stack.data[len(stack.data) - 1], np.float32) + 1.0
    return degrade.simulate_burst(clean, 5, shape=(size, size),
                                  blur_length=scenario["blur_length"],
                                  blur_angle=scenario["blur_angle"], dose=scenario["dose"],
                                  rng=np.random.default_rng(seed))


def holdout_psnr(image: np.ndarray, truth: np.ndarray, box: tuple) -> float:
    y, x, h, w = box
    return metrics.compare(image, truth[y:y + h, x:x + w], fit=True, border=4)["psnr"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    ap.add_argument("--budgets", type=float, nargs="+", default=None,
                    help="seconds (default: 30 60 120 on the CPU, 10 20 on a GPU)")
    ap.add_argument("--modes", nargs="+", default=["pairs", "self-supervised"])
    ap.add_argument("--scenarios", nargs="+", default=["long-blur", "as-trained"],
                    choices=list(SCENARIOS))
    ap.add_argument("--model", default="tem-burst-fast")
    ap.add_argument("--size", type=int, default=512, help="frame side (default 512)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stream", action="store_true", help="skip the real-stream run")
    for key, kind in (("lr", float), ("patch", int), ("batch", int)):
        ap.add_argument(f"--{key}", type=kind, default=None, help=f"override the preset's {key}")
    args = ap.parse_args()

    root = shared_data_dir()
    if not (root / "sstem").is_dir():
        print(f"skipped: shared data not found in {root} (set MICRORESTORE_SHARED_DATA)")
        return 0
    gpu = args.device.startswith("cuda")
    preset = dict(PRESETS["GPU" if gpu else "CPU quick"])
    preset.update({k: getattr(args, k) for k in ("lr", "patch", "batch")
                   if getattr(args, k) is not None})
    budgets = args.budgets or ([10.0, 20.0] if gpu else [30.0, 60.0, 120.0])
    print(f"# fine-tuning {args.model}, preset {'GPU' if gpu else 'CPU quick'} "
          f"(patch {preset['patch']}, batch {preset['batch']}, lr {preset['lr']}), device "
          f"{args.device}, {args.threads} CPU threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'scenario':<11} {'mode':<16} {'budget':>6} {'steps':>5} {'secs':>6} "
          f"{'reg.mean':>8} {'base dB':>7} {'tuned dB':>8} {'gain dB':>7}")
    for name in args.scenarios:
        b = make_burst(SCENARIOS[name], args.size, args.seed)
        registered_mean = register_burst(b.frames).aligned.mean(0)
        for mode in args.modes:
            for budget in budgets:
                res = finetune(args.model, b.frames, mode=mode,
                               reference=b.ground_truth if mode == "pairs" else None,
                               budget_seconds=budget, patch=preset["patch"],
                               batch=preset["batch"], lr=preset["lr"], device=args.device,
                               threads=args.threads, seed=args.seed, data_name=name)
                y, x, h, w = res.holdout
                mean = holdout_psnr(registered_mean[y:y + h, x:x + w], b.ground_truth,
                                    res.holdout)
                before = holdout_psnr(res.preview_before, b.ground_truth, res.holdout)
                after = holdout_psnr(res.preview_after, b.ground_truth, res.holdout)
                print(f"{name:<11} {mode:<16} {budget:>6.0f} {res.steps:>5} {res.seconds:>6.1f} "
                      f"{mean:>8.2f} {before:>7.2f} {after:>8.2f} {after - before:>+7.2f}",
                      flush=True)
    stream = root / STREAM
    if not args.no_stream and stream.is_file() and "self-supervised" in args.modes:
        frames = np.asarray(io.read(stream, lazy=True).data[4:9], np.float32)
        frames = frames[:, :768, :768]
        t = time.perf_counter()
        res = finetune(args.model, frames, mode="self-supervised", budget_seconds=budgets[-1],
                       patch=preset["patch"], batch=preset["batch"], lr=preset["lr"],
                       device=args.device, threads=args.threads, seed=args.seed,
                       data_name="liquid-cell stream")
        print(f"real liquid-cell stream (5 frames, 768 x 768, no truth): self-supervised "
              f"holdout loss {res.before['loss']:.4f} -> {res.after['loss']:.4f} in "
              f"{res.steps} steps, {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
