"""Tests of the torch burst registration (core/registration_torch.py) against core's OpenCV
registration, the true shifts, core's warp, and the per-window answer for cached streams."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from napari_microrestore.core import degrade, probes
from napari_microrestore.core.errors import InputError
from napari_microrestore.core.registration import (
    RegistrationResult,
    register_burst,
    warp_frames,
)
from napari_microrestore.core.registration_torch import (
    StreamRegistrar,
    TorchRegistrar,
    register_burst_torch,
    warp_frames_torch,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Deterministic, and polite to the other processes on the machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def periodic_texture(rng: np.random.Generator, n: int, sigma: float = 2.0) -> np.ndarray:
    """Smoothed white noise, periodic in both axes (so Fourier shifts are exact)."""
    f = np.fft.fftfreq(n)
    gauss = np.exp(-2 * np.pi ** 2 * sigma ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    tex = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * gauss).real
    return (100.0 + 20.0 * tex / tex.std()).astype(np.float32)


def shifted_burst(rng: np.random.Generator, size: int, shifts: np.ndarray,
                  counts: float = 0.0) -> np.ndarray:
    """Frames ``frame_t(y + dy, x + dx) = scene(y, x)`` cut from a periodic texture twice the
    frame size (exact sub-pixel Fourier shifts), with Poisson noise at ``counts`` per unit."""
    base = periodic_texture(rng, 2 * size)
    ky = np.fft.fftfreq(2 * size)[:, None]
    kx = np.fft.fftfreq(2 * size)[None, :]
    spec = np.fft.fft2(base)
    o = size // 2
    frames = []
    for dy, dx in shifts:
        moved = np.fft.ifft2(spec * np.exp(-2j * np.pi * (ky * dy + kx * dx))).real
        frames.append(moved[o:o + size, o:o + size])
    out = np.stack(frames).astype(np.float32)
    if counts:
        out = rng.poisson(np.maximum(out * counts, 0)).astype(np.float32)
    return out


@pytest.mark.parametrize("size, levels, counts", [
    (128, None, 0.0),     # levels 0: ECC at full resolution (cv2.findTransformECC), no polish
    (256, 2, 0.3),        # ECC at levels 2 and 1, then the full-resolution polish; noisy
    (256, None, 0.05),    # one level; very noisy (~5 counts / px)
])
def test_matches_core_and_truth_large_subpixel_shifts(size, levels, counts):
    rng = np.random.default_rng(size + (levels or 0))
    shifts = rng.uniform(-40, 40, (5, 2))
    shifts[2] = 0.0
    frames = shifted_burst(rng, size, shifts, counts)
    core = register_burst(frames, levels=levels)
    res = register_burst_torch(frames, levels=levels)
    got = res.to_numpy()
    assert isinstance(got, RegistrationResult)
    assert got.converged.all() and core.converged.all()
    truth = shifts - shifts[2]
    assert np.abs(got.shifts - core.shifts).max() < 0.05
    assert np.abs(got.shifts - truth).max() < 0.15
    np.testing.assert_allclose(got.ecc, core.ecc, atol=2e-3)
    assert (got.coverage == core.coverage).mean() > 0.999
    assert got.reference == 2 and got.sigma == pytest.approx(core.sigma)
    assert got.transforms[2].tolist() == np.eye(2, 3).tolist()
    np.testing.assert_array_equal(got.aligned[2], frames[2])
    json.dumps(got.to_dict())


def test_matches_core_on_simulated_tem_burst():
    """core.degrade.simulate_burst: motion blur, Poisson noise, sub-pixel stage positions."""
    rng = np.random.default_rng(3)
    scene = probes.make_probe("spots-lines", (420, 420), rng=rng) * 100 + 10
    burst = degrade.simulate_burst(scene, 5, shape=(192, 192), blur_length=(6, 10), dose=30,
                                   rng=rng)
    core = register_burst(burst.frames)
    got = register_burst_torch(burst.frames).to_numpy()
    assert np.abs(got.shifts - core.shifts).max() < 0.05
    assert np.abs(got.shifts - burst.shifts).max() < 0.3  # blur limits both methods alike


def test_aligned_equals_core_warp():
    """The aligned frames are core's warp of the frames with the found transforms; on shifts
    of 1/32 px (OpenCV's interpolation grid) they agree to float rounding."""
    rng = np.random.default_rng(5)
    frames = periodic_texture(rng, 96)[None].repeat(3, 0)
    tr = np.tile(np.eye(2, 3), (3, 1, 1))
    tr[0, :, 2] = [3.25, -7.5]
    tr[1, :, 2] = [-12.03125, 0.96875]
    exact = warp_frames(frames, tr)
    got = warp_frames_torch(torch.from_numpy(frames), torch.from_numpy(tr)).numpy()
    np.testing.assert_allclose(got, exact, atol=2e-3 * frames.std())
    # a rotation and a scale go through the same normalised-coordinate mapping
    c, s = np.cos(0.1), np.sin(0.1)
    tr[2] = [[1.02 * c, -s, 4.0], [s, 0.98 * c, -3.0]]
    ref = warp_frames(frames, tr)[2]
    rot = warp_frames_torch(torch.from_numpy(frames), torch.from_numpy(tr)).numpy()[2]
    assert np.abs(rot - ref).mean() < 0.01 * frames.std()
    # and the registration's own aligned frames follow its transforms
    shifts = rng.uniform(-10, 10, (3, 2))
    shifts[1] = 0
    burst = shifted_burst(rng, 96, shifts, 0.5)
    res = register_burst_torch(burst).to_numpy()
    core_warp = warp_frames(burst, res.transforms)
    assert np.abs(res.aligned - core_warp).mean() < 0.01 * burst.std()
    assert np.abs(res.aligned - core_warp).max() < 0.15 * burst.std()


def test_stream_cache_equals_per_window_registration():
    rng = np.random.default_rng(11)
    shifts = np.cumsum(rng.uniform(-6, 6, (8, 2)), axis=0)
    frames = shifted_burst(rng, 128, shifts, 0.5)
    stream = StreamRegistrar(5, (128, 128), sigma=1.3, levels=1)
    for k, frame in enumerate(torch.from_numpy(frames)):
        stream.push(frame)
        if k < 4:
            assert not stream.full
            continue
        got = stream.register().to_numpy()
        want = register_burst_torch(frames[k - 4:k + 1], sigma=1.3, levels=1).to_numpy()
        assert got.reference == want.reference == 2
        np.testing.assert_allclose(got.transforms, want.transforms, atol=1e-5)
        np.testing.assert_allclose(got.aligned, want.aligned, atol=1e-3)
        np.testing.assert_allclose(got.ecc, want.ecc, atol=1e-6)
        np.testing.assert_array_equal(got.coverage, want.coverage)
        truth = shifts[k - 4:k + 1] - shifts[k - 2]
        assert np.abs(got.shifts - truth).max() < 0.15


class NoHostSync(TorchFunctionMode):
    """Fails on any tensor operation that copies a value to the host (a device sync)."""

    BAD = frozenset({"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "cpu",
           "nonzero"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.BAD:
            raise AssertionError(f"host synchronisation in the device path: {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_stream_path_never_synchronises_with_the_host():
    rng = np.random.default_rng(2)
    frames = torch.from_numpy(shifted_burst(rng, 64, rng.uniform(-3, 3, (6, 2)), 1.0))
    stream = StreamRegistrar(3, (64, 64), sigma=1.0)
    with NoHostSync():
        for frame in frames:
            stream.push(frame)
        res = stream.register()
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        bool(res.ecc[0] > 0)
    assert res.to_numpy().converged.all()


def test_unrelated_frame_is_flagged_not_dropped():
    rng = np.random.default_rng(4)
    frames = shifted_burst(rng, 96, rng.uniform(-3, 3, (3, 2)), 1.0)
    frames[0] = rng.normal(100, 20, frames[0].shape).astype(np.float32)
    res = register_burst_torch(frames).to_numpy()
    assert not res.converged[0] and res.converged[1:].all()
    assert len(res.messages) == 1 and res.messages[0].startswith("frame 0 did not converge")
    assert np.isfinite(res.aligned).all()


@pytest.mark.parametrize("frames, kwargs, match", [
    (np.zeros((32, 32)), {}, "3-D stack"),
    (np.zeros((1, 32, 32)), {}, "at least 2 frames"),
    (np.full((2, 32, 32), np.nan), {}, "NaN"),
    (np.zeros((2, 8, 32)), {"sigma": 1.0}, "at least 16x16"),
    (np.ones((3, 32, 32)), {"reference": 3}, "reference"),
    (np.ones((3, 32, 32)), {"sigma": -1.0}, "sigma"),
    (np.ones((3, 32, 32)), {"sigma": 1.0, "levels": 5}, "levels"),
    (np.ones((3, 32, 32)), {"sigma": 1.0, "iterations": 0}, "iterations"),
])
def test_bad_input(frames, kwargs, match):
    with pytest.raises(InputError, match=match):
        register_burst_torch(frames, **kwargs)


def test_stream_bad_use():
    with pytest.raises(InputError, match="window"):
        StreamRegistrar(1, (32, 32), sigma=1.0)
    stream = StreamRegistrar(3, (32, 32), sigma=1.0)
    with pytest.raises(InputError, match="shape"):
        stream.push(torch.zeros(16, 32))
    stream.push(torch.zeros(32, 32))
    with pytest.raises(InputError, match="a window needs 3"):
        stream.register()
    with pytest.raises(InputError, match="16x16"):
        TorchRegistrar((8, 64), sigma=1.0)
