"""Main thread vs worker thread: every zoo network's CPU inference, in a plain process.

The napari widgets compute in a worker thread. glibc gives every thread but the main one a
malloc arena of 64 MB heaps and serves any larger block with a fresh ``mmap``, which the
kernel page-faults and zeroes on first touch: a network whose single activation tensors
exceed 64 MB pays that in every layer in a worker thread, never on the main thread (see
``engine.restore.cpu_heap`` and ``BurstFastNet.forward_lean`` for what the burst nets do
about it, and ``microrestore napari``, MALLOC_ARENA_MAX=1, for what removes it for every
model). For each zoo network this runs ``engine.restore.run_net`` (the engine's tiled
inference, default CPU tile) on random input, in a fresh process for each mode so that the
two modes do not share a heap: ``--repeat`` timed runs after a warm-up, on the main thread
and in a ``threading.Thread``, and prints the medians, their ratio and the page faults per
run.

    python benchmarks/bench_threads.py                 # every zoo network, 512 x 512
    python benchmarks/bench_threads.py --size 1024 --models tem-burst-fast sr2x
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, resource, sys, threading, time
import torch
from napari_microrestore.engine.restore import run_net
from napari_microrestore.models.zoo import get_card, load_model

from bench_models import BURST_ARCHS, example  # the input layout of every architecture

model, mode, size, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
card = get_card(model)
net = load_model(card, device="cpu").eval()
torch.manual_seed(0)
burst = card.architecture in BURST_ARCHS
x = example(card.architecture, dict(card.kwargs), size)[0].numpy()
if burst:
    x = x[:, 0]  # (T, 1, H, W) -> (T, H, W), as run_net takes bursts
times, faults = [], []


def job():
    run_net(net, x, burst=burst, device="cpu")
    for _ in range(repeat):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        run_net(net, x, burst=burst, device="cpu")
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


if mode == "main":
    job()
else:
    t = threading.Thread(target=job)
    t.start()
    t.join()
print(json.dumps({"times": times, "faults": faults}))
"""


def measure(model: str, mode: str, size: int, repeat: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO / "benchmarks"),
                                                      env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, model, mode, str(size), str(repeat)],
                          capture_output=True, text=True, env=env, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input edge (px)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode")
    parser.add_argument("--models", nargs="*", help="zoo ids (default: every network)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from napari_microrestore.models.zoo import list_cards

    models = args.models or [c.id for c in list_cards() if not c.is_classical]
    print(f"CPU inference (engine.restore.run_net) on the main thread and in a worker thread, "
          f"{args.size} x {args.size} input, median of {args.repeat} runs after a warm-up, "
          f"{os.cpu_count()} CPUs, a fresh process per mode\n")
    print("| model | main thread (s) | worker thread (s) | ratio | page faults main | "
          "page faults worker |")
    print("|---|---|---|---|---|---|")
    for model in models:
        main_run = measure(model, "main", args.size, args.repeat)
        worker = measure(model, "thread", args.size, args.repeat)
        t_main = statistics.median(main_run["times"])
        t_worker = statistics.median(worker["times"])
        print(f"| {model} | {t_main:.3f} | {t_worker:.3f} | {t_worker / t_main:.2f} | "
              f"{int(statistics.median(main_run['faults']))} | "
              f"{int(statistics.median(worker['faults']))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
