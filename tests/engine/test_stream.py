"""engine.stream.restore_stream: per-window equality with engine.restore, windows at the
stream ends, index subsets, typed updates, cancel and bad input."""

import json

import numpy as np
import pytest

from napari_microrestore.core import degrade, probes
from napari_microrestore.core.errors import Cancelled, CancelToken, InputError
from napari_microrestore.engine.restore import restore
from napari_microrestore.engine.stream import StreamFrame, restore_stream, window_frames


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    """(8, 64, 64) simulated TEM stream: a moving stage, motion blur and Poisson noise."""
    rng = np.random.default_rng(7)
    scene = probes.make_probe("spots-lines", (200, 200), rng=rng) * 100 + 10
    burst = degrade.simulate_burst(scene, 8, shape=(64, 64), blur_length=4, dose=40,
                                   step=2.0, rng=rng)
    return burst.frames.astype(np.float32)


class CountingStack:
    """A lazy (T, Y, X) stack that counts how often each frame is read."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.reads = [0] * data.shape[0]

    def __getitem__(self, t: int) -> np.ndarray:
        self.reads[t] += 1
        return self._data[t]


def _per_window(stream: np.ndarray, model: str, centre: int, window: int,
                **kw) -> np.ndarray:
    used = window_frames(centre, window, len(stream))
    return restore(stream[used], model, device="cpu", reference=used.index(centre),
                   **kw).image


def test_window_frames_shift_at_the_ends():
    assert window_frames(0, 5, 8) == [0, 1, 2, 3, 4]
    assert window_frames(1, 5, 8) == [0, 1, 2, 3, 4]
    assert window_frames(4, 5, 8) == [2, 3, 4, 5, 6]
    assert window_frames(7, 5, 8) == [3, 4, 5, 6, 7]
    assert window_frames(3, 4, 8) == [1, 2, 3, 4]
    assert window_frames(2, 5, 5) == [0, 1, 2, 3, 4]


def test_classical_equals_per_window_restore_and_reads_frames_once(stream):
    data = CountingStack(stream)
    res = restore_stream(data, "registered-mean", window=5, device="cpu")
    assert res.indices == list(range(8))
    assert res.images.shape == stream.shape and res.images.dtype == np.float32
    assert data.reads == [1] * 8  # consecutive windows share frames: each is read once
    for k, centre in enumerate(res.indices):
        expected = _per_window(stream, "registered-mean", centre, 5)
        np.testing.assert_allclose(res.images[k], expected, rtol=0, atol=1e-3)
    prov = res.provenance
    assert prov["model"] == "registered-mean" and prov["window"] == 5
    assert prov["indices"] == list(range(8))
    frames = prov["per_frame"]
    assert [f["frames_used"] for f in frames[:2]] == [[0, 1, 2, 3, 4]] * 2
    assert frames[4]["frames_used"] == [2, 3, 4, 5, 6]
    assert frames[7]["frames_used"] == [3, 4, 5, 6, 7]
    # the centre frame is the reference of its window: identity transform, ECC 1
    for f in frames:
        ref = f["frames_used"].index(f["index"])
        assert f["ecc"][ref] == 1.0 and f["shifts"][ref] == [0.0, 0.0]
        assert len(f["ecc"]) == 5 and min(f["ecc"]) > 0.5
    json.dumps(prov)


def test_burst_net_equals_per_window_restore(stream):
    """Each window equals a restore() call given the direction the previous window used."""
    res = restore_stream(stream, "tem-burst-fast", indices=[0, 4, 7], device="cpu")
    assert res.provenance["window"] == 5  # the card's default burst length
    prior = None
    for k, centre in enumerate(res.indices):
        expected = _per_window(stream, "tem-burst-fast", centre, 5, motion_prior=prior)
        scale = float(np.abs(expected).max())
        assert np.abs(res.images[k] - expected).max() < 1e-3 * scale
        prior = res.provenance["per_frame"][k]["motion_direction"]["angle_deg"]
    assert res.provenance["weights_sha256"] and res.provenance["device"] == "cpu"


def test_a_self_ensemble_reaches_every_window(stream):
    res = restore_stream(stream, "tem-burst-fast", indices=[3], device="cpu", ensemble="flips")
    expected = _per_window(stream, "tem-burst-fast", 3, 5, ensemble="flips")
    assert np.abs(res.images[0] - expected).max() < 1e-3 * float(np.abs(expected).max())
    assert res.provenance["parameters"]["ensemble"] == "flips"
    plain = _per_window(stream, "tem-burst-fast", 3, 5)
    assert np.abs(res.images[0] - plain).max() > 1e-3 * float(np.abs(plain).max())


def test_a_slanted_stage_run_turns_every_window_alike():
    """A stage moving at 30 degrees: every window is turned by the first one's angle, though
    each reads its own (a degree or so apart); ``motion_angle`` fixes it for all."""
    rng = np.random.default_rng(4)
    scene = probes.make_probe("spots-lines", (260, 260), rng=rng) * 100 + 10
    frames = degrade.simulate_burst(scene, 8, shape=(64, 64), blur_length=4, blur_angle=30.0,
                                    curvature=0.0, speed_variation=0.0, dose=40, step=3.0,
                                    rng=rng).frames.astype(np.float32)
    res = restore_stream(frames, "tem-burst-fast", device="cpu")
    dirs = [f["motion_direction"] for f in res.provenance["per_frame"]]
    first = dirs[0]
    assert first["source"] == "registration" and abs(first["angle_deg"] - 30.0) < 5
    for d in dirs[1:]:
        assert d["source"] == "previous window", d
        assert d["rotation_deg"] == first["rotation_deg"]
    reads = [d["read_deg"] for d in dirs[1:]]
    assert len(set(reads)) > 1  # the windows' own readings differ: held, not read alike
    # each window equals restore() turned by the held angle
    k = 5
    expected = _per_window(frames, "tem-burst-fast", k, 5, motion_angle=first["angle_deg"])
    assert np.abs(res.images[k] - expected).max() < 1e-3 * float(np.abs(expected).max())
    fixed = restore_stream(frames, "tem-burst-fast", indices=[0, 5], device="cpu",
                           motion_angle=90.0)
    assert [f["motion_direction"]["source"] for f in fixed.provenance["per_frame"]] == [
        "given", "given"]
    assert fixed.provenance["parameters"]["motion_angle"] == 90.0


def test_off_the_main_thread_each_window_runs_in_the_compute_process(stream):
    """napari's worker thread: every window goes to the compute process, same numbers, and
    the frames still arrive as typed updates in order."""
    import threading

    from napari_microrestore.engine import compute_process

    child = compute_process.shared()
    assert child.wait_ready()
    calls, got, updates = child.calls, [], []
    t = threading.Thread(target=lambda: got.append(restore_stream(
        stream, "tem-burst-fast", indices=[0, 4, 7], device="cpu",
        on_update=updates.append, progress=lambda f, m: None)))
    t.start()
    t.join(120)
    assert child.calls == calls + 3
    res = got[0]
    assert [u.index for u in updates] == [0, 4, 7]
    for k, centre in enumerate(res.indices):
        expected = _per_window(stream, "tem-burst-fast", centre, 5)
        scale = float(np.abs(expected).max())
        assert np.abs(res.images[k] - expected).max() < 1e-3 * scale


def test_indices_subset_order_and_typed_updates(stream):
    updates: list[StreamFrame] = []
    fractions: list[float] = []
    res = restore_stream(stream, "registered-mean", indices=[6, 1, 3], window=3,
                         device="cpu", on_update=updates.append,
                         progress=lambda f, m: fractions.append(f))
    assert res.indices == [6, 1, 3] and res.images.shape == (3, 64, 64)
    assert [u.index for u in updates] == [6, 1, 3]
    assert [(u.done, u.total) for u in updates] == [(1, 3), (2, 3), (3, 3)]
    for k, u in enumerate(updates):
        assert u.image.dtype == np.float32 and u.seconds >= 0
        np.testing.assert_array_equal(u.image, res.images[k])
        np.testing.assert_allclose(u.image, _per_window(stream, "registered-mean", u.index, 3),
                                   rtol=0, atol=1e-3)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_no_register(stream):
    res = restore_stream(stream, "registered-mean", indices=[0], window=3, register=False,
                         device="cpu")
    np.testing.assert_allclose(res.images[0], stream[:3].mean(0), rtol=1e-6, atol=1e-4)
    assert "ecc" not in res.provenance["per_frame"][0]


def test_cancel_mid_stream_stops_early(stream):
    token = CancelToken()
    updates: list[StreamFrame] = []

    def on_update(frame: StreamFrame) -> None:
        updates.append(frame)
        if frame.done == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        restore_stream(stream, "registered-mean", window=3, device="cpu", on_update=on_update,
                       cancel=token)
    assert len(updates) == 2


def test_cancel_inside_a_frame(stream):
    token = CancelToken()
    seen: list[float] = []

    def progress(fraction: float, message: str) -> None:
        seen.append(fraction)
        if "registered frame" in message:
            token.cancel()  # during the first window's registration

    with pytest.raises(Cancelled):
        restore_stream(stream, "registered-mean", device="cpu", progress=progress,
                       cancel=token)
    assert max(seen) < 1 / 8


def test_bad_input(stream):
    with pytest.raises(InputError, match="not a burst model"):
        restore_stream(stream, "sstem-restore")
    with pytest.raises(InputError, match="3-D"):
        restore_stream(stream[0], "registered-mean")
    with pytest.raises(InputError, match="longer than the stream"):
        restore_stream(stream[:4], "registered-mean", window=5)
    with pytest.raises(InputError, match="bursts of 2 to 9 frames"):
        restore_stream(stream, "tem-burst-fast", window=10)
    with pytest.raises(InputError, match="outside the stream"):
        restore_stream(stream, "registered-mean", indices=[0, 8])
    with pytest.raises(InputError, match="empty"):
        restore_stream(stream, "registered-mean", indices=[])
    bad = stream.copy()
    bad[5, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        restore_stream(bad, "registered-mean", indices=[5], window=3)


def test_cpu_heap_and_threads_keep_results():
    """The CPU set-up of engine.restore (threads, heap kept during inference) changes speed
    only: the same net gives the same output inside nested cpu_heap contexts and outside."""
    from napari_microrestore.engine.restore import (
        _load_net,
        _normalise,
        cpu_heap,
        cpu_threads,
        run_net,
    )
    from napari_microrestore.models.zoo import get_card

    assert 1 <= cpu_threads()
    net = _load_net(get_card("tem-burst-fast"), "cpu")
    x, _, _ = _normalise(np.random.default_rng(1).normal(size=(3, 48, 40)).astype(np.float32))
    with cpu_heap(), cpu_heap():
        inside, _ = run_net(net, x, burst=True, device="cpu")
    outside, _ = run_net(net, x, burst=True, device="cpu")
    np.testing.assert_array_equal(inside, outside)
