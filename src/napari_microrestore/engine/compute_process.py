"""CPU inference in a long-lived compute process whose *main* thread computes.

Why: in any thread but a process's main one, glibc serves allocations from an arena of 64 MB
heaps and ``mmap``-s every block above that, so a network whose activations exceed 64 MB is
page-faulted and zeroed again in every layer (see :func:`napari_microrestore.engine.restore.
cpu_heap`): measured with ``benchmarks/bench_threads.py``, sr2x, sstem-restore and tem-single
ran 1.75-2.04x slower in a worker thread than on a main thread; small inputs also pay a cost
that follows torch's OpenMP threads. napari runs the plugin's compute in worker threads (its
GUI thread must never block), so a restore started from the Restore widget on the CPU is sent
to this process instead, where it runs on the main thread of a plain Python process, as
``microrestore restore`` would.

How: :class:`ComputeProcess` starts ``python -m napari_microrestore.engine.compute_process``
(a fresh interpreter, never a fork of the GUI process) and talks to it over a
:mod:`multiprocessing.connection` (a Unix socket or a Windows named pipe, authenticated with a
random key given on the child's stdin). Arrays travel as out-of-band pickle buffers (one copy
into the socket, one out of it; no pickling of the pixels). The function and its keyword
arguments must pickle: functions go by reference, so only module-level functions qualify.
The child calls ``func(**kwargs, progress=..., cancel=...)`` (the ones its signature takes);
progress reports come back as they happen and a cancel travels the other way, checked by
the child at the same points as a thread's token (``raise_if_cancelled``). Exceptions come
back with the child's traceback as their ``__cause__``.

:func:`offload` is what the scheduler's tasks call (and the engine's loops that restore window
after window): it uses the process when it is called from a thread other than the main one,
the call runs on the CPU, the function can be sent and the process is free, else it runs the
call right here (the CLI and scripts on their main thread, GPU work, a second concurrent job,
a monkeypatched function, ``MICRORESTORE_CPU_PROCESS=0``, or a process that could not
start). One process serves one call at a time; a call that a
newer request cancelled is waited for, so the newest live request does not fall back to the
slow path while the previous one unwinds.

No Qt here: the napari scheduler and the tests drive it the same way.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Optional

import numpy as np

from ..core.errors import Cancelled, CancelToken, ProgressCallback

log = logging.getLogger(__name__)

ENV = "MICRORESTORE_CPU_PROCESS"  # "0" / "off" / "no" / "false": compute in the calling thread


class ProcessUnavailable(RuntimeError):
    """The compute process could not be started (or was closed); run the call elsewhere."""


class ProcessDied(RuntimeError):
    """The compute process ended while it ran a call (killed, out of memory, crashed)."""


class NotSendable(TypeError):
    """The call's function, arguments or result do not pickle; nothing was sent."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in the compute process (its ``__cause__``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


# --------------------------------------------------------------------------------------------
# messages: pickle protocol 5 with the arrays' buffers sent out of band
# --------------------------------------------------------------------------------------------
def send(conn: Connection, obj: Any) -> None:
    """Send ``obj``: a pickled header, then each contiguous buffer (numpy arrays) raw."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        payload = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
    except Exception as exc:  # nothing has been written yet
        raise NotSendable(f"cannot be sent to the compute process: {exc}") from exc
    conn.send_bytes(pickle.dumps((payload, [r.nbytes for r in raws]), protocol=5))
    for raw in raws:
        conn.send_bytes(raw)


def recv(conn: Connection) -> Any:
    """Receive what :func:`send` sent; arrays land in fresh writable memory (one copy)."""
    payload, sizes = pickle.loads(conn.recv_bytes())
    buffers = []
    for size in sizes:
        buf = np.empty(size, dtype=np.uint8)
        if size:
            conn.recv_bytes_into(buf)
        else:
            conn.recv_bytes()
        buffers.append(buf)
    return pickle.loads(payload, buffers=buffers)


def _sendable(func: Callable) -> bool:
    """A function pickles by reference only if importing its module gives it back."""
    try:
        pickle.dumps(func, protocol=5)
    except Exception:  # local functions, lambdas, monkeypatched stand-ins
        return False
    return True


def _wanted(func: Callable, **candidates: Any) -> dict:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in candidates.items() if k in params and v is not None}


# --------------------------------------------------------------------------------------------
# the parent's side
# --------------------------------------------------------------------------------------------
class ComputeProcess:
    """One long-lived compute process (see the module docstring).

    :meth:`start` returns at once (the child imports torch in the background, ~1-3 s);
    :meth:`call` waits for it to be ready, runs one call and returns its value or raises its
    exception. Thread-safe: concurrent callers are served one at a time (see :meth:`try_call`
    for the non-waiting form).
    """

    #: starts that failed (the child did not get ready) before giving up for this session
    MAX_START_FAILURES = 2

    def __init__(self, startup_timeout: float = 120.0, python: Optional[str] = None) -> None:
        self.startup_timeout = float(startup_timeout)
        self.python = python or sys.executable
        self.start_failures = 0
        self._lock = threading.Lock()          # held by the one running call
        self._state_lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._conn: Optional[Connection] = None
        self._ready = threading.Event()
        self._failed: Optional[str] = None
        self._calls = 0
        self._current_cancelled = False
        self.pid: Optional[int] = None

    # ---- life ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._failed is None

    def start(self) -> None:
        """Start the child if none is running (returns at once)."""
        with self._state_lock:
            if self.running:
                return
            if self.start_failures >= self.MAX_START_FAILURES:
                if self._proc is not None or not (self._failed or "").endswith("session)"):
                    self._failed = (f"{self._failed or 'the compute process did not start'} "
                                    f"({self.start_failures} tries; not tried again in this "
                                    "session)")
                    self._proc = None
                self._ready.set()
                return
            self._stop_locked()
            ready = self._ready = threading.Event()  # this start's own (older threads may
            self._failed = None                        # still set theirs)
            key = os.urandom(32)
            listener = Listener(authkey=key)
            cmd = [self.python, "-m", "napari_microrestore.engine.compute_process",
                   str(listener.address)]
            kwargs: dict[str, Any] = {"stdin": subprocess.PIPE}
            if os.name == "posix":
                kwargs["start_new_session"] = True  # a Ctrl+C in the terminal is the GUI's
            else:  # pragma: no cover - Windows
                kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
            try:
                proc = subprocess.Popen(cmd, **kwargs)
                proc.stdin.write(key)
                proc.stdin.close()
            except OSError as exc:
                listener.close()
                self.start_failures += 1
                self._failed = f"could not start {self.python}: {exc}"
                ready.set()
                return
            self._proc = proc
            threading.Thread(target=self._accept, args=(listener, proc, ready), daemon=True,
                             name="microrestore: compute process start").start()
            threading.Thread(target=self._watch_start, args=(listener, proc, key, ready),
                             daemon=True,
                             name="microrestore: compute process watch").start()

    def _accept(self, listener: Listener, proc: subprocess.Popen,
                ready: threading.Event) -> None:
        try:
            conn = listener.accept()
            kind, pid = recv(conn)
            if kind != "ready":
                raise RuntimeError(f"unexpected first message {kind!r}")
            # functions travel by reference: let the child import what this process can
            send(conn, ("path", list(sys.path)))
        except Exception as exc:
            self._fail(proc, f"the compute process did not start: {exc}")
        else:
            if self._proc is proc:
                self._conn, self.pid = conn, int(pid)
                log.info("compute process %d ready", pid)
            else:
                conn.close()
        finally:
            listener.close()
            ready.set()

    def _watch_start(self, listener: Listener, proc: subprocess.Popen, key: bytes,
                     ready: threading.Event) -> None:
        """End a start that cannot finish: the child exited or took too long to connect."""
        t0 = time.monotonic()
        while not ready.wait(0.1):
            code = proc.poll()
            late = time.monotonic() - t0 > self.startup_timeout
            if code is not None or late:
                self._fail(proc, f"the compute process exited with code {code} before it "
                                 "was ready" if code is not None else
                                 f"the compute process was not ready after "
                                 f"{self.startup_timeout:.0f} s")
                if late:
                    proc.kill()
                try:  # unblock accept() (closing the socket would not, on Linux)
                    with Client(listener.address, authkey=key) as conn:
                        send(conn, ("failed", 0))
                except (OSError, EOFError, ValueError):
                    pass  # accept() has returned already
                ready.set()
                return

    def _fail(self, proc: subprocess.Popen, message: str) -> None:
        """Record that the start of ``proc`` failed (once per start)."""
        with self._state_lock:
            if self._proc is proc and self._failed is None:
                self._failed = message
                self.start_failures += 1

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Start if needed and wait until the child is ready; False if it failed."""
        self.start()
        self._ready.wait(self.startup_timeout if timeout is None else timeout)
        return self._conn is not None and self._failed is None

    def close(self, timeout: float = 2.0) -> None:
        """Ask the child to exit (killed after ``timeout`` seconds)."""
        with self._state_lock:
            self._stop_locked(timeout)

    def _stop_locked(self, timeout: float = 2.0) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self.pid = None
        if conn is not None:
            try:
                send(conn, ("exit",))
            except (OSError, ValueError):
                pass
            conn.close()
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ---- calls ---------------------------------------------------------------------------
    @property
    def calls(self) -> int:
        """How many calls were sent to a child (over its restarts)."""
        return self._calls

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def call(self, func: Callable, kwargs: dict, *, progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None) -> Any:
        """Run ``func(**kwargs)`` in the child (waiting for a running call to end first)."""
        with self._lock:
            return self._call_locked(func, kwargs, progress, cancel)

    def try_call(self, func: Callable, kwargs: dict, *,
                 progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, wait: float = 0.0) -> tuple[bool, Any]:
        """Like :meth:`call` if the process is free (or frees up within ``wait`` seconds);
        ``(False, None)`` if not, without running anything."""
        got = self._lock.acquire(timeout=wait) if wait > 0 else self._lock.acquire(False)
        if not got:
            return False, None
        try:
            return True, self._call_locked(func, kwargs, progress, cancel)
        finally:
            self._lock.release()

    def _call_locked(self, func, kwargs, progress, cancel) -> Any:
        if not self._conn_ready(progress):
            raise ProcessUnavailable(self._failed or "the compute process is not running")
        conn, proc = self._conn, self._proc
        self._calls += 1
        call_id = self._calls
        self._current_cancelled = False
        try:
            send(conn, ("call", call_id, func, kwargs, progress is not None,
                        cancel is not None))
        except NotSendable:
            raise
        except (OSError, ValueError) as exc:
            self._mark_dead()
            raise ProcessUnavailable(f"the compute process is gone ({exc})") from exc
        sent_cancel = False
        while True:
            if cancel is not None and cancel.cancelled and not sent_cancel:
                self._current_cancelled = sent_cancel = True
                try:
                    send(conn, ("cancel", call_id))
                except (OSError, ValueError):
                    pass  # it died: recv below says so
            try:
                if not conn.poll(0.05):
                    continue
                msg = recv(conn)
            except (EOFError, OSError) as exc:
                code = self._mark_dead(proc)
                raise ProcessDied(_died_message(func, code)) from exc
            kind, got_id = msg[0], msg[1]
            if got_id != call_id:
                continue  # never expected: a reply to an earlier call
            if kind == "progress":
                if progress is not None and not sent_cancel:
                    progress(msg[2], msg[3])
            elif kind == "result":
                return msg[2]
            elif kind == "error":
                exc, text = msg[2], msg[3]
                exc.__cause__ = RemoteTraceback(text)
                raise exc

    def _conn_ready(self, progress: Optional[ProgressCallback]) -> bool:
        if self._conn is not None and self.running:
            return True
        self.start()
        if not self._ready.is_set() and progress is not None:
            progress(0.0, "starting the compute process")
        self._ready.wait(self.startup_timeout)
        return self._conn is not None and self._failed is None and self.running

    def _mark_dead(self, proc: Optional[subprocess.Popen] = None) -> Optional[int]:
        proc = proc or self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        with self._state_lock:
            if self._proc is proc:
                if self._conn is not None:
                    self._conn.close()
                self._proc = self._conn = None
                self.pid = None
        return code

    @property
    def current_call_cancelled(self) -> bool:
        """The running call (if any) has been asked to stop."""
        return self.busy and self._current_cancelled


def _died_message(func: Callable, code: Optional[int]) -> str:
    how = f"exit code {code}"
    if code is not None and code < 0:
        how = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    return (f"the compute process ended while it ran {getattr(func, '__qualname__', func)} "
            f"({how}); nothing was changed, and the next run starts a new one")


# --------------------------------------------------------------------------------------------
# the shared process and the decision
# --------------------------------------------------------------------------------------------
_SHARED: Optional[ComputeProcess] = None
_SHARED_LOCK = threading.Lock()


def enabled() -> bool:
    """``MICRORESTORE_CPU_PROCESS`` is not set to 0 / off / no / false."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "no", "false")


def shared() -> ComputeProcess:
    """The plugin's compute process object (the child starts on first use or prestart)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = ComputeProcess()
            atexit.register(_SHARED.close)
        return _SHARED


def _copy_budget() -> float:
    """The most input bytes worth copying to the compute process: a quarter of the memory
    available now (``/proc/meminfo``; 2 GB where that cannot be read). The child holds a
    copy while it computes, so a stack near the memory limit stays in this process."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 4
    except (OSError, ValueError, IndexError):
        pass
    return 2e9


def prestart() -> None:
    """Start the shared compute process now (returns at once), so that the first CPU restore
    does not wait for it to import torch. Does nothing when it is switched off."""
    if enabled():
        shared().start()


def offload(func: Callable, /, *, device: str = "auto",
            progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None, **kwargs: Any) -> Any:
    """``func(device=device, **kwargs, progress=..., cancel=...)``, in the compute process when
    called off the main thread for the CPU (see the module docstring for when it runs here
    instead). ``func`` takes ``device`` (and ``model``, a card, where it has one)."""
    extra = _wanted(func, progress=progress, cancel=cancel)
    here = lambda: func(device=device, **kwargs, **extra)  # noqa: E731
    if (threading.current_thread() is threading.main_thread() or not enabled()
            or not _sendable(func)):
        return here()  # a main thread (the CLI, a script) is already the fast place
    payload = sum(v.nbytes for v in kwargs.values() if isinstance(v, np.ndarray))
    if payload > _copy_budget():
        log.info("computing in this thread: %.1f GB of input would be copied to the compute "
                 "process", payload / 1e9)
        return here()
    from .restore import resolve_device

    card = kwargs.get("model")
    if not getattr(card, "is_classical", False) and resolve_device(device) != "cpu":
        return here()  # GPUs: a worker thread does not slow them down
    proc = shared()
    # a call that a newer request cancelled ends at its next check: wait for it, do not fall
    # back to the slow path for the newest live request
    wait = 10.0 if proc.current_call_cancelled else 0.0
    try:
        ran, value = proc.try_call(func, {"device": device, **kwargs}, progress=progress,
                                   cancel=cancel, wait=wait)
    except ProcessUnavailable as exc:
        log.warning("computing in this thread: %s", exc)
        return here()
    except NotSendable as exc:
        log.debug("computing in this thread: %s", exc)
        return here()
    if not ran:
        log.debug("compute process busy: %s runs in this thread", func.__qualname__)
        return here()
    return value


# --------------------------------------------------------------------------------------------
# the child's side
# --------------------------------------------------------------------------------------------
class _RemoteCancel(CancelToken):
    """The child's token for one call: set by a ``("cancel", call_id)`` message (or the
    parent going away), read from the connection whenever the compute checks it."""

    def __init__(self, conn: Connection, call_id: int, lock: threading.Lock) -> None:
        super().__init__()
        self._conn, self._id, self._lock = conn, call_id, lock
        self.parent_gone = False

    def _poll(self) -> None:
        if self._event.is_set():
            return
        with self._lock:
            try:
                while self._conn.poll():
                    msg = recv(self._conn)
                    if msg[0] == "cancel" and msg[1] == self._id:
                        self._event.set()
                    elif msg[0] == "exit":
                        self.parent_gone = True
                        self._event.set()
            except (EOFError, OSError):
                self.parent_gone = True
                self._event.set()

    @property
    def cancelled(self) -> bool:
        self._poll()
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        self._poll()
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def _serve(conn: Connection) -> None:
    send_lock, recv_lock = threading.Lock(), threading.Lock()

    def reply(*msg: Any) -> None:
        with send_lock:
            send(conn, msg)

    while True:
        try:
            with recv_lock:
                msg = recv(conn)
        except (EOFError, OSError):
            return  # the parent went away
        if msg[0] == "exit":
            return
        if msg[0] == "path":
            sys.path.extend(p for p in msg[1] if p not in sys.path)
            continue
        if msg[0] != "call":
            continue  # a cancel for a call that has already ended
        _, call_id, func, kwargs, wants_progress, wants_cancel = msg
        token = _RemoteCancel(conn, call_id, recv_lock)

        def progress(fraction: float, message: str = "", _id: int = call_id) -> None:
            reply("progress", _id, float(fraction), str(message))

        extra = _wanted(func, progress=progress if wants_progress else None,
                        cancel=token if wants_cancel else None)
        try:
            value = func(**kwargs, **extra)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            text = traceback.format_exc()
            try:  # the parent must be able to rebuild it (cv2.error, C extension errors...)
                pickle.loads(pickle.dumps(exc, protocol=5))
            except Exception:
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            reply("error", call_id, exc, text)
            if isinstance(exc, KeyboardInterrupt) or token.parent_gone:
                return
        else:
            try:
                reply("result", call_id, value)
            except NotSendable as exc:
                reply("error", call_id, RuntimeError(
                    f"the result of {func.__qualname__} cannot be sent back: {exc}"),
                    traceback.format_exc())
        if token.parent_gone:
            return


def main(argv: Optional[list[str]] = None) -> None:
    """The child: connect to ``argv[0]`` with the key from stdin, warm up, then serve."""
    argv = sys.argv[1:] if argv is None else argv
    key = sys.stdin.buffer.read(32)
    address = argv[0]
    # warm up what every call needs before saying ready
    from . import restore  # noqa: F401  (imports numpy, the zoo and the tiling)
    import torch  # noqa: F401

    conn = Client(address, authkey=key)
    send(conn, ("ready", os.getpid()))
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
