"""The one scheduler of the napari plugin: threads, cancel, devices, progress and errors.

Widgets describe what to run as a :class:`Task` (a callable of ``core`` / ``engine`` and its
keyword arguments) and hand it to :meth:`Scheduler.submit`; the scheduler runs it off the GUI
thread and calls the widget back *on the GUI thread* with typed updates:

* ``on_update(Progress(fraction, message))`` while it runs, in the order they were reported,
  and any other typed update (a training step's loss, a preview image, one restored frame of
  a stream) that the callable passed to its ``on_update`` callback, as the same object;
* ``on_result(value)`` once, with what the callable returned (never after a cancel);
* ``on_error(exception)`` once if it failed (after the scheduler notified the user);
* ``on_done(job)`` always, last, whatever the outcome (to reset buttons and progress bars).

Threads
-------
Each job is a napari generator worker (:func:`napari.qt.threading.create_worker`), which runs
the callable in a long-lived compute thread (reused from job to job: see
:class:`_ComputeThreads`) and yields the :class:`Progress` updates that the
callable's ``progress`` callback put on a :class:`queue.Queue` (the careamics-napari pattern):
the callable and its callback never touch a Qt object, and napari's worker signals bring each
yielded update to the GUI thread. The generator ends by *returning* a :class:`Result` or a
:class:`Failure`; it never raises, because superqt's generator worker swallows
``RuntimeError`` (and so :class:`~napari_microrestore.core.errors.Cancelled`) without
emitting any signal.

CPU inference in the compute process
------------------------------------
A thread is not a main thread: glibc's per-thread malloc arenas page-fault large activation
tensors afresh in every layer, and sr2x, sstem-restore and tem-single ran ~2x slower in a
worker thread than in ``microrestore restore`` (benchmarks/bench_threads.py). So a task whose
callable restores on the CPU hands the engine call to
:func:`~napari_microrestore.engine.compute_process.offload`, which runs it on the main thread
of a long-lived compute process (progress and cancel cross over; GPU work, a second
concurrent job and ``MICRORESTORE_CPU_PROCESS=0`` stay in the worker thread). The widgets
start that process ahead of time with :func:`prestart_compute_process` when a CPU device is
chosen, so the first run does not wait for it to import torch.

Cancel
------
Every job owns a :class:`~napari_microrestore.core.errors.CancelToken`, passed as ``cancel=`` to
callables that take one; :meth:`Job.cancel` sets it, and the compute stops at its next check
by raising ``Cancelled``. A cancelled job never delivers a result, even if its callable
finished anyway. ``submit(..., group="live")`` cancels the running job of the same group
first: the newest request wins (quietly, without a notification).

Errors
------
:class:`~napari_microrestore.core.errors.InputError` -> one error notification with its
message (one sentence meant for the user); ``Cancelled`` -> a quiet info notification;
anything else -> an error notification with the exception's type and text, and the traceback
in the log (logger ``napari_microrestore._napari.scheduler``).
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional, Union

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info

from ..core.errors import Cancelled, CancelToken, InputError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# typed updates
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """A progress report: ``fraction`` of the job done, in [0, 1], and a short message."""

    fraction: float
    message: str = ""


@dataclass(frozen=True)
class Result:
    """The job's callable returned ``value``."""

    value: Any


@dataclass(frozen=True)
class Failure:
    """The job's callable raised ``error`` (``Cancelled`` when it stopped on its token)."""

    error: BaseException


Outcome = Union[Result, Failure]


# --------------------------------------------------------------------------------------------
# what to run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A request: call ``func(**kwargs)`` off the GUI thread.

    ``func`` is a function of ``core`` or ``engine`` (or any callable without Qt). If its
    signature has ``progress``, ``on_update`` and / or ``cancel`` parameters, the scheduler
    passes its own progress callback (``progress(fraction, message)``), its typed-update
    callback (``on_update(obj)``: ``obj`` reaches the widget's ``on_update`` as is, on the GUI
    thread, in order with the progress reports) and the job's cancel token for them, so the
    same call can be replayed headless with the same ``kwargs``. ``name`` is what
    notifications and the log call it.
    """

    name: str
    func: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, progress: Callable[[float, str], None], cancel: CancelToken,
                 on_update: Optional[Callable[[Any], None]] = None) -> Any:
        """Run the task in the calling thread (the scheduler calls it in a worker thread)."""
        try:
            params = inspect.signature(self.func).parameters
        except (TypeError, ValueError):  # builtins without a signature
            params = {}
        extra: dict[str, Any] = {}
        if "progress" in params:
            extra["progress"] = progress
        if "cancel" in params:
            extra["cancel"] = cancel
        if "on_update" in params and on_update is not None:
            extra["on_update"] = on_update
        return self.func(**self.kwargs, **extra)

    def describe(self) -> str:
        """``module.func(key=value, ...)`` with arrays shown by dtype and shape (for logs)."""

        def short(v: Any) -> str:
            if isinstance(v, np.ndarray) or (hasattr(v, "shape") and hasattr(v, "dtype")):
                return f"<{v.dtype} array {tuple(v.shape)}>"
            text = repr(v)
            return text if len(text) <= 80 else text[:77] + "..."

        fn = f"{getattr(self.func, '__module__', '?')}.{getattr(self.func, '__qualname__', '?')}"
        args = ", ".join(f"{k}={short(v)}" for k, v in self.kwargs.items())
        return f"{fn}({args})"


class Job:
    """A submitted :class:`Task`: its cancel token, state and running time.

    ``state`` is ``"running"`` until the worker ends, then ``"done"`` (result delivered),
    ``"failed"`` or ``"cancelled"``. Jobs are made by :meth:`Scheduler.submit` only.
    """

    def __init__(self, task: Task, group: Optional[str]) -> None:
        self.task = task
        self.group = group
        self.token = CancelToken()
        self.state = "running"
        self.seconds: Optional[float] = None   # wall-clock time from submit to the end
        self.quiet = False                      # cancelled without a notification
        self._t0 = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.state != "running"

    @property
    def cancel_requested(self) -> bool:
        return self.token.cancelled

    def cancel(self, *, quiet: bool = False) -> None:
        """Ask the job to stop: its callable raises ``Cancelled`` at its next check.

        No result is delivered after this. ``quiet`` suppresses the "cancelled" notification
        (used when a newer request of the same group replaces this one).
        """
        if self.done or self.token.cancelled:
            return
        self.quiet = quiet
        self.token.cancel()

    def __repr__(self) -> str:
        return f"Job({self.task.name!r}, state={self.state!r}, group={self.group!r})"


_END = object()  # the compute thread's last item on the update queue


def _run(task: Task, cancel: CancelToken) -> Generator[Any, None, Outcome]:
    """The worker's generator: run ``task`` in a helper thread, yield its progress reports and
    typed updates (in order) as they arrive, and return its outcome. Never raises (see the
    module notes)."""
    updates: queue.Queue = queue.Queue()
    outcome: list[Outcome] = []

    def progress(fraction: float, message: str = "") -> None:
        updates.put(Progress(float(fraction), str(message)))

    def compute() -> None:
        try:
            cancel.raise_if_cancelled()  # cancelled while it waited for a pool thread
            outcome.append(Result(task(progress, cancel, updates.put)))
        except Exception as exc:  # every failure is handed to the GUI thread
            outcome.append(Failure(exc))

    _COMPUTE_THREADS.run(compute, f"microrestore: {task.name}", then=lambda: updates.put(_END))
    while (item := updates.get()) is not _END:
        yield item
    return outcome[0] if outcome else Failure(Cancelled("the computation thread was stopped"))


class _ComputeThreads:
    """Long-lived daemon threads that run the jobs' computations, reused from job to job.

    A warm thread keeps its glibc malloc arena and OpenMP thread team from job to job. (Any
    thread but the main one allocates from an arena of 64 MB heaps, which is why CPU restores
    go on to the compute process: see the module notes, ``engine.restore.cpu_heap`` and
    benchmarks/bench_worker.py.) An idle thread is
    reused; a new one starts only when all are busy, so concurrent jobs never wait for each
    other. Threads are daemons: a computation left running never keeps the interpreter from
    exiting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue] = []

    def run(self, fn: Callable[[], None], name: str, then: Callable[[], None]) -> None:
        """Call ``fn()`` in an idle thread (named ``name`` while it runs) or a new one, then
        ``then()`` once that thread is idle again (so a job submitted after it reuses it)."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), daemon=True,
                             name="microrestore: idle").start()
        inbox.put((fn, name, then))

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        me = threading.current_thread()
        while True:
            fn, me.name, then = inbox.get()
            try:
                fn()  # never raises: compute() catches everything
            finally:
                me.name = "microrestore: idle"
                with self._lock:
                    self._idle.append(inbox)
                then()


_COMPUTE_THREADS = _ComputeThreads()


# --------------------------------------------------------------------------------------------
# the scheduler
# --------------------------------------------------------------------------------------------
class Scheduler:
    """Runs :class:`Task` s in napari thread workers; the one place for threads, cancel,
    progress and error reporting of the plugin (see the module docstring)."""

    def __init__(self) -> None:
        self._running: dict[Job, Any] = {}          # job -> its worker, while it runs
        self._groups: dict[str, Job] = {}

    @property
    def jobs(self) -> list[Job]:
        """The jobs that have not ended yet, oldest first."""
        return list(self._running)

    def submit(self, task: Task,
               on_update: Optional[Callable[[Any], None]] = None,
               on_result: Optional[Callable[[Any], None]] = None,
               on_error: Optional[Callable[[BaseException], None]] = None, *,
               on_done: Optional[Callable[[Job], None]] = None,
               group: Optional[str] = None) -> Job:
        """Start ``task`` in a worker thread and return its :class:`Job` at once.

        The callbacks run on the GUI thread (see the module docstring for when). With
        ``group``, a still running job of the same group is cancelled quietly first.
        """
        if group is not None:
            previous = self._groups.get(group)
            if previous is not None:
                previous.cancel(quiet=True)
        job = Job(task, group)

        def run(task: Task, cancel: CancelToken) -> Generator[Any, None, Outcome]:
            return (yield from _run(task, cancel))

        # napari's activity dock names a worker after its function: show the task's name
        run.__name__ = run.__qualname__ = task.name
        worker = create_worker(run, task, job.token, _ignore_errors=True)
        outcome: list[Outcome] = []
        worker.yielded.connect(partial(self._on_yielded, job, on_update))
        worker.returned.connect(outcome.append)
        # only a bug in _run itself can get here: it catches everything the task raises
        worker.errored.connect(lambda exc: outcome.append(Failure(exc)))
        # napari's activity dock can abort the worker (worker.quit): stop the compute too
        worker.aborted.connect(job.token.cancel)
        worker.finished.connect(
            lambda: self._finish(job, outcome[0] if outcome else None, on_result, on_error,
                                 on_done))
        self._running[job] = worker
        if group is not None:
            self._groups[group] = job
        worker.start()
        return job

    def cancel_all(self) -> None:
        """Cancel every running job (quietly), e.g. when the viewer closes."""
        for job in self.jobs:
            job.cancel(quiet=True)

    # ---- GUI-thread side -----------------------------------------------------------------
    @staticmethod
    def _on_yielded(job: Job, on_update: Optional[Callable[[Any], None]],
                    update: Any) -> None:
        if on_update is not None and not job.token.cancelled:
            on_update(update)

    def _finish(self, job: Job, outcome: Optional[Outcome],
                on_result: Optional[Callable[[Any], None]],
                on_error: Optional[Callable[[BaseException], None]],
                on_done: Optional[Callable[[Job], None]]) -> None:
        self._running.pop(job, None)
        if job.group is not None and self._groups.get(job.group) is job:
            del self._groups[job.group]
        job.seconds = time.perf_counter() - job._t0
        try:
            if job.token.cancelled or outcome is None or (
                    isinstance(outcome, Failure) and isinstance(outcome.error, Cancelled)):
                job.state = "cancelled"
                if isinstance(outcome, Failure) and not isinstance(outcome.error, Cancelled):
                    log.debug("%s failed after it was cancelled", job.task.name,
                              exc_info=_exc_info(outcome.error))
                if not job.quiet:
                    show_info(f"{job.task.name}: cancelled")
            elif isinstance(outcome, Result):
                job.state = "done"
                if on_result is not None:
                    try:
                        on_result(outcome.value)
                    except Exception as exc:  # showing the result failed: report like a failure
                        job.state = "failed"
                        self._report(job, exc, on_error)
            else:
                job.state = "failed"
                self._report(job, outcome.error, on_error)
        finally:
            if on_done is not None:
                on_done(job)

    @staticmethod
    def _report(job: Job, exc: BaseException,
                on_error: Optional[Callable[[BaseException], None]]) -> None:
        if isinstance(exc, InputError):
            show_error(str(exc))
        else:
            log.error("%s failed: %s", job.task.name, job.task.describe(),
                      exc_info=_exc_info(exc))
            show_error(f"{job.task.name} failed: {type(exc).__name__}: {exc}")
        if on_error is not None:
            on_error(exc)


def _exc_info(exc: BaseException) -> tuple:
    return type(exc), exc, exc.__traceback__


_DEFAULT: Optional[Scheduler] = None


def get_scheduler() -> Scheduler:
    """The plugin's shared scheduler (made on first use), so that every widget's jobs and
    groups live in one place."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Scheduler()
    return _DEFAULT


def prestart_compute_process(device: str, devices: Optional[list[str]] = None) -> bool:
    """Start the compute process in the background if ``device`` will compute on the CPU
    (``cpu``, or ``auto`` when ``devices``, the listed choices, has no GPU). Returns whether it
    was asked to start; never blocks and never imports torch (GUI-thread safe)."""
    from ..engine import compute_process

    gpus = [d for d in (devices or []) if d.startswith(("cuda", "mps"))]
    on_cpu = device == "cpu" or (device == "auto" and devices is not None and not gpus)
    if on_cpu and compute_process.enabled():
        compute_process.prestart()
        return True
    return False


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------
def available_devices() -> list[str]:
    """Device choices for the engine: ``auto``, ``cpu``, then ``cuda:N`` for every CUDA device
    and ``mps`` where Apple's backend is available.

    Imports torch, so call it through the scheduler (``Task("list devices",
    available_devices)``), not on the GUI thread.
    """
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices
