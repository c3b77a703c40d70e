"""Worker penalty: the same restore in a plain process and from the Restore widget.

The call is ``engine.restore.restore(data, MODEL, device="cpu")``; ``data`` is a simulated
5 x 1024 x 1024 TEM burst for burst models (registration + inference; tem-single gets its 3
frames), one frame of it for single-image models (sr2x, zstack-defocus) and a 5-section stack
with a blank middle section for sstem-restore. It is timed, in fresh processes:

* ``plain``: a Python process without Qt or napari, on its main thread;
* ``napari, GUI thread``: inside a running napari viewer, the engine called directly on the
  main thread (separates "napari is loaded" from "it runs elsewhere");
* ``napari, Restore widget (compute process)``: the Run button of the Restore widget clicked
  in the viewer, timed from the click to the result layer (the scheduler's worker thread
  hands the engine call to the compute process, whose main thread computes: see
  ``engine/compute_process.py``; the transfers, progress reports and the layer creation are
  included); the scheduler's own submit-to-end time is shown too;
* ``napari, Restore widget (worker thread)``: the same with ``MICRORESTORE_CPU_PROCESS=0``,
  so the engine runs in the scheduler's worker thread, as before the compute process: there
  glibc gives the thread a malloc arena of 64 MB heaps, a block above that is always mmap-ed,
  and a heap is deleted whenever the heap before it has a free page at its top, so models
  whose tensors exceed 64 MB page-fault their activations afresh in every layer
  (``bench_threads.py`` measures it per model);
* that worker thread with ``MALLOC_ARENA_MAX=1`` (one arena for every thread; glibc reads it
  at start-up only, so it is the environment's setting);
* with ``--thp``, all of it again with torch's ``THP_MEM_ALLOC_ENABLE=1`` (large tensors on
  2 MB transparent huge pages: far fewer page faults; its times spread more from run to run).

Every mode runs in a fresh process (the GUI-thread calls in one napari process, the clicks in
another: torch work on the GUI thread would leave that process's threads and heap busy while
the compute process works) and does one warm-up run (model loading, first-call allocations),
then ``--runs`` timed runs (on a shared VM a process's median moves by ~10 % from one run to
the next); the table gives the
medians, the ratio to ``plain`` (target <= 1.10 for the widget), the CPU seconds and minor
page faults of the napari process *and its compute process*, and ``torch.get_num_threads()``.
Timings on a machine where other processes compete for the cores are noisy: compare the ratio
on a quiet machine.

Needs an X display for the napari modes: run ``python benchmarks/bench_worker.py``; without
``DISPLAY`` the script re-runs itself under ``xvfb-run -a`` (or run
``xvfb-run -a python benchmarks/bench_worker.py`` yourself).

Usage::

    python benchmarks/bench_worker.py [--runs 5] [--size 1024] [--frames 5]
                                      [--model tem-burst-fast] [--thp]
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
data = np.load(sys.argv[1])
runs = int(sys.argv[2])
restore(data, MODEL, device="cpu")
times, cpu, faults = [], [], []
for _ in range(runs):
    cpu0 = os.times()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    restore(data, MODEL, device="cpu")
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
from napari_microrestore.engine import compute_process

data = np.load(sys.argv[1])
runs = int(sys.argv[2])
MODE = sys.argv[3]  # "direct" (engine on the GUI thread) or "widget" (Run clicked)
viewer = napari.Viewer(show=True)
layer = viewer.add_image(data, name="input")
widget = RestoreWidget(viewer)
viewer.window.add_dock_widget(widget, name="Restore")
widget.set_model(MODEL)
widget.device_combo.setCurrentText("cpu")
widget.layer_combo.setCurrentIndex(widget.layer_combo.findText("input"))
CLK = os.sysconf("SC_CLK_TCK")


def child():
    # CPU seconds and minor page faults of the compute process so far (Linux /proc)
    pid = compute_process.shared().pid if compute_process.enabled() else None
    if pid is None:
        return 0.0, 0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK, int(fields[7])


def usage():
    t = os.times()
    c, f = child()
    return t.user + t.system + c, resource.getrusage(resource.RUSAGE_SELF).ru_minflt + f


def wait(job):
    # run the Qt event loop (idle, as napari's is) until the job has ended
    loop = QEventLoop()
    timer = QTimer()
    timer.timeout.connect(lambda: job.done and loop.quit())
    timer.start(20)
    loop.exec_()
    timer.stop()


def click():
    # click Run: seconds from the click to the result layer, the job's time, CPU, faults
    loop = QEventLoop()
    quit_loop = lambda event: loop.quit()
    viewer.layers.events.inserted.connect(quit_loop)
    c0, f0 = usage()
    t0 = time.perf_counter()
    widget.panel.run_button.click()
    job = widget.panel.job
    loop.exec_()
    seconds = time.perf_counter() - t0
    c1, f1 = usage()
    viewer.layers.events.inserted.disconnect(quit_loop)
    wait(job)
    assert job.state == "done", job.state
    viewer.layers.pop()
    return seconds, job.seconds, c1 - c0, f1 - f0


wait(widget.device_job)
if compute_process.enabled():
    assert compute_process.shared().wait_ready(), "the compute process did not start"
# the thread count the computing thread sees
import torch
seen = []
wait(widget.scheduler.submit(Task("threads", torch.get_num_threads), on_result=seen.append))
calls0 = compute_process.shared().calls

from napari_microrestore.engine.restore import restore


def direct_run():
    c0, f0 = usage()
    t0 = time.perf_counter()
    restore(data, MODEL, device="cpu")
    seconds = time.perf_counter() - t0
    c1, f1 = usage()
    return seconds, c1 - c0, f1 - f0


# one mode per process (engine calls on the GUI thread leave this process's torch threads and
# heap busy, which would slow the compute process down), a warm-up first
direct, direct_cpu, direct_faults = [], [], []
widget_times, job_times, widget_cpu, widget_faults = [], [], [], []
if MODE == "direct":
    restore(data, MODEL, device="cpu")
    for _ in range(runs):
        s, c, f = direct_run()
        direct.append(s)
        direct_cpu.append(c)
        direct_faults.append(f)
else:
    click()
    for _ in range(runs):
        s, j, c, f = click()
        widget_times.append(s)
        job_times.append(j)
        widget_cpu.append(c)
        widget_faults.append(f)
in_process = compute_process.shared().calls - calls0
print(json.dumps({"direct": direct, "direct_cpu": direct_cpu, "direct_faults": direct_faults,
                  "widget": widget_times, "job": job_times, "widget_cpu": widget_cpu,
                  "widget_faults": widget_faults, "process_calls": in_process,
                  "threads_main": torch.get_num_threads(), "threads_worker": seen[0]}))
viewer.close()
"""


def _input(model: str, size: int, frames: int) -> object:
    """A simulated TEM burst for burst models, one of its frames for single-image models, a
    5-section stack with a blank (missing) middle section for ssTEM models."""
    import numpy as np

    from napari_microrestore.core import degrade, probes
    from napari_microrestore.models.zoo import get_card

    card = get_card(model)
    if card.is_burst:
        frames = min(max(frames, card.frames["min"]), card.frames["max"])
    rng = np.random.default_rng(0)
    scene = probes.make_probe("spots-lines", (size + max(size // 8, 64),) * 2, rng=rng)
    burst = degrade.simulate_burst(scene * 100 + 10, max(frames, 5), shape=(size, size), blur_length=8,
                                   dose=40, rng=rng)
    stack = burst.frames.astype(np.float32)
    if card.is_burst:
        return stack[:frames]
    if card.task == "sstem":
        stack = stack[:5].copy()
        stack[2] = 0.0
        return stack
    return stack[0]


def _run(code: str, model: str, *args: str, extra_env: dict | None = None) -> dict:
    env = dict(os.environ) | (extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"),
                                                      env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", f"MODEL = {model!r}\n" + code, *args],
                          capture_output=True, text=True, env=env, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per mode")
    parser.add_argument("--size", type=int, default=1024, help="frame edge (px)")
    parser.add_argument("--frames", type=int, default=5, help="frames in the burst")
    parser.add_argument("--model", default=MODEL, help=f"zoo id (default {MODEL})")
    parser.add_argument("--thp", action="store_true",
                        help="also every mode with THP_MEM_ALLOC_ENABLE=1")
    args = parser.parse_args(argv)
    ensure_display(Path(__file__))
    sys.path.insert(0, str(REPO / "src"))
    import numpy as np

    thread = {"MICRORESTORE_CPU_PROCESS": "0"}
    envs = [("default", {})] + ([("THP_MEM_ALLOC_ENABLE=1", {"THP_MEM_ALLOC_ENABLE": "1"})]
                                if args.thp else [])
    groups, headline = [], None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.npy"
        data = _input(args.model, args.size, args.frames)
        np.save(path, data)
        for env_name, env in envs:
            plain = _run(_PLAIN, args.model, str(path), str(args.runs), extra_env=env)
            gui = _run(_NAPARI, args.model, str(path), str(args.runs), "widget", extra_env=env)
            gui.update({k: v for k, v in _run(_NAPARI, args.model, str(path), str(args.runs),
                                              "direct", extra_env=env).items()
                        if k.startswith("direct")})
            worker = _run(_NAPARI, args.model, str(path), str(args.runs), "widget",
                          extra_env={**env, **thread})
            one_arena = _run(_NAPARI, args.model, str(path), str(args.runs), "widget",
                             extra_env={**env, **thread, "MALLOC_ARENA_MAX": "1"})
            groups.append((env_name, plain, gui, worker, one_arena))
            headline = headline or (plain, gui, worker, one_arena)

    print(f"Restore widget vs a plain process: {args.model} restore of a "
          f"{'x'.join(map(str, data.shape))} input on the CPU, median of {args.runs} runs "
          f"after a warm-up ({os.cpu_count()} CPUs); ratios to the plain process of the same "
          "group; CPU and page faults include the compute process\n")
    print("| environment | mode | median (s) | min (s) | ratio to plain | process CPU (s) | "
          "page faults | torch threads |")
    print("|---|---|---|---|---|---|---|---|")
    for env_name, plain, gui, worker, one_arena in groups:
        base = statistics.median(plain["times"])
        rows = [("plain process", plain["times"], plain["cpu"], plain["faults"],
                 plain["threads"]),
                ("napari, engine on the GUI thread", gui["direct"], gui["direct_cpu"],
                 gui["direct_faults"], gui["threads_main"]),
                ("napari, Restore widget (compute process): click -> layer", gui["widget"],
                 gui["widget_cpu"], gui["widget_faults"], gui["threads_worker"]),
                ("napari, Restore widget (compute process): scheduler job", gui["job"],
                 None, None, gui["threads_worker"]),
                ("napari, Restore widget (worker thread): click -> layer", worker["widget"],
                 worker["widget_cpu"], worker["widget_faults"], worker["threads_worker"]),
                ("napari, Restore widget (worker thread, MALLOC_ARENA_MAX=1): click -> layer",
                 one_arena["widget"], one_arena["widget_cpu"], one_arena["widget_faults"],
                 one_arena["threads_worker"])]
        for name, times, cpu, faults, threads in rows:
            med = statistics.median(times)
            cpu_s = f"{statistics.median(cpu):.2f}" if cpu else "-"
            faults_s = f"{int(statistics.median(faults))}" if faults else "-"
            print(f"| {env_name} | {name} | {med:.3f} | {min(times):.3f} | {med / base:.2f} | "
                  f"{cpu_s} | {faults_s} | {threads} |")
    plain, gui, worker, one_arena = headline
    assert gui["process_calls"] == args.runs + 1, "the widget did not use the compute process"
    assert worker["process_calls"] == 0, "MICRORESTORE_CPU_PROCESS=0 still used the process"
    base = statistics.median(plain["times"])
    ratio = statistics.median(gui["widget"]) / base
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"\nwidget (compute process) / plain = {ratio:.2f} (target <= {TARGET_RATIO}): "
          f"{verdict}")
    print(f"widget (click -> layer) / engine on napari's GUI thread = "
          f"{statistics.median(gui['widget']) / statistics.median(gui['direct']):.2f}")
    print(f"worker thread instead (MICRORESTORE_CPU_PROCESS=0): widget / plain = "
          f"{statistics.median(worker['widget']) / base:.2f}; with MALLOC_ARENA_MAX=1: "
          f"{statistics.median(one_arena['widget']) / base:.2f}")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
