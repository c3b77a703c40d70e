"""The scheduler on its own (qtbot, no viewer): ordered progress on the GUI thread, cancel,
errors as notifications, newest-request-wins groups, and a responsive event loop."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import NotificationSeverity  # noqa: E402
from qtpy.QtCore import QTimer  # noqa: E402

from napari_microrestore._napari.scheduler import (  # noqa: E402
    Progress,
    Scheduler,
    Task,
    available_devices,
)
from napari_microrestore.core.errors import InputError, check_cancel, report  # noqa: E402

pytestmark = pytest.mark.gui


class Calls:
    """Records callbacks with the thread they ran on."""

    def __init__(self) -> None:
        self.updates: list[Progress] = []
        self.results: list = []
        self.errors: list[BaseException] = []
        self.done: list = []
        self.threads: set[bool] = set()

    def _main(self) -> None:
        self.threads.add(threading.current_thread() is threading.main_thread())

    def on_update(self, u: Progress) -> None:
        self._main()
        self.updates.append(u)

    def on_result(self, v) -> None:
        self._main()
        self.results.append(v)

    def on_error(self, e) -> None:
        self._main()
        self.errors.append(e)

    def on_done(self, job) -> None:
        self._main()
        self.done.append(job.state)

    def submit(self, scheduler: Scheduler, task: Task, **kw):
        return scheduler.submit(task, self.on_update, self.on_result, self.on_error,
                                on_done=self.on_done, **kw)


def counting(n: int, *, progress=None, cancel=None, pause: float = 0.0, log=None) -> int:
    """Reports progress k/n for k = 1..n, honouring the cancel token; returns the sum."""
    total = k = 0
    try:
        for k in range(1, n + 1):
            check_cancel(cancel)
            time.sleep(pause)
            total += k
            report(progress, k / n, f"step {k}")
    finally:
        if log is not None:
            log.append("stopped" if k < n else "finished")
    return total


def test_progress_arrives_in_order_on_the_gui_thread(qtbot, notes):
    calls = Calls()
    job = calls.submit(Scheduler(), Task("count", counting, {"n": 50}))
    qtbot.waitUntil(lambda: job.done, timeout=5000)
    assert job.state == "done" and calls.done == ["done"]
    assert calls.results == [sum(range(51))]
    fractions = [u.fraction for u in calls.updates]
    assert fractions == [k / 50 for k in range(1, 51)]
    assert [u.message for u in calls.updates][-1] == "step 50"
    assert calls.threads == {True}          # every callback ran on the GUI thread
    assert not calls.errors and not notes
    assert job.seconds is not None and job.seconds > 0


def test_task_passes_progress_and_cancel_only_to_functions_that_take_them(qtbot):
    def add(a, b):
        return a + b

    calls = Calls()
    job = calls.submit(Scheduler(), Task("add", add, {"a": 2, "b": 3}))
    qtbot.waitUntil(lambda: job.done, timeout=5000)
    assert calls.results == [5] and calls.updates == []
    assert "add(a=2, b=3)" in Task("add", add, {"a": 2, "b": 3}).describe()
    assert "<float32 array (4, 5)>" in Task("x", add, {"a": np.zeros((4, 5), np.float32)}
                                            ).describe()


def test_cancel_mid_run_stops_the_compute_and_delivers_no_result(qtbot, notes):
    calls, log = Calls(), []
    scheduler = Scheduler()
    job = calls.submit(scheduler, Task("slow count", counting,
                                       {"n": 500, "pause": 0.01, "log": log}))
    qtbot.waitUntil(lambda: len(calls.updates) >= 3, timeout=5000)
    job.cancel()
    qtbot.waitUntil(lambda: job.done, timeout=5000)
    assert job.state == "cancelled" and calls.done == ["cancelled"]
    assert log == ["stopped"]               # the engine raised Cancelled, it did not finish
    assert calls.results == [] and calls.errors == []
    assert calls.updates[-1].fraction < 1.0
    assert notes == [(NotificationSeverity.INFO, "slow count: cancelled")]
    assert scheduler.jobs == []


def test_a_result_finished_after_cancel_is_dropped(qtbot, notes):
    """A callable that ignores the token still never delivers after cancel()."""
    gate = threading.Event()

    def stubborn():
        gate.wait(5)
        return 42

    calls = Calls()
    job = calls.submit(Scheduler(), Task("stubborn", stubborn))
    job.cancel()
    gate.set()
    qtbot.waitUntil(lambda: job.done, timeout=5000)
    assert job.state == "cancelled" and calls.results == []


def test_input_error_gives_one_clear_notification(qtbot, notes):
    def bad(image):
        raise InputError(f"a burst must be 3-D (T, Y, X); got shape {image.shape}")

    calls = Calls()
    job = calls.submit(Scheduler(), Task("Restore x", bad, {"image": np.zeros((8, 8))}))
    qtbot.waitUntil(lambda: job.done, timeout=5000)
    assert job.state == "failed" and calls.done == ["failed"]
    message = "a burst must be 3-D (T, Y, X); got shape (8, 8)"
    assert notes == [(NotificationSeverity.ERROR, message)]
    assert len(calls.errors) == 1 and isinstance(calls.errors[0], InputError)
    assert calls.results == []


def test_unexpected_error_is_notified_with_its_text_and_logged_with_traceback(qtbot, notes,
                                                                               caplog):
    def broken():
        return {}["missing"]

    calls = Calls()
    with caplog.at_level(logging.ERROR, logger="napari_microrestore._napari.scheduler"):
        job = calls.submit(Scheduler(), Task("Broken", broken))
        qtbot.waitUntil(lambda: job.done, timeout=5000)
    assert job.state == "failed"
    assert len(notes) == 1 and notes[0][0] == NotificationSeverity.ERROR
    assert "Broken failed" in notes[0][1] and "KeyError" in notes[0][1] and "missing" in notes[0][1]
    records = [r for r in caplog.records if r.exc_info]
    assert records and records[0].exc_info[0] is KeyError


def test_newest_request_of_a_group_wins(qtbot, notes):
    scheduler = Scheduler()
    old, new, log = Calls(), Calls(), []
    first = old.submit(scheduler, Task("live 1", counting, {"n": 500, "pause": 0.01, "log": log}),
                       group="live")
    qtbot.waitUntil(lambda: len(old.updates) >= 1, timeout=5000)
    second = new.submit(scheduler, Task("live 2", counting, {"n": 5}), group="live")
    assert first.cancel_requested and not second.cancel_requested
    qtbot.waitUntil(lambda: first.done and second.done, timeout=5000)
    assert first.state == "cancelled" and old.results == [] and log == ["stopped"]
    assert second.state == "done" and new.results == [15]
    assert notes == []                      # replaced quietly
    # a job of another group (or of none) is left alone
    a = Calls().submit(scheduler, Task("a", counting, {"n": 200, "pause": 0.005}), group="x")
    b = Calls().submit(scheduler, Task("b", counting, {"n": 2}))
    qtbot.waitUntil(lambda: a.done and b.done, timeout=5000)
    assert a.state == "done" and b.state == "done"


def test_cancel_all_stops_every_job_quietly(qtbot, notes):
    scheduler, logs = Scheduler(), [[], []]
    jobs = [Calls().submit(scheduler, Task(f"slow {i}", counting,
                                           {"n": 500, "pause": 0.01, "log": logs[i]}))
            for i in range(2)]
    assert scheduler.jobs == jobs
    scheduler.cancel_all()
    qtbot.waitUntil(lambda: all(j.done for j in jobs), timeout=5000)
    assert [j.state for j in jobs] == ["cancelled", "cancelled"] and scheduler.jobs == []
    # each compute stopped on its token, or never started (cancelled before it got a thread)
    assert all(log in ([], ["stopped"]) for log in logs) and notes == []


def test_aborting_the_worker_cancels_the_compute(qtbot, notes):
    """napari's activity dock stops a worker with worker.quit(): the job ends cancelled."""
    scheduler, calls, log = Scheduler(), Calls(), []
    job = calls.submit(scheduler, Task("slow", counting, {"n": 500, "pause": 0.01, "log": log}))
    qtbot.waitUntil(lambda: len(calls.updates) >= 2, timeout=5000)
    scheduler._running[job].quit()
    qtbot.waitUntil(lambda: job.done, timeout=5000)
    assert job.state == "cancelled" and calls.results == []
    qtbot.waitUntil(lambda: log == ["stopped"], timeout=5000)


def test_gui_event_loop_keeps_running_during_a_job(qtbot):
    def busy(*, progress=None, cancel=None):
        rng = np.random.default_rng(0)
        img = rng.random((256, 256))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.5:
            check_cancel(cancel)
            img = np.abs(np.fft.ifft2(np.fft.fft2(img)))
            report(progress, (time.perf_counter() - t0) / 1.5, "busy")
        return float(img.mean())

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    calls = Calls()
    job = calls.submit(Scheduler(), Task("busy", busy))
    qtbot.waitUntil(lambda: job.done, timeout=10000)
    timer.stop()
    assert job.state == "done" and len(calls.results) == 1
    gaps = np.diff(ticks)
    assert len(ticks) > 40
    assert gaps.max() < 0.1, f"the event loop stalled for {gaps.max() * 1000:.0f} ms"


def test_available_devices_lists_what_exists():
    torch = pytest.importorskip("torch")
    devices = available_devices()
    assert devices[:2] == ["auto", "cpu"]
    assert ("cuda:0" in devices) == torch.cuda.is_available()
    assert len([d for d in devices if d.startswith("cuda:")]) == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _sends_typed_updates(n: int, on_update=None, progress=None) -> int:
    for i in range(n):
        on_update({"step": i})
        progress((i + 1) / n, f"step {i}")
    return n


def test_typed_updates_reach_on_update_in_order(qtbot):
    from napari_microrestore._napari.scheduler import Progress, Scheduler, Task

    sched = Scheduler()
    seen, results = [], []
    job = sched.submit(Task("typed", _sends_typed_updates, {"n": 3}), on_update=seen.append,
                       on_result=results.append)
    qtbot.waitUntil(lambda: job.done, timeout=10000)
    assert results == [3]
    assert [type(u).__name__ for u in seen] == ["dict", "Progress"] * 3
    assert [u["step"] for u in seen if isinstance(u, dict)] == [0, 1, 2]
    assert seen[-1] == Progress(1.0, "step 2")


def _thread_ident() -> tuple:
    import threading

    return threading.get_ident(), threading.current_thread().name


def test_compute_threads_are_reused_and_named_after_the_task(qtbot):
    import threading

    from napari_microrestore._napari.scheduler import Scheduler, Task

    sched = Scheduler()
    seen = []
    for name in ("first", "second"):
        job = sched.submit(Task(name, _thread_ident), on_result=seen.append)
        qtbot.waitUntil(lambda: job.done, timeout=10000)
    (id1, name1), (id2, name2) = seen
    assert id1 == id2 != threading.get_ident()      # one warm thread, not the GUI thread
    assert (name1, name2) == ("microrestore: first", "microrestore: second")
