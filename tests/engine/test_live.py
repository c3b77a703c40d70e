"""engine.live: the live pipeline equals engine.restore per window (CPU), fills its window
before answering, keeps results on the device when asked, and rejects bad input; the
device-side tiled burst restoration equals engine.restore's tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_microrestore.core import degrade, probes
from napari_microrestore.core.errors import Cancelled, CancelToken, InputError
from napari_microrestore.engine.live import LiveFrame, LivePipeline, restore_burst_device
from napari_microrestore.engine.restore import restore


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    """(7, 96, 96) simulated TEM stream: a moving stage, motion blur and Poisson noise."""
    rng = np.random.default_rng(7)
    scene = probes.make_probe("spots-lines", (240, 240), rng=rng) * 100 + 10
    burst = degrade.simulate_burst(scene, 7, shape=(96, 96), blur_length=4, dose=40,
                                   step=2.0, rng=rng)
    return burst.frames.astype(np.float32)


def test_each_window_equals_engine_restore(stream):
    live = LivePipeline("tem-burst-fast", device="cpu", window=5)
    out = list(live.run(stream))
    assert [f.index for f in out] == [2, 3, 4]
    # the stream's direction is decided once, on the first window; restore() reads each
    # window's own, which moves by a few degrees here: compare with the same direction
    angle = live.orientation["angle_deg"]
    for f in out:
        want = restore(stream[f.index - 2:f.index + 3], "tem-burst-fast", device="cpu",
                       motion_angle=angle).image
        assert f.image.dtype == np.float32 and f.image.shape == want.shape
        diff = f.image - want
        # the registrations differ by the backend (torch: ECC on the pyramid; core: its own
        # Gauss-Newton steps there; up to ~0.05 px on these 96 px noisy frames) and by the
        # stream's fixed sigma: ~1 % of the image's contrast in RMS
        assert np.sqrt((diff ** 2).mean()) < 0.02 * want.std()
        assert np.abs(diff).max() < 0.2 * want.std()
        assert f.converged.all() and f.ecc[2] == 1.0
        np.testing.assert_array_equal(f.shifts[2], [0.0, 0.0])
        assert f.seconds > 0


@pytest.mark.parametrize("window", [2, 4])
def test_window_fill_and_centre_index(stream, window):
    live = LivePipeline("tem-burst-fast", device="cpu", window=window, sigma=1.2)
    results = [live.push(frame) for frame in stream[:window + 1]]
    assert results[:window - 1] == [None] * (window - 1)
    first, second = results[window - 1], results[window]
    assert isinstance(first, LiveFrame)
    # the centre (reference) frame of frames 0..window-1 is window // 2
    assert first.index == window // 2 and second.index == window // 2 + 1
    assert first.shifts.shape == (window, 2)
    np.testing.assert_array_equal(first.shifts[window // 2], [0.0, 0.0])
    # the ring buffer wrapped: the second window equals a fresh pipeline on frames 1..window
    fresh = LivePipeline("tem-burst-fast", device="cpu", window=window, sigma=1.2,
                         motion_angle=live.orientation["angle_deg"])
    again = [fresh.push(frame) for frame in stream[1:window + 1]][-1]
    np.testing.assert_allclose(second.image, again.image, atol=1e-3 * stream.std())
    np.testing.assert_allclose(second.shifts, again.shifts, atol=1e-6)


def test_keep_on_device_returns_tensors(stream):
    kept = LivePipeline("tem-burst-fast", device="cpu", window=3, sigma=1.2,
                        keep_on_device=True)
    host = LivePipeline("tem-burst-fast", device="cpu", window=3, sigma=1.2)
    a = [f for f in kept.run(stream[:4])]
    b = [f for f in host.run(stream[:4])]
    assert len(a) == len(b) == 2
    assert isinstance(a[0].image, torch.Tensor) and a[0].image.device.type == "cpu"
    # results are copies, not views of buffers that the next window overwrites
    np.testing.assert_array_equal(a[0].image.numpy(), b[0].image)
    np.testing.assert_array_equal(a[1].image.numpy(), b[1].image)


def test_run_can_be_cancelled(stream):
    token = CancelToken()
    live = LivePipeline("tem-burst-fast", device="cpu", window=3, sigma=1.2)
    gen = live.run(stream)
    next(gen)
    token.cancel()
    with pytest.raises(Cancelled):
        list(live.run(stream, cancel=token))


def test_bad_input(stream):
    with pytest.raises(InputError, match="burst network"):
        LivePipeline("tem-single", device="cpu")
    with pytest.raises(InputError, match="window"):
        LivePipeline("tem-burst-fast", device="cpu", window=12)
    with pytest.raises(InputError, match="amp"):
        LivePipeline("tem-burst-fast", device="cpu", amp="fp8")
    live = LivePipeline("tem-burst-fast", device="cpu", window=3)
    with pytest.raises(InputError, match="2-D"):
        live.push(stream[:2])
    live.push(stream[0])
    with pytest.raises(InputError, match="shape"):
        live.push(stream[1, :64])
    bad = stream[1].copy()
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        live.push(bad)


@pytest.mark.parametrize("angle", [None, 30.0])
def test_device_tiled_burst_equals_engine_restore(stream, angle):
    """Also with a slanted stage (turned by -60 degrees on a larger canvas, tiled there)."""
    rng = np.random.default_rng(3)
    scene = probes.make_probe("spots-lines", (260, 260), rng=rng) * 100 + 10
    burst = degrade.simulate_burst(scene, 5, shape=(152, 152), blur_length=4, dose=40,
                                   step=2.0, rng=rng).frames
    got = restore_burst_device(burst, "tem-burst-fast", device="cpu", tile=144, batch=3,
                               motion_angle=angle)
    want = restore(burst, "tem-burst-fast", device="cpu", tile=144, motion_angle=angle).image
    assert got.shape == want.shape
    diff = got.numpy() - want
    assert np.sqrt((diff ** 2).mean()) < 0.01 * want.std()
    assert np.abs(diff).max() < 0.1 * want.std()


def test_a_sideways_stream_is_turned_for_the_net_and_back():
    """A stage moving along the rows: the first window decides the turn, and every window
    equals engine.restore turned the same way, in the input's orientation."""
    rng = np.random.default_rng(8)
    scene = probes.make_probe("spots-lines", (240, 240), rng=rng) * 100 + 10
    frames = degrade.simulate_burst(scene, 6, shape=(80, 104), blur_length=4, blur_angle=0.0,
                                    dose=40, step=3.0, rng=rng).frames.astype(np.float32)
    live = LivePipeline("tem-burst-fast", device="cpu", window=5)
    buffer = np.empty_like(frames[0])
    out = []
    for frame in frames:  # a camera that reuses one buffer for every frame
        buffer[...] = frame
        if (f := live.push(buffer)) is not None:
            out.append(f)
    angle = live.orientation["angle_deg"]
    assert abs(live.orientation["rotation_deg"]) > 80 and min(angle, 180 - angle) < 10
    assert [f.index for f in out] == [2, 3]
    for f in out:
        ref = restore(frames[f.index - 2:f.index + 3], "tem-burst-fast", device="cpu",
                      motion_angle=angle)
        assert ref.provenance["motion_direction"]["rotation_deg"] == \
            live.orientation["rotation_deg"]
        want = ref.image
        assert f.image.shape == want.shape == (80, 104)
        diff = f.image - want
        assert np.sqrt((diff ** 2).mean()) < 0.02 * want.std()
        np.testing.assert_allclose(f.shifts, ref.registration.shifts, atol=0.1)
    told = LivePipeline("tem-burst-fast", device="cpu", window=5, motion_angle=90)
    last = [told.push(frame) for frame in frames[:5]][-1]
    assert told.orientation == {"angle_deg": 90.0, "source": "given", "rotation_deg": 0.0}
    assert not np.allclose(last.image, out[0].image)
