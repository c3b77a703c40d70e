import json
import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.registration import phase_cross_correlation

from _shared import shared_file
from napari_microrestore.core import degrade as d
from napari_microrestore.core.errors import InputError


def _moments(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid offset from the central pixel (dy, dx) and 2x2 covariance in (x, y) order."""
    c = k.shape[0] // 2
    yy, xx = np.mgrid[: k.shape[0], : k.shape[1]] - c
    w = k.astype(np.float64) / k.sum()
    my, mx = (w * yy).sum(), (w * xx).sum()
    cxx = (w * (xx - mx) ** 2).sum()
    cyy = (w * (yy - my) ** 2).sum()
    cxy = (w * (xx - mx) * (yy - my)).sum()
    return np.array([my, mx]), np.array([[cxx, cxy], [cxy, cyy]])


def _texture(rng, shape=(160, 160), sigma=1.5, mean=200.0, scale=30.0):
    img = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return (mean + scale * img / img.std()).astype(np.float32)


# ---------------------------------------------------------------------------- motion blur
@pytest.mark.parametrize("length, angle", [(10.0, 90.0), (10.0, 0.0), (7.3, 30.0),
                                           (14.0, 135.0), (4.5, 172.0)])
def test_motion_psf_length_direction_and_centre(length, angle):
    k = d.motion_psf(length, angle)
    assert k.dtype == np.float32 and k.ndim == 2
    assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    assert k.min() >= 0 and abs(float(k.sum()) - 1.0) < 1e-5
    centroid, cov = _moments(k)
    assert np.abs(centroid).max() < 1e-3
    evals, evecs = np.linalg.eigh(cov)
    # a uniform segment of length L has variance L^2 / 12 along it (splatting adds ~1/6 px^2)
    assert math.sqrt(12.0 * (evals[1] - evals[0])) == pytest.approx(length, rel=0.05)
    direction = math.degrees(math.atan2(evecs[1, 1], evecs[0, 1])) % 180.0
    assert abs((direction - angle + 90.0) % 180.0 - 90.0) < 1.0
    assert evals[0] < 0.2  # a thin line


def test_motion_psf_curvature_speed_and_seed():
    straight = d.motion_psf(12.0, 90.0)
    bent = d.motion_psf(12.0, 90.0, curvature=0.15)
    _, cov_s = _moments(straight)
    centroid, cov_b = _moments(bent)
    assert np.abs(centroid).max() < 1e-3
    assert cov_b[0, 0] > cov_s[0, 0] + 0.2          # the arc bows out sideways (along x)
    a = d.motion_psf(12.0, 45.0, speed_variation=0.6, rng=3)
    b = d.motion_psf(12.0, 45.0, speed_variation=0.6, rng=3)
    c = d.motion_psf(12.0, 45.0, speed_variation=0.6, rng=4)
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.allclose(a, c)
    assert np.abs(_moments(a)[0]).max() < 1e-3      # centred even with uneven dwell
    # uneven dwell: the kernel weights along the path are no longer uniform
    along = a[a > 1e-3]
    assert along.max() / np.median(along) > 1.3
    # without speed variation the seed does not matter
    np.testing.assert_array_equal(d.motion_psf(9, 10, rng=1), d.motion_psf(9, 10, rng=2))


def test_motion_psf_impulse_and_size():
    k = d.motion_psf(0.0)
    assert k[k.shape[0] // 2, k.shape[1] // 2] == pytest.approx(1.0)
    big = d.motion_psf(6.0, 20.0, size=21)
    assert big.shape == (21, 21)
    np.testing.assert_allclose(_moments(big)[1], _moments(d.motion_psf(6.0, 20.0))[1],
                               atol=1e-4)
    with pytest.raises(InputError, match="odd"):
        d.motion_psf(6.0, size=20)
    with pytest.raises(InputError, match="too small"):
        d.motion_psf(20.0, size=5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(length=-1.0), "length"),
    (dict(length=float("nan")), "length"),
    (dict(length=5.0, speed_variation=1.0), "speed_variation"),
    (dict(length=50.0, curvature=1.0), "curvature"),
    (dict(length="long"), "length"),
])
def test_motion_psf_bad_input(kwargs, match):
    with pytest.raises(InputError, match=match):
        d.motion_psf(**kwargs)


def test_motion_blur_adds_no_shift_and_blurs_along_motion():
    img = np.zeros((61, 61), np.float32)
    img[30, 30] = 1000.0
    for angle in (0.0, 33.0, 90.0):
        out = d.motion_blur(img, 11.0, angle, curvature=0.05, speed_variation=0.4, rng=1)
        assert out.dtype == np.float32 and out.shape == img.shape
        assert out.sum() == pytest.approx(1000.0, rel=1e-4)
        cy, cx = ndimage.center_of_mass(out)
        assert abs(cy - 30) < 1e-2 and abs(cx - 30) < 1e-2
    # a horizontal line is unchanged by horizontal motion and smeared by vertical motion
    line = np.zeros((40, 80), np.float32)
    line[20] = 1.0
    np.testing.assert_allclose(d.motion_blur(line, 8.0, 0.0)[:, 10:-10], line[:, 10:-10],
                               atol=1e-5)
    assert d.motion_blur(line, 8.0, 90.0)[20].max() < 0.2


def test_convolve_psf_is_a_convolution():
    k = np.zeros((5, 5), np.float32)
    k[2, 2], k[2, 4] = 0.5, 0.5          # half the weight 2 px to the right (+x)
    img = np.zeros((21, 21), np.float32)
    img[10, 10] = 1.0
    out = d.convolve_psf(img, k)
    assert out[10, 12] == pytest.approx(0.5) and out[10, 8] == pytest.approx(0.0)
    with pytest.raises(InputError, match="odd"):
        d.convolve_psf(img, np.ones((4, 4), np.float32) / 16)
    with pytest.raises(InputError, match="2-D"):
        d.motion_blur(np.zeros((3, 8, 8)), 3.0)


# ---------------------------------------------------------------------------- noise
def test_poisson_gaussian_noise_statistics():
    flat = np.full((400, 400), 7.0)            # any units: only the mean matters
    dose, gain, offset, read = 20.0, 2.5, 100.0, 4.0
    out = d.poisson_gaussian_noise(flat, dose, gain=gain, offset=offset, read_noise=read, rng=0)
    assert out.dtype == np.float32 and out.shape == flat.shape
    var = gain ** 2 * dose + read ** 2
    n = out.size
    assert abs(out.mean() - (gain * dose + offset)) < 4 * math.sqrt(var / n)
    assert out.var() == pytest.approx(var, rel=0.03)
    # pure shot noise: integer counts, variance = mean
    counts = d.poisson_gaussian_noise(flat, 3.0, rng=1)
    np.testing.assert_array_equal(counts, np.round(counts))
    assert counts.var() == pytest.approx(counts.mean(), rel=0.03)
    assert counts.mean() == pytest.approx(3.0, rel=0.02)


def test_poisson_gaussian_noise_scales_to_the_mean_dose():
    img = np.zeros((200, 200))
    img[:, :100], img[:, 100:] = 1.0, 3.0      # mean 2 -> halves at dose/2 and 3 dose/2
    out = d.poisson_gaussian_noise(img, 40.0, rng=2)
    assert out[:, :100].mean() == pytest.approx(20.0, rel=0.02)
    assert out[:, 100:].mean() == pytest.approx(60.0, rel=0.02)
    assert out[:, 100:].var() == pytest.approx(60.0, rel=0.06)


def test_poisson_gaussian_counts_and_determinism():
    lam = np.full((50, 50), 5.0)
    a = d.poisson_gaussian_counts(lam, read_noise=1.0, rng=7)
    np.testing.assert_array_equal(a, d.poisson_gaussian_counts(lam, read_noise=1.0, rng=7))
    assert not np.array_equal(a, d.poisson_gaussian_counts(lam, read_noise=1.0, rng=8))
    zero = d.poisson_gaussian_counts(np.zeros((8, 8)), gain=3.0, offset=10.0, rng=0)
    np.testing.assert_array_equal(zero, 10.0)
    gen = np.random.default_rng(5)
    first = d.poisson_gaussian_counts(lam, rng=gen)
    assert not np.array_equal(first, d.poisson_gaussian_counts(lam, rng=gen))  # stream advances


@pytest.mark.parametrize("call, match", [
    (lambda: d.poisson_gaussian_noise(-np.ones((4, 4)), 10), "non-negative"),
    (lambda: d.poisson_gaussian_noise(np.zeros((4, 4)), 10), "all zeros"),
    (lambda: d.poisson_gaussian_noise(np.ones((4, 4)), 0.0), "dose"),
    (lambda: d.poisson_gaussian_noise(np.ones((4, 4)), 5, gain=0), "gain"),
    (lambda: d.poisson_gaussian_noise(np.ones((4, 4)), 5, read_noise=-1), "read_noise"),
    (lambda: d.poisson_gaussian_noise(np.full((4, 4), np.nan), 5), "NaN"),
    (lambda: d.poisson_gaussian_counts(np.array([-1.0, 2.0])), "non-negative"),
    (lambda: d.poisson_gaussian_counts(np.ones(3), rng="seed"), "rng"),
])
def test_noise_bad_input(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_beam_drift_is_smooth_and_bounded():
    frames = np.full((12, 64, 64), 50.0, np.float32)
    out = d.beam_drift(frames, 0.2, rng=3)
    factor = out / frames
    assert out.shape == frames.shape and out.dtype == np.float32
    assert factor.min() >= 1 - 1.5 * 0.2 - 1e-6 and factor.max() <= 1 + 1.5 * 0.2 + 1e-6
    per_frame = factor.mean(axis=(1, 2))
    assert np.ptp(per_frame) > 0.02                          # it does drift over time
    assert np.abs(np.diff(per_frame)).max() < 0.2 * 2 * np.pi * 1.0 / 11 + 1e-6  # smoothly
    # a gentle, linear spatial gradient: its Laplacian vanishes
    assert np.abs(ndimage.laplace(factor[5].astype(np.float64))[1:-1, 1:-1]).max() < 1e-4
    ref = d.beam_drift(frames, 0.2, reference=4, rng=3)
    np.testing.assert_allclose(ref[4], frames[4], rtol=1e-6)
    np.testing.assert_array_equal(d.beam_drift(frames, 0.0, rng=1), frames)
    with pytest.raises(InputError, match="amplitude"):
        d.beam_drift(frames, 0.8)
    with pytest.raises(InputError, match="3-D"):
        d.beam_drift(frames[0], 0.1)
    with pytest.raises(InputError, match="reference"):
        d.beam_drift(frames, 0.1, reference=12)


# ---------------------------------------------------------------------------- defocus
@pytest.mark.parametrize("psf", ["gaussian", "diffraction", "airy"])
def test_defocus_psf_normalised_centred_and_growing(psf):
    widths = []
    for amount in (0.0, 2.0, 5.0, 10.0):
        k = d.defocus_psf(amount, psf)
        assert k.dtype == np.float32 and k.shape[0] % 2 == 1
        assert abs(float(k.sum()) - 1.0) < 1e-5 and k.min() >= -1e-7
        centroid, cov = _moments(k)
        assert np.abs(centroid).max() < 1e-4
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-6)
        widths.append(math.sqrt(cov[0, 0]))
    assert all(b > a for a, b in zip(widths, widths[1:]))
    if psf == "gaussian":
        assert widths[-1] == pytest.approx(10.0, rel=0.02)    # sigma = amount
    else:
        assert widths[-1] == pytest.approx(5.0, rel=0.15)     # disk of radius R: std R / 2


def test_defocus_blurs_more_with_amount(rng):
    img = _texture(rng, (96, 96))
    grads = [np.abs(np.diff(d.defocus(img, a, psf=p), axis=1)).mean()
             for p in ("gaussian", "diffraction") for a in (1.0, 3.0, 6.0)]
    assert grads[0] > grads[1] > grads[2] and grads[3] > grads[4] > grads[5]
    assert d.defocus(img, 3.0).mean() == pytest.approx(img.mean(), rel=1e-3)
    with pytest.raises(InputError, match="psf"):
        d.defocus_psf(2.0, "lorentz")
    with pytest.raises(InputError, match="airy_radius"):
        d.defocus_psf(2.0, "airy", airy_radius=0.5)
    with pytest.raises(InputError, match="amount"):
        d.defocus(img, -1.0)


# ---------------------------------------------------------------------------- down-sampling
def test_downsample2x_area_and_subsample_exact():
    a = np.arange(5 * 7, dtype=np.float64).reshape(5, 7)
    out = d.downsample2x(a)
    assert out.shape == (2, 3) and out.dtype == np.float32
    expected = np.array([[(a[y, x] + a[y, x + 1] + a[y + 1, x] + a[y + 1, x + 1]) / 4
                          for x in (0, 2, 4)] for y in (0, 2)])
    np.testing.assert_allclose(out, expected)
    np.testing.assert_array_equal(d.downsample2x(a, method="subsample"), a[0:4:2, 0:6:2])
    stack = np.stack([a, 2 * a])
    np.testing.assert_allclose(d.downsample2x(stack)[1], 2 * expected)
    flat = np.full((8, 10), 3.0)
    np.testing.assert_allclose(d.downsample2x(flat, method="bicubic"), 3.0, rtol=1e-6)
    assert d.downsample2x(stack, method="bicubic").shape == (2, 2, 3)
    with pytest.raises(InputError, match="method"):
        d.downsample2x(a, method="lanczos")
    with pytest.raises(InputError, match="at least 2x2"):
        d.downsample2x(np.ones((1, 5)))


# ---------------------------------------------------------------------------- ssTEM artefacts
def test_fold_mask_matches_the_dark_band(rng):
    img = _texture(rng, (128, 128))
    out, mask = d.fold(img, rng=1, width=10.0, darkness=0.5, displacement=0.0, angle=20.0)
    assert out.dtype == np.float32 and mask.dtype == bool and mask.shape == img.shape
    changed = np.abs(out - img) > 1e-3
    np.testing.assert_array_equal(changed, mask)
    # inside the band the film is doubled: intensity halved (away from its soft edges)
    core = ndimage.binary_erosion(mask, iterations=2)
    np.testing.assert_allclose(out[core] / img[core], 0.5, rtol=1e-5)
    # the band is a curve crossing the image roughly along `angle`
    ys, xs = np.nonzero(mask)
    slope = math.degrees(math.atan2(np.cov(xs, ys)[0, 1], np.cov(xs, ys)[0, 0])) % 180
    assert abs((slope - 20.0 + 90) % 180 - 90) < 25
    assert 0.03 < mask.mean() < 0.2


def test_fold_displacement_pulls_one_side(rng):
    img = _texture(rng, (128, 128))
    flat_out, mask = d.fold(img, rng=5, width=8.0, darkness=0.6, displacement=0.0)
    out, mask2 = d.fold(img, rng=5, width=8.0, darkness=0.6, displacement=6.0)
    np.testing.assert_array_equal(mask, mask2)           # same fold geometry
    moved = (np.abs(out - flat_out) > 1e-3) & ~mask
    assert moved.mean() > 0.05
    # only one side of the band moved: the moved pixels form one connected region touching it
    labels, n = ndimage.label(~mask)
    sides = {int(v) for v in np.unique(labels[moved])} - {0}
    assert len(sides) == 1
    np.testing.assert_array_equal(d.fold(img, rng=9)[0], d.fold(img, rng=9)[0])
    with pytest.raises(InputError, match="darkness"):
        d.fold(img, darkness=1.5)
    with pytest.raises(InputError, match="width"):
        d.fold(img, width=(5, 2))


def test_precipitates_mask_covers_the_change(rng):
    img = _texture(rng, (128, 128))
    out, mask = d.precipitates(img, rng=2, count=5, radius=(3.0, 6.0), darkness=0.9)
    changed = np.abs(out - img) > 1e-4
    assert mask.any()
    assert not (changed & ~mask).any()
    assert (changed & mask).sum() >= 0.95 * mask.sum()
    # blobs are dark: inside their cores the intensity is near (1 - darkness) * p1
    core = ndimage.binary_erosion(mask, iterations=2)
    assert core.any()
    assert out[core].max() <= 0.1 * np.percentile(img, 1) + 1e-3
    none, empty = d.precipitates(img, rng=2, count=0)
    np.testing.assert_array_equal(none, img)
    assert not empty.any()
    np.testing.assert_array_equal(d.precipitates(img, rng=4)[0], d.precipitates(img, rng=4)[0])
    with pytest.raises(InputError, match="count"):
        d.precipitates(img, count=2.5)
    with pytest.raises(InputError, match="at least 8x8"):
        d.precipitates(np.ones((4, 4)))


def test_missing_section():
    stack = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    out, mask = d.missing_section(stack, 1)
    assert out.dtype == np.float32 and mask.tolist() == [False, True, False, False]
    np.testing.assert_array_equal(out[1], 0)
    np.testing.assert_array_equal(out[[0, 2, 3]], stack[[0, 2, 3]])
    out, mask = d.missing_section(stack, [-1, 0], fill="mean")
    assert mask.tolist() == [True, False, False, True]
    np.testing.assert_allclose(out[3], stack[1:3].mean())
    out, _ = d.missing_section(stack, 2, fill="nan")
    assert np.isnan(out[2]).all() and not np.isnan(out[[0, 1, 3]]).any()
    assert stack[1].sum() > 0                                      # input untouched
    with pytest.raises(InputError, match="index"):
        d.missing_section(stack, 4)
    with pytest.raises(InputError, match="index"):
        d.missing_section(stack, 1.5)
    with pytest.raises(InputError, match="fill"):
        d.missing_section(stack, 1, fill="drop")
    with pytest.raises(InputError, match="3-D"):
        d.missing_section(stack[0], 0)


# ---------------------------------------------------------------------------- bursts
def _xcorr_shift(reference: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """(dy, dx) with frame(y + dy, x + dx) ~ reference(y, x), by plain cross-correlation (its
    peak is only good to about half a pixel on motion-blurred frames: a flat-topped peak)."""
    shift, _, _ = phase_cross_correlation(reference, frame, upsample_factor=20,
                                          normalization=None)
    return -shift


def _fitted_shift(burst: "d.Burst", t: int, image: np.ndarray) -> np.ndarray:
    """Shift of frame ``t`` found independently of the simulator: blur ``image`` with the
    frame's own (straight) motion kernel, then find the sub-pixel offset at which it matches
    the frame best (least squares, cubic interpolation), starting from cross-correlation."""
    from scipy import optimize
    y0, x0 = burst.params["origin"]
    ny, nx = burst.frames.shape[1:]
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    blurred = d.motion_blur(image, burst.params["blur_lengths"][t],
                            burst.params["blur_angles"][t]).astype(np.float64)
    blurred *= burst.params["counts_per_unit"] * burst.params["gain"]
    target = burst.frames[t] - burst.params["offset"]

    def misfit(s: np.ndarray) -> float:
        model = ndimage.map_coordinates(blurred, [y0 + yy - s[0], x0 + xx - s[1]], order=3)
        return float(((model - target) ** 2).mean())

    start = _xcorr_shift(burst.ground_truth, burst.frames[t])
    return optimize.minimize(misfit, start, method="Nelder-Mead",
                             options={"xatol": 1e-3, "fatol": 1e-10}).x


def test_simulate_burst_shapes_and_ground_truth(rng):
    img = _texture(rng, (200, 160))
    b = d.simulate_burst(img, 5, shape=(64, 64), dose=30.0, gain=2.0, offset=100.0, rng=0)
    assert b.frames.shape == (5, 64, 64) and b.frames.dtype == np.float32
    assert b.ground_truth.shape == (64, 64) and b.ground_truth.dtype == np.float32
    assert b.shifts.shape == (5, 2) and b.reference == 2
    np.testing.assert_array_equal(b.shifts[2], 0.0)
    # the stage moves mostly along Y (90 deg), several px per frame
    assert np.all(np.abs(np.diff(b.shifts[:, 0])) > 3)
    assert np.abs(b.shifts[:, 1]).max() < np.abs(b.shifts[:, 0]).max()
    assert b.ground_truth.mean() == pytest.approx(2.0 * 30.0 + 100.0, rel=1e-4)
    assert b.frames.mean() == pytest.approx(b.ground_truth.mean(), rel=0.03)
    json.dumps(b.params)
    assert len(b.params["blur_lengths"]) == 5 and b.params["dose"] == 30.0
    # the ground truth is the clean crop at the reference frame's origin
    y0, x0 = b.params["origin"]
    scale = b.params["counts_per_unit"]
    np.testing.assert_allclose(b.ground_truth, 2.0 * scale * img[y0:y0 + 64, x0:x0 + 64] + 100,
                               rtol=1e-5)
    again = d.simulate_burst(img, 5, shape=(64, 64), dose=30.0, gain=2.0, offset=100.0, rng=0)
    np.testing.assert_array_equal(b.frames, again.frames)
    other = d.simulate_burst(img, 5, shape=(64, 64), rng=1)
    assert not np.array_equal(b.shifts, other.shifts)


def test_simulate_burst_frames_follow_shifts(rng):
    img = _texture(rng, (220, 220), sigma=2.0)
    sharp = d.simulate_burst(img, 5, shape=(96, 96), blur_length=0.0, noise=False,
                             position_jitter=1.5, rng=3)
    np.testing.assert_array_equal(sharp.frames[sharp.reference], sharp.ground_truth)
    # without blur, frame t is the scaled image sampled (linear interpolation) at the
    # reference frame's positions moved by -shift: frames[t](y + dy, x + dx) = gt(y, x)
    y0, x0 = sharp.params["origin"]
    yy, xx = np.mgrid[:96, :96].astype(np.float64)
    scaled = img.astype(np.float64) * sharp.params["counts_per_unit"]
    assert np.abs(sharp.shifts - np.round(sharp.shifts)).max() > 0.1      # sub-pixel
    for t in range(5):
        dy, dx = sharp.shifts[t]
        expected = ndimage.map_coordinates(scaled, [y0 + yy - dy, x0 + xx - dx], order=1)
        np.testing.assert_allclose(sharp.frames[t], expected, rtol=1e-5)
    # with blur the content still sits where the shifts say (the blur adds no shift)
    blurred = d.simulate_burst(img, 5, shape=(96, 96), blur_length=8.0, blur_angle=70.0,
                               curvature=0.0, speed_variation=0.0, noise=False, rng=4)
    assert np.abs(blurred.shifts).max() > 10
    for t in range(5):
        np.testing.assert_allclose(_xcorr_shift(blurred.ground_truth, blurred.frames[t]),
                                   blurred.shifts[t], atol=0.75)
        np.testing.assert_allclose(_fitted_shift(blurred, t, img), blurred.shifts[t],
                                   atol=0.05)


def test_simulate_burst_on_real_sstem():
    import tifffile
    path = shared_file("sstem/isbi2012_train_volume.tif")
    img = tifffile.imread(path, key=3).astype(np.float32)[:256, :256]
    b = d.simulate_burst(img, 5, shape=(128, 128), blur_length=10.0, curvature=0.0,
                         speed_variation=0.0, noise=False, rng=11)
    for t in range(5):
        np.testing.assert_allclose(_fitted_shift(b, t, img), b.shifts[t], atol=0.05)
    noisy = d.simulate_burst(img, 5, shape=(128, 128), dose=20.0, rng=11)
    np.testing.assert_array_equal(noisy.frames, np.round(noisy.frames))     # counts
    assert noisy.frames.mean() == pytest.approx(20.0, rel=0.05)


def test_simulate_burst_options(rng):
    img = _texture(rng, (160, 160))
    full = d.simulate_burst(img, 3, blur_length=6.0, rng=2)
    assert full.frames.shape[1] < 160 and full.frames.shape[2] <= 160
    b = d.simulate_burst(img, 4, shape=(48, 48), reference=0, origin=(60, 50),
                         blur_angle=0.0, angle_jitter=0.0, rng=2)
    assert b.reference == 0 and b.params["origin"] == [60, 50]
    assert np.abs(b.shifts[:, 0]).max() < 3 and np.abs(b.shifts[:, 1]).max() > 10
    calm = d.simulate_burst(img, 3, shape=(48, 48), noise=False, rng=5)
    drift = d.simulate_burst(img, 3, shape=(48, 48), noise=False, drift=0.3, rng=5)
    np.testing.assert_allclose(drift.frames[1], calm.frames[1], rtol=1e-5)  # reference kept
    assert not np.allclose(drift.frames[0], calm.frames[0], rtol=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_frames=0), "n_frames"),
    (dict(reference=5), "reference"),
    (dict(shape=(150, 150)), "do not fit"),
    (dict(shape=(4, 4)), "shape"),
    (dict(origin=(0, 0), shape=(40, 40)), "origin"),
    (dict(dose=-5.0), "dose"),
    (dict(blur_length=(9, 3)), "blur_length"),
    (dict(drift=0.9), "drift"),
])
def test_simulate_burst_bad_input(rng, kwargs, match):
    img = _texture(rng, (120, 120))
    kwargs = {"n_frames": 3, **kwargs}
    with pytest.raises(InputError, match=match):
        d.simulate_burst(img, rng=0, **kwargs)


def test_simulate_burst_bad_image():
    with pytest.raises(InputError, match="too small"):
        d.simulate_burst(np.ones((30, 30)), 5, blur_length=10.0, rng=0)
    with pytest.raises(InputError, match="non-negative"):
        d.simulate_burst(-np.ones((100, 100)), 3)
    with pytest.raises(InputError, match="2-D"):
        d.simulate_burst(np.ones((2, 100, 100)), 3)
