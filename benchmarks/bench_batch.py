"""Batch throughput: blocks per second of `microrestore batch` with 1 and 2 Dask workers.

    python benchmarks/bench_batch.py                    # tem-burst-fast, 32 frames of 256^2
    python benchmarks/bench_batch.py --quick            # registered-mean, 16 frames of 128^2
    python benchmarks/bench_batch.py --workers 0,1,2,4 --size 512 --model tem-burst

A simulated TEM stream (moving stage, motion blur, Poisson noise) is written as a TIFF and
restored into OME-Zarr by engine.batch.run_batch: one output frame per burst window, ``--block``
frames per block. Each worker count gets its own LocalCluster (processes, loopback, cores /
workers torch threads each) that is warmed up first (imports, model load: one block per worker
into a scratch output), so the table reports steady-state blocks/s; "total s" is the whole
timed call (planning and result collection included, cluster start-up not). Workers 0 is the
same code in this process without Dask, the baseline.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_microrestore.core import degrade, io, probes
from napari_microrestore.engine.batch import run_batch


def make_stream(path: Path, frames: int, size: int, seed: int = 0) -> None:
    """A long stream: a probe pattern under a stage drifting through it, as uint16 counts."""
    rng = np.random.default_rng(seed)
    # the stage moves about one blur length (8 px) per frame, mostly along Y
    scene = probes.make_probe("spots-lines", (size + 16 * frames + 64, size + 64), rng=rng)
    scene = scene * 100 + 10
    burst = degrade.simulate_burst(scene, frames, shape=(size, size), blur_length=8, dose=40,
                                   rng=rng)
    io.write_tiff(path, np.clip(burst.frames, 0, 65535).astype(np.uint16), axes="TYX",
                  pixel_size=(1.0, 1.0, 1.0), unit="nm")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def measure(src: Path, work: Path, model: str, workers: int, block: int,
            register: bool) -> tuple[int, float, float]:
    """(blocks, block seconds, total seconds) of a warmed-up run with ``workers`` workers."""
    threads = max(1, cores() // max(1, workers))
    kw = {"block": block, "register": register, "device": "cpu", "threads": threads}
    out = work / f"w{workers}.zarr"
    if workers == 0:
        run_batch([src], work / "warm0.zarr", model, workers=0, max_blocks=1, **kw)
        t = time.perf_counter()
        s = run_batch([src], out, model, workers=0, **kw)
        return s.blocks_done, s.run_seconds, time.perf_counter() - t
    import distributed

    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster:
        address = cluster.scheduler_address
        run_batch([src], work / f"warm{workers}.zarr", model, scheduler=address,
                  max_blocks=workers, **kw)
        t = time.perf_counter()
        s = run_batch([src], out, model, scheduler=address, **kw)
        total = time.perf_counter() - t
    if not s.complete:
        raise SystemExit(f"{workers} workers: incomplete run:\n{s.text()}")
    return s.blocks_done, s.run_seconds, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default tem-burst-fast (--quick: "
                                                  "registered-mean)")
    ap.add_argument("--frames", type=int, default=None, help="stream length (default 32)")
    ap.add_argument("--size", type=int, default=None, help="frame edge (default 256)")
    ap.add_argument("--block", type=int, default=2, help="output frames per block")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--no-register", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small and classical: a fast check")
    args = ap.parse_args()
    model = args.model or ("registered-mean" if args.quick else "tem-burst-fast")
    frames = args.frames or (16 if args.quick else 32)
    size = args.size or (128 if args.quick else 256)
    counts = [int(w) for w in args.workers.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        src = work / "stream.tif"
        make_stream(src, frames, size)
        print(f"{platform.processor() or platform.machine()}, {cores()} CPU cores; {model}, "
              f"{frames} frames of {size}x{size}, {args.block} frames per block, "
              f"registration {'off' if args.no_register else 'on'}")
        print()
        cols = ["workers", "torch threads each", "blocks", "blocks/s", "frames/s",
                "output MP/s", "total s"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
        for w in counts:
            n, run_s, total = measure(src, work, model, w, args.block, not args.no_register)
            fps = frames / run_s
            cells = [f"{w}" + (" (in process)" if w == 0 else ""),
                     str(max(1, cores() // max(1, w))), str(n), f"{n / run_s:.3f}",
                     f"{fps:.2f}", f"{fps * size * size / 1e6:.3f}", f"{total:.1f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
