"""Worker-thread penalty: the same restore in a plain process and from the Restore widget.

The call is ``engine.restore.restore(burst, "tem-burst-fast", device="cpu")`` on a simulated
5 x 1024 x 1024 TEM burst (registration + inference). It is timed, in fresh processes:

* ``plain``: a Python process without Qt or napari, on its main thread;
* ``napari, GUI thread``: inside a running napari viewer, the engine called directly on the
  main thread (separates "napari is loaded" from "it runs in a worker");
* ``napari, Restore widget``: the Run button of the Restore widget clicked in the viewer, the
  time measured from the click to the result layer (the scheduler's worker thread, its
  progress reports to the GUI thread and the layer creation included); the scheduler's own
  submit-to-end time is shown too;
* the same with ``MALLOC_ARENA_MAX=1`` (what ``microrestore napari`` sets): glibc gives every
  thread but the main one a malloc arena of 64 MB heaps, a block above that is always
  mmap-ed, and a heap is deleted whenever the heap before it has a free page at its top, so a
  batched forward pass page-faulted and zeroed its activations afresh in every layer (the
  widget ran 1.8x a plain process until the burst nets ran frame by frame at inference and
  ``cpu_heap`` padded the heaps); one arena for every thread avoids the question for any
  model. glibc reads it at start-up only, so it is the environment's setting.
* all of it again with torch's ``THP_MEM_ALLOC_ENABLE=1`` (large tensors on 2 MB transparent
  huge pages: 20-35x fewer page faults, in a worker thread too). Not a default: its times
  spread far more from run to run than with 4 kB pages (compare the min and median
  columns).

Every mode does one warm-up run (model loading, first-call allocations), then ``--runs``
timed runs (in the napari process the GUI-thread call and the widget click alternate, so a
drift of the machine's speed hits both; their pairwise ratio is printed at the end: on a
shared VM the processes' medians move by ~10 % from one run to the next); the table gives the
medians, the ratio to ``plain`` (target <= 1.10 for the
widget) and ``torch.get_num_threads()`` as seen by the thread that computes. Timings on a
machine where other processes compete for the cores are noisy: compare the ratio on a quiet
machine.

Needs an X display for the napari modes: run ``python benchmarks/bench_worker.py``; without
``DISPLAY`` the script re-runs itself under ``xvfb-run -a`` (or run
``xvfb-run -a python benchmarks/bench_worker.py`` yourself).

Usage::

    python benchmarks/bench_worker.py [--runs 5] [--size 1024] [--frames 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_startup import REPO, ensure_display

MODEL = "tem-burst-fast"
TARGET_RATIO = 1.10

_PLAIN = r"""
import json, os, resource, sys, time
import numpy as np
import torch
from napari_microrestore.engine.restore import restore
burst = np.load(sys.argv[1])
runs = int(sys.argv[2])
restore(burst, MODEL, device="cpu")
times, cpu, faults = [], [], []
for _ in range(runs):
    cpu0 = os.times()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    restore(burst, MODEL, device="cpu")
    times.append(time.perf_counter() - t0)
    cpu1 = os.times()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    cpu.append((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system))
print(json.dumps({"times": times, "cpu": cpu, "faults": faults,
                  "threads": torch.get_num_threads()}))
"""

_NAPARI = r"""
import json, resource, sys, time
import numpy as np
import napari
import os
from qtpy.QtCore import QEventLoop, QTimer
from napari_microrestore._napari._widgets import RestoreWidget
from napari_microrestore._napari.scheduler import Task

burst = np.load(sys.argv[1])
runs = int(sys.argv[2])
viewer = napari.Viewer(show=True)
layer = viewer.add_image(burst, name="burst")
widget = RestoreWidget(viewer)
viewer.window.add_dock_widget(widget, name="Restore")
widget.set_model(MODEL)
widget.device_combo.setCurrentText("cpu")
widget.layer_combo.setCurrentIndex(widget.layer_combo.findText("burst"))


def wait(job):
    # run the Qt event loop (idle, as napari's is) until the job has ended
    loop = QEventLoop()
    timer = QTimer()
    timer.timeout.connect(lambda: job.done and loop.quit())
    timer.start(20)
    loop.exec_()
    timer.stop()


def click():
    # click Run: seconds from the click to the result layer, the job's time, process CPU
    loop = QEventLoop()
    quit_loop = lambda event: loop.quit()
    viewer.layers.events.inserted.connect(quit_loop)
    cpu0 = os.times()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    widget.panel.run_button.click()
    job = widget.panel.job
    loop.exec_()
    seconds = time.perf_counter() - t0
    cpu1 = os.times()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    viewer.layers.events.inserted.disconnect(quit_loop)
    wait(job)
    assert job.state == "done", job.state
    viewer.layers.pop()
    return (seconds, job.seconds, (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
            faults)


wait(widget.device_job)
# the thread count a worker thread of the scheduler sees
import torch
seen = []
wait(widget.scheduler.submit(Task("threads", torch.get_num_threads), on_result=seen.append))

from napari_microrestore.engine.restore import restore


def direct_run():
    cpu0 = os.times()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    restore(burst, MODEL, device="cpu")
    seconds = time.perf_counter() - t0
    cpu1 = os.times()
    return (seconds, (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


# warm-ups, then the two modes interleaved (a drift of the machine's speed hits both alike)
restore(burst, MODEL, device="cpu")
click()
direct, direct_cpu, direct_faults = [], [], []
widget_times, job_times, widget_cpu, widget_faults = [], [], [], []
for _ in range(runs):
    s, c, f = direct_run()
    direct.append(s)
    direct_cpu.append(c)
    direct_faults.append(f)
    s, j, c, f = click()
    widget_times.append(s)
    job_times.append(j)
    widget_cpu.append(c)
    widget_faults.append(f)
print(json.dumps({"direct": direct, "direct_cpu": direct_cpu, "direct_faults": direct_faults,
                  "widget": widget_times, "job": job_times, "widget_cpu": widget_cpu,
                  "widget_faults": widget_faults,
                  "threads_main": torch.get_num_threads(), "threads_worker": seen[0]}))
viewer.close()
"""


def _burst(size: int, frames: int) -> object:
    import numpy as np

    from napari_microrestore.core import degrade, probes

    rng = np.random.default_rng(0)
    scene = probes.make_probe("spots-lines", (size + size // 8,) * 2, rng=rng) * 100 + 10
    burst = degrade.simulate_burst(scene, frames, shape=(size, size), blur_length=8, dose=40,
                                   rng=rng)
    return burst.frames.astype(np.float32)


def _run(code: str, *args: str, extra_env: dict | None = None) -> dict:
    env = dict(os.environ) | (extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"),
                                                      env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", f"MODEL = {MODEL!r}\n" + code, *args],
                          capture_output=True, text=True, env=env, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per mode")
    parser.add_argument("--size", type=int, default=1024, help="frame edge (px)")
    parser.add_argument("--frames", type=int, default=5, help="frames in the burst")
    args = parser.parse_args(argv)
    ensure_display(Path(__file__))
    sys.path.insert(0, str(REPO / "src"))
    import numpy as np

    thp_on = {"THP_MEM_ALLOC_ENABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "burst.npy"
        np.save(path, _burst(args.size, args.frames))
        plain = _run(_PLAIN, str(path), str(args.runs))
        gui = _run(_NAPARI, str(path), str(args.runs))
        one_arena = _run(_NAPARI, str(path), str(args.runs),
                         extra_env={"MALLOC_ARENA_MAX": "1"})
        plain_thp = _run(_PLAIN, str(path), str(args.runs), extra_env=thp_on)
        gui_thp = _run(_NAPARI, str(path), str(args.runs), extra_env=thp_on)
        one_arena_thp = _run(_NAPARI, str(path), str(args.runs),
                             extra_env={"MALLOC_ARENA_MAX": "1", **thp_on})

    def napari_rows(prefix: str, run: dict) -> list:
        return [(f"{prefix}napari, engine on the GUI thread", run["direct"], run["direct_cpu"],
                 run["direct_faults"], run["threads_main"]),
                (f"{prefix}napari, Restore widget: click -> layer", run["widget"],
                 run["widget_cpu"], run["widget_faults"], run["threads_worker"]),
                (f"{prefix}napari, Restore widget: scheduler job", run["job"], None, None,
                 run["threads_worker"])]

    groups = [
        ("default", plain,
         [("plain process", plain["times"], plain["cpu"], plain["faults"], plain["threads"]),
          *napari_rows("", gui), *napari_rows("MALLOC_ARENA_MAX=1: ", one_arena)]),
        ("THP_MEM_ALLOC_ENABLE=1", plain_thp,
         [("plain process", plain_thp["times"], plain_thp["cpu"], plain_thp["faults"],
           plain_thp["threads"]),
          *napari_rows("", gui_thp), *napari_rows("MALLOC_ARENA_MAX=1: ", one_arena_thp)]),
    ]
    print(f"Worker-thread penalty: {MODEL} restore of a {args.frames} x {args.size} x "
          f"{args.size} burst on the CPU, median of {args.runs} runs after a warm-up "
          f"({os.cpu_count()} CPUs); ratios to the plain process of the same group\n")
    print("| environment | mode | median (s) | min (s) | ratio to plain | process CPU (s) | "
          "page faults | torch threads |")
    print("|---|---|---|---|---|---|---|---|")
    for env_name, base_run, rows in groups:
        base = statistics.median(base_run["times"])
        for name, times, cpu, faults, threads in rows:
            med = statistics.median(times)
            cpu_s = f"{statistics.median(cpu):.2f}" if cpu else "-"
            faults_s = f"{int(statistics.median(faults))}" if faults else "-"
            print(f"| {env_name} | {name} | {med:.3f} | {min(times):.3f} | {med / base:.2f} | "
                  f"{cpu_s} | {faults_s} | {threads} |")
    base = statistics.median(plain["times"])
    ratio = statistics.median(gui["widget"]) / base
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"\nwidget / plain = {ratio:.2f} (target <= {TARGET_RATIO}): {verdict}")
    pairs = [w / d for w, d in zip(gui["widget"], gui["direct"])]
    jobs = [j / d for j, d in zip(gui["job"], gui["direct"])]
    print(f"same napari process, interleaved runs: widget (click -> layer) / engine on the GUI "
          f"thread = {statistics.median(pairs):.2f} (median of {len(pairs)} pairs; "
          f"scheduler job / GUI thread = {statistics.median(jobs):.2f})")
    print(f"with MALLOC_ARENA_MAX=1: widget / plain = "
          f"{statistics.median(one_arena['widget']) / base:.2f}")
    thp = statistics.median(plain_thp["times"])
    print(f"THP_MEM_ALLOC_ENABLE=1: widget / plain = "
          f"{statistics.median(gui_thp['widget']) / thp:.2f}; "
          f"plain process with / without = {thp / base:.2f}")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
