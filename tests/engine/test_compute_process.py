"""The compute process: messages, calls, progress, cancel, errors, a dying child, offload."""

from __future__ import annotations

import os
import threading
import time
from multiprocessing import Pipe

import numpy as np
import pytest

from napari_microrestore.core.errors import Cancelled, CancelToken, InputError
from napari_microrestore.engine import compute_process as cp
from napari_microrestore.engine import restore as engine


# ---- functions the child runs (module level: they travel by reference) --------------------
def where(device: str = "cpu") -> tuple[int, bool]:
    return os.getpid(), threading.current_thread() is threading.main_thread()


def where_with(data: np.ndarray, device: str = "cpu") -> tuple[int, bool]:
    return where(device)


def steps(n: int, *, device: str = "cpu", progress=None, cancel=None) -> np.ndarray:
    """Report ``n`` steps (checking the cancel token before each), return their squares."""
    out = []
    for i in range(n):
        if cancel is not None:
            cancel.raise_if_cancelled()
        progress(i / n, f"step {i}")
        out.append(i * i)
        time.sleep(0.01)
    return np.asarray(out)


def until_cancelled(*, device: str = "cpu", progress=None, cancel=None) -> str:
    """Report once, then wait (up to 20 s) for the cancel."""
    progress(0.1, "waiting")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        cancel.raise_if_cancelled()
        time.sleep(0.01)
    return "never cancelled"


def die(code: int, device: str = "cpu") -> None:
    os._exit(code)


def fail(device: str = "cpu") -> None:
    raise InputError("this input is bad")


class OddError(Exception):
    """Pickles, but cannot be rebuilt: its __init__ wants two arguments."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def fail_oddly(device: str = "cpu") -> None:
    raise OddError(1, 2)


@pytest.fixture(scope="module")
def proc():
    p = cp.ComputeProcess(startup_timeout=120)
    p.start()
    assert p.wait_ready(), p._failed
    yield p
    p.close()
    assert not p.running


# ---- messages ------------------------------------------------------------------------------
def test_messages_round_trip_arrays_out_of_band():
    a, b = Pipe()
    big = np.arange(3 * 500 * 700, dtype=np.float32).reshape(3, 500, 700)
    obj = {"big": big, "strided": big[:, ::2, 1::3], "empty": np.zeros((0, 4), np.uint16),
           "fortran": np.asfortranarray(np.ones((5, 7), np.float64)), "text": "é", "n": 3,
           "nested": [big[0], (big[1, :2],)]}
    sender = threading.Thread(target=cp.send, args=(a, obj))  # the pipe holds ~64 kB
    sender.start()
    got = cp.recv(b)
    sender.join()
    for key in ("big", "strided", "empty", "fortran"):
        assert got[key].dtype == obj[key].dtype and np.array_equal(got[key], obj[key])
        assert got[key].flags.writeable
    assert got["fortran"].flags.f_contiguous
    assert got["text"] == "é" and got["n"] == 3
    assert np.array_equal(got["nested"][0], big[0])
    assert np.array_equal(got["nested"][1][0], big[1, :2])
    got["big"][0, 0, 0] = -1  # the receiver's own memory, not the sender's
    assert big[0, 0, 0] == 0


def test_unsendable_is_refused_before_anything_is_written():
    a, b = Pipe()
    with pytest.raises(cp.NotSendable, match="compute process"):
        cp.send(a, ("call", lambda: 1))
    assert not b.poll(0.05)


# ---- calls ---------------------------------------------------------------------------------
def test_call_runs_on_the_childs_main_thread(proc):
    pid, main = proc.call(where, {})
    assert pid == proc.pid != os.getpid()
    assert main


def test_progress_arrives_in_order_and_the_result_comes_back(proc):
    seen = []
    out = proc.call(steps, {"n": 5}, progress=lambda f, m: seen.append((f, m)))
    assert np.array_equal(out, [0, 1, 4, 9, 16])
    assert seen == [(i / 5, f"step {i}") for i in range(5)]


def test_errors_come_back_with_the_childs_traceback(proc):
    with pytest.raises(InputError, match="this input is bad") as info:
        proc.call(fail, {})
    assert isinstance(info.value.__cause__, cp.RemoteTraceback)
    assert "in fail" in info.value.__cause__.text
    assert proc.call(where, {})[0] == proc.pid  # still serving
    with pytest.raises(RuntimeError, match="OddError: 1 and 2"):
        proc.call(fail_oddly, {})
    assert proc.call(where, {})[0] == proc.pid


def test_cancel_stops_the_call_and_a_stale_cancel_does_not_leak(proc):
    token = CancelToken()
    seen = []

    def progress(f, m):
        seen.append(m)
        token.cancel()

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        proc.call(until_cancelled, {}, progress=progress, cancel=token)
    assert time.monotonic() - t0 < 10
    assert seen == ["waiting"]
    # the next call, with a fresh token, runs to the end
    assert np.array_equal(proc.call(steps, {"n": 3}, progress=lambda f, m: None,
                                    cancel=CancelToken()), [0, 1, 4])


def test_a_dying_child_is_reported_and_replaced():
    p = cp.ComputeProcess()
    try:
        assert p.wait_ready()
        first = p.pid
        with pytest.raises(cp.ProcessDied, match="exit code 3"):
            p.call(die, {"code": 3})
        assert not p.running
        pid, _ = p.call(where, {})  # starts a new one
        assert pid != first and pid == p.pid
    finally:
        p.close()


def test_a_process_that_cannot_start_is_given_up_after_two_tries(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\ncat > /dev/null\nexit 7\n")  # reads the key, then exits
    fake.chmod(0o755)
    for python, why in ((str(fake), "exited with code 7"),
                        (str(tmp_path / "missing"), "could not start")):
        p = cp.ComputeProcess(startup_timeout=30, python=python)
        for _ in range(2):
            with pytest.raises(cp.ProcessUnavailable, match=why):
                p.call(where, {})
        assert p.start_failures == 2
        t0 = time.monotonic()
        with pytest.raises(cp.ProcessUnavailable, match="not tried again"):
            p.call(where, {})
        assert time.monotonic() - t0 < 1 and p.start_failures == 2
        p.close()
    # no thread is left waiting for a child that never came
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name.startswith("microrestore: compute")]


def test_try_call_does_not_wait_for_a_busy_process(proc):
    token = CancelToken()
    started = threading.Event()
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(
        Cancelled, proc.call, until_cancelled, {},
        progress=lambda f, m: started.set(), cancel=token)))
    t.start()
    try:
        assert started.wait(30)
        assert proc.busy
        assert proc.try_call(where, {}) == (False, None)
    finally:
        token.cancel()
        t.join(30)
    assert not proc.busy and done


# ---- offload -------------------------------------------------------------------------------
def in_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a worker thread (offload never leaves a main thread)."""
    out = []

    def run():
        try:
            out.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001
            out.append((False, exc))

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    ok, value = out[0]
    if not ok:
        raise value
    return value


def test_offload_sends_cpu_calls_and_keeps_the_rest_here(monkeypatch):
    child = cp.shared()
    assert child.wait_ready()
    assert in_thread(cp.offload, where, device="cpu")[0] == child.pid
    assert cp.offload(where, device="cpu")[0] == os.getpid()  # a main thread stays here

    def local(device):  # cannot travel: runs in this process
        return where(device)

    assert in_thread(cp.offload, local, device="cpu")[0] == os.getpid()
    monkeypatch.setenv(cp.ENV, "0")
    assert in_thread(cp.offload, where, device="cpu")[0] == os.getpid()


def test_offload_keeps_inputs_too_large_to_copy_here(monkeypatch):
    assert cp.shared().wait_ready()
    monkeypatch.setattr(cp, "_copy_budget", lambda: 1000)
    assert in_thread(cp.offload, where, device="cpu")[0] == cp.shared().pid  # no arrays
    big = {"data": np.zeros(1001, np.uint8)}
    assert in_thread(cp.offload, where_with, device="cpu", **big)[0] == os.getpid()
    monkeypatch.setattr(cp, "_copy_budget", lambda: 2000)
    assert in_thread(cp.offload, where_with, device="cpu", **big)[0] == cp.shared().pid


def test_offload_runs_here_while_the_process_is_busy():
    child = cp.shared()
    assert child.wait_ready()
    token = CancelToken()
    started = threading.Event()
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(
        Cancelled, child.call, until_cancelled, {},
        progress=lambda f, m: started.set(), cancel=token)))
    t.start()
    try:
        assert started.wait(30)
        assert in_thread(cp.offload, where, device="cpu")[0] == os.getpid()
    finally:
        token.cancel()
        t.join(30)
    assert done  # the busy call ended on its cancel


def test_offloaded_restore_equals_the_engine_here():
    rng = np.random.default_rng(3)
    burst = rng.poisson(30, (3, 96, 112)).astype(np.float32)
    here = engine.restore(burst, "tem-burst-fast", device="cpu")
    seen = []
    calls = cp.shared().calls
    there = in_thread(cp.offload, engine.restore, data=burst, model="tem-burst-fast",
                      device="cpu", progress=lambda f, m: seen.append(f), cancel=CancelToken())
    assert cp.shared().calls == calls + 1
    # the same computation (bit-equal with the same torch thread count in both processes)
    np.testing.assert_allclose(there.image, here.image, rtol=1e-5, atol=1e-4)
    assert there.provenance["registration"] == here.provenance["registration"]
    assert seen and seen[-1] == 1.0
    with pytest.raises(InputError, match="3-D"):
        in_thread(cp.offload, engine.restore, data=burst[0], model="tem-burst-fast",
                  device="cpu")
