"""GPU benchmark of the live path and the large-burst path (runs on CPU too, as a smoke test).

Three measurements, printed as Markdown tables (``--json PATH`` also writes them as JSON):

1. **Live path** (``engine.live.LivePipeline``, default ``tem-burst-fast``): a simulated stream
   of ``--frames`` frames of ``--size``^2 (a sharp probe scene drifting by a random walk,
   Poisson noise) is restored window by window (``--window`` frames). Reported: bursts/s of
   the whole pipeline (frame upload, cached torch registration, inference, copy of the result
   to the host) and with the result kept on the device; registration alone (one new frame's
   features + a window's registration); inference alone (normalisation + the net on a fixed
   window). The model's FLOPs per burst (``models._flops``, a multiply-add = 2 FLOPs) and the
   FLOP floor at the device's dense fp16/bf16 tensor peak give ``x floor`` = measured / floor.
   On CUDA the CUDA-graph result is checked against an eager pipeline, and every run checks
   one window against ``engine.restore`` (relative RMS difference).
2. **Quality model** (``tem-burst``) on one ``--frames-big``-frame ``--big``^2 burst with
   device-side tiling (``engine.live.restore_burst_device``, tile ``--tile``): seconds
   (registration + inference) and ``torch.cuda.max_memory_allocated``.
3. **Registration**: ``core.registration.register_burst`` (OpenCV, CPU) against
   ``core.registration_torch.register_burst_torch`` on the device, on one ``--window``-frame
   burst of ``--size``^2 with known shifts: seconds and the largest shift difference.

Usage::

    python benchmarks/bench_gpu.py                                # CUDA: the issue's sizes
    python benchmarks/bench_gpu.py --device cpu --size 256 --big 512 --frames 12   # smoke run

Timings on CUDA are bracketed by ``torch.cuda.synchronize()``; the first window (and the CUDA
graph capture) is excluded from the live timings.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from napari_microrestore.core import probes
from napari_microrestore.core.io import write_json
from napari_microrestore.core.registration import prefilter_sigma, register_burst
from napari_microrestore.core.registration_torch import (
    StreamRegistrar,
    register_burst_torch,
)
from napari_microrestore.engine.live import LivePipeline, restore_burst_device
from napari_microrestore.engine.restore import _load_net, resolve_device, restore
from napari_microrestore.core.orient import net_rotation, rotated_shape
from napari_microrestore.models._flops import gflops_per_megapixel
from napari_microrestore.models.zoo import get_card

# dense (no sparsity) fp16 / bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
PEAK_TFLOPS = {
    "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
    "V100": 125.0, "RTX 4090": 165.2,
}


# ------------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def peak_tflops(device: str) -> tuple[float, str]:
    """Dense fp16/bf16 peak of the device: from the table, else measured with a large matmul
    (fp16 on CUDA, fp32 on CPU; a measured 'peak' is a lower bound of the true one)."""
    name = device_name(device)
    if device.startswith("cuda"):
        for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
            if key.lower() in name.lower():
                return PEAK_TFLOPS[key], f"data sheet ({key})"
    n = 8192 if device.startswith("cuda") else 1024
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps = 10 if device.startswith("cuda") else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12, f"measured {dtype} matmul"


def make_stream(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) float32 frames of a probe scene drifting by a sub-pixel random walk
    (about 2 px per frame, within +-40 px of the start) with Poisson noise at ~20 counts/px,
    and each frame's true (dy, dx) content shift relative to frame 0."""
    rng = np.random.default_rng(seed)
    margin = 48
    big = size + 2 * margin
    scene = (probes.make_probe("spots-lines", (big, big), rng=rng) * 30 + 5).astype(np.float32)
    steps = rng.normal(0, 1.5, (n, 2))
    pos = np.clip(np.cumsum(steps, axis=0) - steps[0], -40, 40)
    frames = np.empty((n, size, size), np.float32)
    for t, (dy, dx) in enumerate(pos):
        m = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
        moved = cv2.warpAffine(scene, m, (big, big), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REFLECT)
        frames[t] = moved[margin:margin + size, margin:margin + size]
    frames = rng.poisson(np.maximum(frames, 0)).astype(np.float32)
    return frames, pos


def median_time(fn, device: str, repeat: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n### {title}\n\n| quantity | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


# ------------------------------------------------------------------------------ benchmarks
def bench_live(args, device: str, peak: float) -> dict:
    frames, _ = make_stream(args.frames, args.size)
    w = args.window
    # the simulated stage wanders without a direction (and without blur): the direction is
    # given, so that every pipeline here turns the frames the same way (90: not at all;
    # --motion-angle 45 measures the largest canvas, twice the frame's area)
    kw = {"device": device, "window": w, "amp": args.amp, "cuda_graphs": not args.no_graphs,
          "compile": args.compile, "motion_angle": args.motion_angle}
    card = get_card(args.model)
    net = _load_net(card, device)
    flop_size = 256
    gflop = gflops_per_megapixel(net, torch.randn(1, w, 1, flop_size, flop_size,
                                                          device=device))
    canvas = rotated_shape((args.size, args.size), net_rotation(args.motion_angle))
    gflop_burst = gflop * canvas[0] * canvas[1] / 1e6
    floor_s = gflop_burst / (peak * 1e3)

    def run_stream(keep: bool) -> tuple[float, list, LivePipeline]:
        live = LivePipeline(args.model, keep_on_device=keep, **kw)
        outs = []
        for f in frames[:w]:  # fill the window; the first window includes any capture
            out = live.push(f)
        outs.append(out)
        sync(device)
        t = time.perf_counter()
        for f in frames[w:]:
            outs.append(live.push(f))
        sync(device)
        n = len(frames) - w
        return (time.perf_counter() - t) / max(n, 1), outs, live

    total_s, outs, live = run_stream(False)
    device_s, _, _ = run_stream(True)

    # registration alone: one new frame's features + the window's registration
    sigma = prefilter_sigma(frames[w // 2])
    stream = StreamRegistrar(w, frames.shape[1:], sigma=sigma, device=device)
    dev_frames = torch.from_numpy(frames).to(device)
    for f in dev_frames[:w]:
        stream.push(f)
    it = iter(dev_frames[w:].repeat(max(1, args.repeat), 1, 1))

    def reg_step():
        with torch.no_grad():
            stream.push(next(it))
            stream.register()
    reg_s = median_time(reg_step, device, max(3, min(args.repeat, len(frames) - w - 1)))

    # inference alone on a fixed registered window, by the stream's pipeline (turned as its
    # first window decided)
    aligned = stream.register()
    inf_s = median_time(lambda: live.restore_aligned(aligned.aligned, aligned.coverage),
                        device, args.repeat)

    # checks: one window against engine.restore; on CUDA the graph against eager
    c = outs[-1].index
    want = restore(frames[c - w // 2:c - w // 2 + w], args.model, device=device,
                   motion_angle=args.motion_angle).image
    rel_rms = float(np.sqrt(((outs[-1].image - want) ** 2).mean()) / want.std())
    graph_diff = None
    if device.startswith("cuda") and not args.no_graphs:
        eager = LivePipeline(args.model, **{**kw, "cuda_graphs": False})
        e_out = [eager.push(f) for f in frames[:w + 1]][-1]
        g_out = outs[1]
        graph_diff = float(np.abs(e_out.image - g_out.image).max() / want.std())
    res = {
        "model": args.model, "size": args.size, "window": w, "frames": args.frames,
        "gflop_per_burst": gflop_burst, "floor_ms": floor_s * 1e3,
        "total_ms": total_s * 1e3, "bursts_per_s": 1 / total_s,
        "device_resident_ms": device_s * 1e3, "device_resident_bursts_per_s": 1 / device_s,
        "registration_ms": reg_s * 1e3, "inference_ms": inf_s * 1e3,
        "inference_x_floor": inf_s / floor_s, "total_x_floor": total_s / floor_s,
        "rel_rms_vs_engine_restore": rel_rms, "graph_vs_eager_rel_max": graph_diff,
    }
    table(f"Live path: {args.model}, {w} x {args.size}^2 bursts", [
        ("model FLOPs per burst", f"{gflop_burst:.1f} GFLOP"),
        ("FLOP floor at peak", f"{floor_s * 1e3:.3f} ms"),
        ("total (upload, register, restore, copy back)",
         f"{total_s * 1e3:.2f} ms = {1 / total_s:.1f} bursts/s"),
        ("total, result kept on device", f"{device_s * 1e3:.2f} ms = {1 / device_s:.1f} bursts/s"),
        ("registration alone (cached stream)", f"{reg_s * 1e3:.2f} ms"),
        ("inference alone", f"{inf_s * 1e3:.2f} ms"),
        ("inference / FLOP floor", f"{inf_s / floor_s:.1f} x"),
        ("total / FLOP floor", f"{total_s / floor_s:.1f} x"),
        ("live vs engine.restore (RMS / std)", f"{rel_rms:.4f}"),
        ("CUDA graph vs eager (max / std)", "-" if graph_diff is None else f"{graph_diff:.2e}"),
    ])
    return res


def bench_big(args, device: str) -> dict:
    frames, _ = make_stream(args.frames_big, args.big, seed=1)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def run():
        restore_burst_device(frames, "tem-burst", device=device, tile=args.tile,
                             batch=args.batch, amp=args.amp, motion_angle=args.motion_angle)
    seconds = median_time(run, device, max(1, args.repeat // 3))
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda")
            else float("nan"))
    table(f"Quality model tem-burst: {args.frames_big} x {args.big}^2, tile {args.tile}", [
        ("seconds (registration + tiled inference)", f"{seconds:.3f}"),
        ("peak GPU memory allocated", "-" if math.isnan(peak) else f"{peak:.2f} GiB"),
    ])
    return {"size": args.big, "frames": args.frames_big, "tile": args.tile,
            "seconds": seconds, "peak_gib": None if math.isnan(peak) else peak}


def bench_registration(args, device: str) -> dict:
    frames, pos = make_stream(args.window, args.size, seed=2)
    ref = args.window // 2
    truth = pos - pos[ref]
    core_s = median_time(lambda: register_burst(frames), "cpu", max(1, args.repeat // 3))
    core = register_burst(frames)
    dev_frames = torch.from_numpy(frames).to(device)
    torch_s = median_time(lambda: register_burst_torch(dev_frames, sigma=core.sigma,
                                                       device=device),
                          device, args.repeat)
    got = register_burst_torch(dev_frames, sigma=core.sigma, device=device).to_numpy()
    diff = float(np.abs(got.shifts - core.shifts).max())
    err_core = float(np.abs(core.shifts - truth).max())
    err_torch = float(np.abs(got.shifts - truth).max())
    table(f"Registration: {args.window} x {args.size}^2 burst", [
        ("core register_burst (OpenCV, CPU)", f"{core_s * 1e3:.1f} ms"),
        (f"register_burst_torch ({device})", f"{torch_s * 1e3:.1f} ms"),
        ("max |shift torch - shift core|", f"{diff:.4f} px"),
        ("max shift error core / torch", f"{err_core:.3f} / {err_torch:.3f} px"),
    ])
    return {"core_ms": core_s * 1e3, "torch_ms": torch_s * 1e3, "max_shift_diff_px": diff,
            "max_error_core_px": err_core, "max_error_torch_px": err_torch}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="tem-burst-fast")
    ap.add_argument("--size", type=int, default=1024, help="live frame edge (default 1024)")
    ap.add_argument("--frames", type=int, default=64, help="live stream length (default 64)")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--motion-angle", type=float, default=90.0,
                    help="stage direction given to the live path (default 90: no rotation)")
    ap.add_argument("--big", type=int, default=4096, help="quality-model burst edge")
    ap.add_argument("--frames-big", type=int, default=5)
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="tiles per forward pass")
    ap.add_argument("--amp", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--no-graphs", action="store_true", help="no CUDA graphs")
    ap.add_argument("--compile", action="store_true", help="torch.compile the net")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: live,big,reg")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    device = resolve_device(args.device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    peak, source = peak_tflops(device)
    print(f"torch {torch.__version__}, device {device} ({device_name(device)}), "
          f"peak {peak:.3g} TFLOP/s ({source}), {torch.get_num_threads()} CPU threads")
    skip = set(filter(None, args.skip.split(",")))
    results = {"device": device, "device_name": device_name(device), "peak_tflops": peak,
               "peak_source": source, "torch": torch.__version__, "args": vars(args)}
    if "live" not in skip:
        results["live"] = bench_live(args, device, peak)
    if "big" not in skip:
        results["big"] = bench_big(args, device)
    if "reg" not in skip:
        results["registration"] = bench_registration(args, device)
    if args.json:
        results["args"]["json"] = str(args.json)
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
