import json
import math

import numpy as np
import pytest

from _shared import shared_file
from napari_microrestore.core import degrade as d
from napari_microrestore.core import probes as p
from napari_microrestore.core.errors import InputError


def _power(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spec = np.abs(np.fft.fft2(img - img.mean())) ** 2
    return spec, np.fft.fftfreq(img.shape[0])[:, None], np.fft.fftfreq(img.shape[1])[None, :]


def _high_frequency_fraction(img: np.ndarray) -> float:
    spec, fy, fx = _power(img)
    return float(spec[(np.abs(fy) > 0.45) | (np.abs(fx) > 0.45)].sum() / spec.sum())


def _angle_error(a: float, b: float) -> float:
    return abs((a - b + 90.0) % 180.0 - 90.0)


# ---------------------------------------------------------------------------- probes
@pytest.mark.parametrize("name", sorted(p.PROBES))
@pytest.mark.parametrize("shape", [(256, 256), (160, 300)])
def test_probe_shape_range_and_band_limit(name, shape):
    img = p.make_probe(name, shape, rng=0)
    assert img.shape == shape and img.dtype == np.float32
    assert img.min() >= 0.1 - 1e-6 and img.max() <= 1.0 + 1e-6
    assert np.median(img) < 0.7                             # mostly near the background
    assert img.max() > 0.9                                  # and bright features
    # rendered band-limited: almost no energy close to the Nyquist frequency
    assert _high_frequency_fraction(img) < 5e-3


def test_band_limit_beats_point_sampling():
    yy, xx = np.mgrid[:256, :256] - 127.5
    naive = (np.sin(36 * np.arctan2(yy, xx)) > 0) * (np.hypot(yy, xx) < 115.0)
    ours = p.make_probe("siemens-star", (256, 256), n_spokes=36)
    assert _high_frequency_fraction(ours) < 0.2 * _high_frequency_fraction(naive.astype(float))
    # the centre, where the wedges are finer than the pixels, fades to the mean level
    assert abs(float(ours[127:129, 127:129].mean()) - 0.55) < 0.05


def test_probe_determinism_and_options():
    a = p.make_probe("spots-lines", (128, 128), rng=5)
    np.testing.assert_array_equal(a, p.make_probe("spots-lines", (128, 128), rng=5))
    assert not np.array_equal(a, p.make_probe("spots-lines", (128, 128), rng=6))
    np.testing.assert_array_equal(p.make_probe("lines-2d", (64, 64), rng=1),
                                  p.make_probe("lines-2d", (64, 64), rng=2))
    inv = p.make_probe("spots-lines", (128, 128), rng=5, invert=True)
    np.testing.assert_allclose(inv, 1.0 - a, atol=1e-6)
    dark = p.make_probe("lines-2d", (64, 64), background=0.3, foreground=0.6)
    assert dark.min() >= 0.3 - 1e-6 and dark.max() <= 0.6 + 1e-6
    few = p.make_probe("spots-lines", (128, 128), rng=5, n_spots=0, n_lines=1)
    assert (few > 0.1 + 1e-3).mean() < (a > 0.1 + 1e-3).mean()


def test_line_orientations_in_the_spectrum():
    def axis_energy(img):
        spec, fy, fx = _power(img)
        along_y = spec[:, 0].sum()          # fx = 0: intensity varies along y only
        along_x = spec[0, :].sum()
        return along_y, along_x

    ey, ex = axis_energy(p.make_probe("lines-1d", (256, 256)))           # horizontal lines
    assert ey > 1e3 * ex
    ey, ex = axis_energy(p.make_probe("lines-1d", (256, 256), angle=90.0))
    assert ex > 1e3 * ey
    grid = p.make_probe("lines-2d", (256, 256))
    ey, ex = axis_energy(grid)
    assert 0.5 < ey / ex < 2.0
    assert ey + ex > 0.5 * _power(grid)[0].sum()            # a grid: energy on both axes


def test_lines_1d_period_shrinks_across_the_image():
    img = p.make_probe("lines-1d", (512, 64), period=(3.0, 24.0))
    profile = img[:, 32] - img[:, 32].mean()
    crossings = np.flatnonzero(np.diff(np.sign(profile)) != 0)
    gaps = np.diff(crossings)
    assert gaps[:5].mean() > 2.5 * gaps[-5:].mean()         # coarse at the top, fine below


def test_line_pairs_groups():
    img = p.make_probe("line-pairs", (256, 256))
    assert (img > 0.55).mean() > 0.05
    custom = p.make_probe("line-pairs", (128, 128), periods=[8.0, 4.0])
    assert (custom > 0.55).sum() > 0
    with pytest.raises(InputError, match="do not fit"):
        p.make_probe("line-pairs", (64, 64), periods=[40.0])
    with pytest.raises(InputError, match="Nyquist"):
        p.make_probe("line-pairs", (64, 64), periods=[1.5])


@pytest.mark.parametrize("call, match", [
    (lambda: p.make_probe("zebra"), "unknown probe"),
    (lambda: p.make_probe("lines-1d", colour="red"), "no option colour"),
    (lambda: p.make_probe("lines-1d", (16, 16)), "shape"),
    (lambda: p.make_probe("lines-1d", (64, "x")), "shape"),
    (lambda: p.make_probe("lines-2d", width=20.0), "width"),
    (lambda: p.make_probe("siemens-star", n_spokes=1), "n_spokes"),
    (lambda: p.make_probe("lines-1d", background=1.0), "background"),
    (lambda: p.make_probe("spots-lines", rng="x"), "rng"),
])
def test_probe_bad_input(call, match):
    with pytest.raises(InputError, match=match):
        call()


# ---------------------------------------------------------------------------- estimates
def _isbi(key: int) -> np.ndarray:
    import tifffile
    return tifffile.imread(shared_file("sstem/isbi2012_train_volume.tif"), key=key).astype(
        np.float32)


def test_estimate_degradation_on_real_sstem():
    img = _isbi(5)
    frame = d.poisson_gaussian_noise(d.motion_blur(img, 10.0, 30.0), 30.0, gain=2.0,
                                     offset=100.0, rng=1)
    est = p.estimate_degradation(frame)
    assert est.blur_length == pytest.approx(10.0, rel=0.25)
    assert _angle_error(est.blur_angle, 30.0) < 10.0
    assert est.noise_sigma == pytest.approx(math.sqrt(2.0 ** 2 * 30.0), rel=0.2)
    assert est.dose == pytest.approx(30.0, rel=0.25)
    assert est.gain == pytest.approx(2.0, rel=0.25)
    assert est.mean_intensity == pytest.approx(float(frame.mean()), rel=1e-6)
    json.dumps(est.to_dict())


def test_estimate_degradation_on_a_real_burst():
    crop = _isbi(8)[100:356, 50:306]
    burst = np.stack([d.poisson_gaussian_noise(d.motion_blur(crop, 14.0, 120.0), 15.0, rng=k)
                      for k in range(3)])
    est = p.estimate_degradation(burst)
    assert est.blur_length == pytest.approx(14.0, rel=0.25)
    assert _angle_error(est.blur_angle, 120.0) < 10.0
    assert est.noise_sigma == pytest.approx(math.sqrt(15.0), rel=0.2)
    assert est.dose == pytest.approx(15.0, rel=0.25)


def test_estimate_degradation_without_motion_blur_or_shot_noise():
    img = _isbi(5)
    sharp = p.estimate_degradation(d.poisson_gaussian_noise(img, 40.0, rng=2))
    assert sharp.blur_length < 3.0
    gaussian = d.motion_blur(img, 8.0, 0.0) + np.random.default_rng(3).normal(0, 6.0, img.shape)
    est = p.estimate_degradation(gaussian)
    assert est.dose is None and est.gain is None and est.offset is None
    assert est.noise_sigma == pytest.approx(6.0, rel=0.2)
    assert est.blur_length == pytest.approx(8.0, rel=0.25)
    assert _angle_error(est.blur_angle, 0.0) < 10.0


def test_estimate_degradation_on_a_probe():
    probe = p.make_probe("spots-lines", (512, 512), rng=3)
    frame = d.poisson_gaussian_noise(d.motion_blur(probe, 12.0, 120.0), 40.0, rng=0)
    est = p.estimate_degradation(frame)
    assert est.blur_length == pytest.approx(12.0, rel=0.25)
    assert _angle_error(est.blur_angle, 120.0) < 10.0
    assert est.noise_sigma == pytest.approx(math.sqrt(40.0), rel=0.2)


@pytest.mark.parametrize("kind", ["poisson", "dim-poisson", "gaussian", "poisson-ramp"])
@pytest.mark.parametrize("shape", [(1, 48, 48), (3, 64, 64), (3, 256, 256), (1, 200, 512)])
def test_estimate_degradation_sees_no_blur_in_pure_noise(kind, shape):
    # noise alone has no structure: the noise-corrected gradient energy is only estimation
    # error, which must not read as motion blur (it used to give 2-12 px)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        if kind == "gaussian":
            frames, var = 100.0 + 7.0 * rng.standard_normal(shape), 49.0
        else:
            lam = {"poisson": np.full(shape, 30.0), "dim-poisson": np.full(shape, 3.0),
                   "poisson-ramp": np.broadcast_to(np.linspace(5.0, 60.0, shape[2]), shape)}[kind]
            frames, var = rng.poisson(lam).astype(np.float32), float(lam.mean())
        est = p.estimate_degradation(frames)
        assert est.blur_length == 0.0, (seed, est)
        if shape[1] >= 256:
            assert est.noise_sigma ** 2 == pytest.approx(var, rel=0.1)


def test_estimate_degradation_is_symmetric_under_transposition():
    # integer counts used to tie the noise model's choice of step, so a transposed burst
    # could read a different blur
    rng = np.random.default_rng(4)
    scene = p.make_probe("spots-lines", (200, 200), rng=rng) * 100 + 10
    burst = d.simulate_burst(scene, 5, shape=(96, 112), blur_length=8, blur_angle=0.0,
                             angle_jitter=3.0, dose=40, rng=rng)
    est = p.estimate_degradation(burst.frames)
    turned = p.estimate_degradation(np.ascontiguousarray(burst.frames.transpose(0, 2, 1)))
    assert turned.blur_length == pytest.approx(est.blur_length, abs=1e-6)
    assert turned.noise_sigma == pytest.approx(est.noise_sigma, rel=1e-9)
    assert _angle_error(turned.blur_angle, 90.0 - est.blur_angle) < 1e-6
    assert _angle_error(est.blur_angle, 0.0) < 10.0


def test_estimate_degradation_still_sees_blur_at_low_dose():
    probe = p.make_probe("spots-lines", (256, 256), rng=1)
    burst = np.stack([d.poisson_gaussian_noise(d.motion_blur(probe, 12.0, 60.0), 12.0, rng=k)
                      for k in range(3)])
    est = p.estimate_degradation(burst)
    assert est.blur_length == pytest.approx(12.0, rel=0.2)
    assert _angle_error(est.blur_angle, 60.0) < 10.0


@pytest.mark.parametrize("frames, match", [
    (np.ones(100), "2-D or 3-D"),
    (np.ones((2, 2, 64, 64)), "2-D or 3-D"),
    (np.ones((16, 64)), "at least 32x32"),
    (np.full((64, 64), np.nan), "NaN"),
    (np.full((64, 64), 7.0), "constant"),
    (np.zeros((64, 64), dtype=bool), "numeric"),
])
def test_estimate_degradation_bad_input(frames, match):
    with pytest.raises(InputError, match=match):
        p.estimate_degradation(frames)


# ---------------------------------------------------------------------------- degrade_probe
def test_degrade_probe_matches_the_estimate():
    probe = p.make_probe("spots-lines", (160, 160), rng=1)
    # consistent with shot noise: mean = gain * dose + offset, sigma^2 = gain^2 * dose
    est = p.DegradationEstimate(blur_length=9.0, blur_angle=60.0, noise_sigma=math.sqrt(320.0),
                                dose=20.0, gain=4.0, offset=30.0, mean_intensity=110.0)
    burst = p.degrade_probe(probe, est, n_frames=4, rng=2)
    assert burst.frames.shape == (4, 160, 160) and burst.ground_truth.shape == probe.shape
    # the reference frame shows exactly the whole probe, on the data's scale
    scale = burst.params["counts_per_unit"]
    np.testing.assert_allclose(burst.ground_truth, 4.0 * scale * probe + 30.0, rtol=1e-5)
    assert burst.ground_truth.mean() == pytest.approx(4.0 * 20.0 + 30.0, rel=1e-4)
    assert burst.frames.mean() == pytest.approx(110.0, rel=0.05)
    assert np.mean(burst.params["blur_lengths"]) == pytest.approx(9.0, rel=0.15)
    assert all(_angle_error(a, 60.0) <= 10.0 for a in burst.params["blur_angles"])
    again = p.degrade_probe(probe, est, n_frames=4, rng=2)
    np.testing.assert_array_equal(burst.frames, again.frames)
    # the degraded probe measures like the data it imitates
    measured = p.estimate_degradation(burst.frames)
    assert measured.noise_sigma == pytest.approx(est.noise_sigma, rel=0.2)


def test_degrade_probe_gaussian_noise_and_defaults():
    probe = p.make_probe("lines-2d", (96, 96))
    est = p.DegradationEstimate(blur_length=0.0, blur_angle=90.0, noise_sigma=5.0, dose=None,
                                gain=None, offset=None, mean_intensity=300.0)
    burst = p.degrade_probe(probe, est, rng=0)
    assert burst.params["noise_model"] == "gaussian"
    assert burst.frames.mean() == pytest.approx(300.0, rel=0.02)
    residual = burst.frames[burst.reference] - burst.ground_truth    # no blur: pure noise
    assert residual.std() == pytest.approx(5.0, rel=0.1)
    default = p.degrade_probe(probe, rng=0, dose=50.0)
    assert default.frames.shape == (5, 96, 96)
    assert 6.0 * 0.9 <= min(default.params["blur_lengths"])
    with pytest.raises(InputError, match="no option shape"):
        p.degrade_probe(probe, shape=(32, 32))
    with pytest.raises(InputError, match="DegradationEstimate"):
        p.degrade_probe(probe, {"blur_length": 3})
    with pytest.raises(InputError, match="non-negative"):
        p.degrade_probe(probe - 1.0)
    with pytest.raises(InputError, match="n_frames"):
        p.degrade_probe(probe, n_frames=0)
