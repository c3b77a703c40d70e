"""Tests of burst registration (core/registration.py) on synthetic textures with known motion,
plus one real ssTEM crop."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from _shared import shared_file
from napari_microrestore.core import registration
from napari_microrestore.core.errors import Cancelled, CancelToken, InputError
from napari_microrestore.core.registration import (
    MOTIONS,
    RegistrationResult,
    coverage_mask,
    phase_correlation,
    prefilter_sigma,
    register_burst,
    warp_frames,
)

SIZE = 128


# ------------------------------------------------------------------ synthetic data helpers
def periodic_texture(rng: np.random.Generator, n: int, sigma: float = 2.0) -> np.ndarray:
    """Smoothed white noise that is periodic in both axes (so Fourier shifts are exact)."""
    f = np.fft.fftfreq(n)
    gauss = np.exp(-2 * np.pi ** 2 * sigma ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    tex = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * gauss).real
    return (100.0 + 20.0 * tex / tex.std()).astype(np.float32)


def fourier_shift(img: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``out(y, x) = img(y - dy, x - dx)`` for a periodic image, exact for any sub-pixel shift."""
    ky = np.fft.fftfreq(img.shape[0])[:, None]
    kx = np.fft.fftfreq(img.shape[1])[None, :]
    ramp = np.exp(-2j * np.pi * (ky * dy + kx * dx))
    return np.fft.ifft2(np.fft.fft2(img) * ramp).real.astype(np.float32)


def translated_burst(base: np.ndarray, shifts, size: int = SIZE) -> np.ndarray:
    """Frames cropped from the centre of ``base`` after shifting it by each (dy, dx)."""
    o = (base.shape[0] - size) // 2
    return np.stack([fourier_shift(base, dy, dx)[o:o + size, o:o + size] for dy, dx in shifts])


def as3x3(a: np.ndarray) -> np.ndarray:
    return np.vstack([a, [0.0, 0.0, 1.0]])


def warped_burst(base: np.ndarray, transforms, size: int = SIZE):
    """Frames ``frame_t(x) = base(A_t (x + o))`` cropped at offset o (quintic spline on the
    periodic texture, at exact coordinates), and the true transforms from the first frame to
    each frame."""
    o = (base.shape[0] - size) // 2
    grid = np.stack([*np.meshgrid(np.arange(size) + o, np.arange(size) + o), np.ones((size, size))])
    frames, truth = [], []
    shift_o = np.array([[1.0, 0, o], [0, 1.0, o], [0, 0, 1.0]])
    for a in transforms:
        sx, sy = np.tensordot(np.asarray(a, np.float64), grid, 1)
        frames.append(ndimage.map_coordinates(base, [sy, sx], order=5, mode="grid-wrap"))
        # frame_t(B x) = frame_0(x)  <=>  B = T(-o) A_t^-1 A_0 T(o)
        b = np.linalg.inv(shift_o) @ np.linalg.inv(as3x3(a)) @ as3x3(transforms[0]) @ shift_o
        truth.append(b[:2])
    return np.stack(frames).astype(np.float32), np.stack(truth)


def max_point_error(a: np.ndarray, b: np.ndarray, size: int = SIZE) -> float:
    """Largest distance (px) between where two 2x3 transforms send a grid over the frame."""
    g = np.linspace(0, size - 1, 9)
    pts = np.stack([*np.meshgrid(g, g), np.ones((9, 9))], -1).reshape(-1, 3)
    return float(np.linalg.norm(pts @ (a - b).T, axis=1).max())


@pytest.fixture
def base(rng) -> np.ndarray:
    return periodic_texture(rng, 192)


# ------------------------------------------------------------------ phase correlation
def test_phase_correlation_sign_convention_and_subpixel(base):
    moved = fourier_shift(base, 5.3, -12.7)
    dy, dx, peak = phase_correlation(base, moved, window=False)
    assert (dy, dx) == pytest.approx((5.3, -12.7), abs=0.051)
    assert peak > 0.3
    # the convention: image(y, x) ~= reference(y - dy, x - dx)
    assert np.abs(moved[20:-20, 20:-20] - np.roll(base, (5, -13), (0, 1))[20:-20, 20:-20]).mean() \
        < np.abs(moved[20:-20, 20:-20] - np.roll(base, (-5, 13), (0, 1))[20:-20, 20:-20]).mean()


def test_phase_correlation_windowed_large_shift(base):
    # shift of a third of the frame, non-periodic crops
    frames = translated_burst(base, [(0.0, 0.0), (-42.4, 17.6)])
    dy, dx, _ = phase_correlation(frames[0], frames[1])
    assert (dy, dx) == pytest.approx((-42.4, 17.6), abs=0.25)


def test_phase_correlation_unrelated_images_have_low_peak(rng, base):
    _, _, peak_same = phase_correlation(base, fourier_shift(base, 3, 4))
    _, _, peak_noise = phase_correlation(base, rng.standard_normal(base.shape))
    assert peak_noise < 0.1 < peak_same


@pytest.mark.parametrize("args, match", [
    ((np.zeros((8, 8)), np.zeros((8, 9))), "same shape"),
    ((np.zeros((2, 8, 8)), np.zeros((2, 8, 8))), "2-D"),
    ((np.full((8, 8), np.nan), np.zeros((8, 8))), "NaN"),
])
def test_phase_correlation_bad_input(args, match):
    with pytest.raises(InputError, match=match):
        phase_correlation(*args)


def test_phase_correlation_bad_parameters(base):
    with pytest.raises(InputError, match="upsample"):
        phase_correlation(base, base, upsample=0)
    with pytest.raises(InputError, match="lowpass"):
        phase_correlation(base, base, lowpass=-1.0)


def test_phase_correlation_lowpass_rescues_noisy_images(rng):
    # whitening gives noise-only frequencies full weight; the low-pass weighting keeps them out
    errors = {0.0: [], 3.0: []}
    for _ in range(6):
        base = periodic_texture(rng, 192, sigma=2.0)
        a, b = translated_burst(base, [(0.0, 0.0), (6.5, -9.25)])
        a, b = (x + rng.normal(0, 2.0 * base.std(), x.shape) for x in (a, b))
        for lowpass, errs in errors.items():
            dy, dx, _ = phase_correlation(a, b, lowpass=lowpass)
            errs.append(np.hypot(dy - 6.5, dx + 9.25))
    assert max(errors[3.0]) < 0.5 < max(errors[0.0])


# ------------------------------------------------------------------ register_burst: accuracy
def test_translation_subpixel(base):
    true = np.array([(0.3, -1.7), (2.25, 3.6), (0.0, 0.0), (-4.45, 0.8), (1.1, -2.9)])
    frames = translated_burst(base, true)
    res = register_burst(frames)
    assert isinstance(res, RegistrationResult)
    assert res.reference == 2 and res.motion == "translation"
    np.testing.assert_allclose(res.shifts, true - true[2], atol=0.05)
    assert res.converged.all() and res.messages == []
    assert res.ecc[2] == 1.0 and (res.ecc > 0.95).all()
    assert res.aligned.shape == frames.shape and res.aligned.dtype == np.float32
    assert res.transforms.shape == (5, 2, 3) and res.transforms.dtype == np.float64
    # the aligned frames agree with the reference where every frame is covered (up to the
    # smoothing of linear interpolation; a 1 px misalignment gives ~50 % of the std)
    core = res.coverage
    assert np.abs(res.aligned[:, core] - frames[2][core]).mean() < 0.05 * frames.std()


def test_large_shift_a_third_of_the_frame(base):
    true = np.array([(-42.0, 6.3), (0.0, 0.0), (41.6, -9.2)])
    res = register_burst(translated_burst(base, true), motion="translation")
    np.testing.assert_allclose(res.shifts, true - true[1], atol=0.05)
    assert res.converged.all()


@pytest.mark.parametrize("motion", ["euclidean", "affine"])
def test_rotation_and_affine_recovered(base, motion):
    c = (base.shape[1] - 1) / 2.0
    mats = [np.eye(2, 3)]
    for angle, t in [(2.0, (3.2, -1.4)), (-1.5, (-2.1, 4.7))]:
        # euclidean: rotation + shift; affine: also a 2 % scale and a shear
        m = cv2.getRotationMatrix2D((c, c), angle, 1.0 if motion == "euclidean" else 1.02)
        if motion == "affine":
            m[0, 1] += 0.015
        m[:, 2] += t
        mats.append(m)
    frames, truth = warped_burst(base, mats)
    res = register_burst(frames, reference=0, motion=motion)
    assert res.converged.all()
    for t in range(3):
        assert max_point_error(res.transforms[t], truth[t]) < 0.1
    if motion == "euclidean":  # rigid: the linear part stays a rotation
        lin = res.transforms[:, :, :2]
        np.testing.assert_allclose(np.linalg.det(lin), 1.0, atol=1e-6)


@pytest.mark.parametrize("motion", MOTIONS)
@pytest.mark.parametrize("levels", [1, 2])
def test_pyramid_and_full_resolution_polish(base, motion, levels, monkeypatch):
    # ECC stops at pyramid level `levels`; the full-resolution Gauss-Newton polish must bring
    # the estimate to full-resolution accuracy
    c = (base.shape[1] - 1) / 2.0
    mats = [np.eye(2, 3)]
    for angle, t in [(1.0, (4.3, -2.6)), (-0.5, (-3.7, 1.45))]:
        m = cv2.getRotationMatrix2D((c, c), angle if motion != "translation" else 0.0, 1.0)
        m[:, 2] += t
        mats.append(m)
    frames, truth = warped_burst(base, mats)
    res = register_burst(frames, reference=0, motion=motion, levels=levels)
    assert res.converged.all()
    errors = [max_point_error(res.transforms[t], truth[t]) for t in (1, 2)]
    assert max(errors) < 0.05
    if levels == 2:  # without the polish, ECC on 32x32-pixel images is far less accurate
        monkeypatch.setattr(registration, "_POLISH_STEPS", 0)
        coarse = register_burst(frames, reference=0, motion=motion, levels=levels)
        coarse_errors = [max_point_error(coarse.transforms[t], truth[t]) for t in (1, 2)]
        assert max(coarse_errors) > 3 * max(errors)


def test_translation_gauss_newton_levels_agree_with_ecc_fallback(rng, monkeypatch):
    # a translation is refined at the pyramid levels by Gauss-Newton steps of the ECC
    # objective; with no steps allowed, cv2.findTransformECC (the fallback) does it instead
    base = periodic_texture(rng, 384, sigma=1.5)
    true = np.array([(0.35, -1.8), (0.0, 0.0), (-6.4, 3.15), (12.7, -9.05)])
    frames = translated_burst(base, true, size=256)
    frames += rng.normal(0.0, 4.0, frames.shape).astype(np.float32)
    fast = register_burst(frames, reference=1, levels=2)
    assert fast.converged.all()
    np.testing.assert_allclose(fast.shifts, true - true[1], atol=0.05)
    monkeypatch.setattr(registration, "_LEVEL_STEPS", 0)
    ecc = register_burst(frames, reference=1, levels=2)
    assert ecc.converged.all()
    np.testing.assert_allclose(ecc.shifts, true - true[1], atol=0.05)
    np.testing.assert_allclose(fast.shifts, ecc.shifts, atol=0.05)


@pytest.mark.parametrize("motion", MOTIONS)
def test_ecc_score_matches_full_resolution_correlation(rng, base, motion):
    # the score is measured on every 4th row; it must agree with the zero-mean normalised
    # correlation of the pre-filtered frames over every covered pixel, up to the sampling
    # error of ~(1 - ecc^2) / sqrt(pixels sampled) (a wrong row mapping would decorrelate)
    angle = 0.0 if motion == "translation" else 2.0
    c = (base.shape[1] - 1) / 2.0
    mats = [np.eye(2, 3), cv2.getRotationMatrix2D((c, c), angle, 1.0)]
    mats[1][:, 2] += (3.3, -2.2)
    frames, _ = warped_burst(base, mats)
    frames += rng.normal(0.0, 30.0, frames.shape).astype(np.float32)
    res = register_burst(frames, reference=0, motion=motion)
    f0, f1 = (cv2.GaussianBlur(f, (0, 0), res.sigma) for f in frames)
    warped = warp_frames(np.stack([f0, f1]), res.transforms)[1]
    valid = coverage_mask(res.transforms[1:], f0.shape)
    a, b = f0[valid] - f0[valid].mean(), warped[valid] - warped[valid].mean()
    full = float(a @ b / np.sqrt((a @ a) * (b @ b)))
    assert 0.8 < full < 0.95 and abs(res.ecc[1] - full) < 0.015


def test_noisy_blurred_frames(rng):
    base = periodic_texture(rng, 192, sigma=1.5)
    true = np.array([(3.4, -7.8), (-1.25, 2.6), (0.0, 0.0), (6.7, 1.05)])
    frames = translated_burst(base, true)
    kernel = np.zeros((9, 9), np.float32)
    kernel[:, 4] = 1.0 / 9  # centred vertical motion blur: no shift
    counts = np.stack([cv2.filter2D(f, -1, kernel, borderType=cv2.BORDER_REFLECT) for f in frames])
    counts *= 12.0 / counts.mean()  # ~12 photons per pixel
    noisy = rng.poisson(np.clip(counts, 0, None)).astype(np.uint16)
    res = register_burst(noisy)
    assert res.sigma > 1.0  # the pre-filter grew with the noise
    np.testing.assert_allclose(res.shifts, true - true[2], atol=0.2)
    assert res.converged.all()
    # intensities stay in counts: no normalisation
    assert abs(res.aligned[2].mean() - noisy[2].mean()) < 1e-3


def test_prefilter_sigma_grows_with_noise(rng, base):
    clean = prefilter_sigma(base)
    noisy = prefilter_sigma(base + rng.normal(0, 20, base.shape))
    assert 1.0 <= clean < noisy <= 4.0


@pytest.mark.data
def test_real_sstem_crop():
    section = tifffile.imread(shared_file("sstem/isbi2012_train_volume.tif"), key=5)
    crop = section[128:384, 128:384].astype(np.float32)
    # a real section has no periodic extension: shift it by resampling, keep the inner part
    true = np.array([(0.0, 0.0), (7.4, -3.3), (-11.6, 5.75)])
    frames = []
    for dy, dx in true:
        m = np.array([[1.0, 0, dx], [0, 1.0, dy]])
        frames.append(cv2.warpAffine(crop, m, (256, 256), flags=cv2.INTER_CUBIC)[32:-32, 32:-32])
    res = register_burst(np.stack(frames), reference=0)
    np.testing.assert_allclose(res.shifts, true, atol=0.1)
    assert res.converged.all()


# ------------------------------------------------------------------ result structure
def test_coverage_mask_matches_known_shifts(base):
    true = np.array([(0.0, 0.0), (5.25, -3.25), (-7.75, 9.25)])
    res = register_burst(translated_burst(base, true), reference=0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    expected = np.ones((SIZE, SIZE), bool)
    boundary = np.zeros((SIZE, SIZE), bool)
    for dy, dx in true:
        sy, sx = yy + dy, xx + dx  # where each reference pixel lies in the frame
        expected &= (sy >= 0) & (sy <= SIZE - 1) & (sx >= 0) & (sx <= SIZE - 1)
        for s in (sy, sx):  # pixels within 0.1 px of a frame edge may go either way
            boundary |= (np.abs(s) < 0.1) | (np.abs(s - (SIZE - 1)) < 0.1)
    assert np.array_equal(res.coverage[~boundary], expected[~boundary])
    assert 0.7 < res.coverage.mean() < 0.95
    np.testing.assert_array_equal(coverage_mask(res.transforms, (SIZE, SIZE)), res.coverage)


def test_reference_frame_is_identity_and_unchanged(base):
    frames = translated_burst(base, [(1.5, 2.0), (0.0, 0.0), (-2.0, 1.0), (3.0, -3.0)])
    res = register_burst(frames.astype(np.float64), reference=-1)
    assert res.reference == 3
    np.testing.assert_array_equal(res.transforms[3], np.eye(2, 3))
    np.testing.assert_array_equal(res.aligned[3], frames[3])
    assert res.ecc[3] == 1.0 and res.converged[3]


def test_pure_noise_frame_is_flagged_not_dropped(rng, base):
    frames = translated_burst(base, [(1.0, 2.0), (0.0, 0.0), (-2.0, 1.5), (0.5, 0.5)])
    frames[2] = rng.normal(100, 20, (SIZE, SIZE))
    res = register_burst(frames, reference=1)
    assert res.converged.tolist() == [True, True, False, True]
    assert len(res.messages) == 1 and res.messages[0].startswith("frame 2 ")
    assert res.ecc[2] < 0.2 < res.ecc[[0, 1, 3]].min()
    assert res.aligned.shape[0] == 4 and np.isfinite(res.aligned).all()


def test_results_follow_the_frame_order(base):
    true = np.array([(0.0, 0.0), (2.5, -1.5), (-3.25, 4.0), (6.0, 0.75)])
    frames = translated_burst(base, true)
    res = register_burst(frames, reference=0)
    perm = np.array([2, 0, 3, 1])  # the reference (old 0) moves to index 1
    res_p = register_burst(frames[perm], reference=1)
    np.testing.assert_allclose(res_p.transforms, res.transforms[perm], atol=1e-3)
    np.testing.assert_allclose(res_p.ecc, res.ecc[perm], atol=1e-4)
    np.testing.assert_allclose(res_p.aligned, res.aligned[perm], atol=0.05)


def test_to_dict_is_json_and_warp_frames_reproduces_aligned(base):
    frames = translated_burst(base, [(1.25, -2.5), (0.0, 0.0), (-3.5, 0.75)])
    res = register_burst(frames, motion="euclidean")
    d = json.loads(json.dumps(res.to_dict()))
    assert d["reference"] == 1 and d["motion"] == "euclidean"
    assert d["converged"] == [True, True, True] and len(d["ecc"]) == 3
    np.testing.assert_allclose(d["shifts"], res.shifts)
    np.testing.assert_allclose(np.asarray(d["shifts"])[:, 0], res.transforms[:, 1, 2])
    again = warp_frames(frames, d["transforms"])
    np.testing.assert_array_equal(again, res.aligned)


def test_warp_frames_fill_constant_marks_uncovered(base):
    frames = translated_burst(base, [(0.0, 0.0), (4.5, -6.25)])
    tr = np.stack([np.eye(2, 3), [[1.0, 0, -6.25], [0, 1.0, 4.5]]])
    out = warp_frames(frames, tr, fill=np.nan)
    covered = coverage_mask(tr[1:], (SIZE, SIZE))
    assert np.isnan(out[1][~covered]).all() and np.isfinite(out[1][covered]).all()
    edge = warp_frames(frames, tr)  # default: edge-replicate, finite everywhere
    assert np.isfinite(edge).all()
    np.testing.assert_allclose(edge[1][covered], out[1][covered])
    # the warped frame matches the reference where covered (cubic for accuracy)
    cubic = warp_frames(frames, tr, interpolation="cubic")
    assert np.abs(cubic[1][covered] - frames[0][covered]).mean() < 0.03 * frames.std()
    # integer shifts: the last covered row / column is exactly on the frame edge
    whole = warp_frames(frames, [np.eye(2, 3), [[1.0, 0, 3.0], [0, 1.0, -2.0]]], fill=np.nan)
    assert np.isnan(whole[1]).sum() == SIZE * SIZE - (SIZE - 3) * (SIZE - 2)


# ------------------------------------------------------------------ progress, cancel, readers
def test_progress_is_reported_per_frame(base):
    frames = translated_burst(base, [(0.0, 0.0), (1.0, 1.0), (2.0, -1.0)])
    calls = []
    register_burst(frames, progress=lambda f, msg: calls.append((f, msg)))
    fractions = [f for f, _ in calls]
    assert len(calls) == 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(isinstance(msg, str) and msg for _, msg in calls)


def test_cancel_raises_between_frames(base):
    frames = translated_burst(base, [(0.0, 0.0), (1.0, 1.0), (2.0, -1.0), (1.0, 3.0)])
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        register_burst(frames, cancel=token)
    token = CancelToken()
    seen = []

    def cancel_after_first(fraction: float, message: str) -> None:
        seen.append(fraction)
        token.cancel()

    with pytest.raises(Cancelled):
        register_burst(frames, progress=cancel_after_first, cancel=token)
    assert len(seen) == 1


class LazyStack:
    """Reader-like object: shape, dtype and per-frame __getitem__, counting reads."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, 0

    def __getitem__(self, t: int) -> np.ndarray:
        self.reads += 1
        return self.data[t]


def test_lazy_reader_is_read_once_per_frame(base):
    frames = np.round(translated_burst(base, [(0.0, 0.0), (2.5, 1.0), (-1.0, 3.5)])) \
        .astype(np.uint16)
    lazy = LazyStack(frames)
    res = register_burst(lazy)
    assert lazy.reads == 3
    ref = register_burst(frames)
    np.testing.assert_array_equal(res.transforms, ref.transforms)
    np.testing.assert_array_equal(res.aligned, ref.aligned)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make, kwargs, match", [
    (lambda b: b[:SIZE, :SIZE], {}, "3-D stack"),
    (lambda b: b[None, :SIZE, :SIZE], {}, "at least 2 frames"),
    (lambda b: np.stack([b[:12, :12]] * 3), {}, "at least 16x16"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3).astype(complex), {}, "integer or float"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3), {"reference": 3}, r"reference .* \[0, 2\]"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3), {"reference": 1.5}, "reference"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3), {"motion": "homography"}, "motion must be one of"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3), {"levels": 9}, "levels"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3), {"levels": 1, "finest": 2}, "finest"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3), {"sigma": -1.0}, "sigma"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3), {"max_iter": 0}, "max_iter"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3), {"eps": float("nan")}, "eps"),
    (lambda b: np.stack([b[:SIZE, :SIZE]] * 3), {"min_ecc": float("nan")}, "min_ecc"),
])
def test_register_burst_bad_input(base, make, kwargs, match):
    with pytest.raises(InputError, match=match):
        register_burst(make(base), **kwargs)


def test_register_burst_rejects_nan_frame(base):
    frames = np.stack([base[:SIZE, :SIZE]] * 3)
    frames[1, 5, 5] = np.inf
    with pytest.raises(InputError, match="frame 1 contains NaN or infinite"):
        register_burst(frames)


@pytest.mark.parametrize("transforms, kwargs, match", [
    (np.zeros((2, 2, 3)), {}, r"shape \(3, 2, 3\)"),
    (np.tile(np.eye(2, 3), (3, 1, 1)) * np.nan, {}, "NaN"),
    (np.tile(np.eye(2, 3), (3, 1, 1)), {"interpolation": "lanczos"}, "interpolation"),
])
def test_warp_frames_bad_input(base, transforms, kwargs, match):
    with pytest.raises(InputError, match=match):
        warp_frames(np.stack([base[:SIZE, :SIZE]] * 3), transforms, **kwargs)


def test_motions_constant():
    assert MOTIONS == ("translation", "euclidean", "affine")


# ------------------------------------------------------------------ stage-motion direction
def _translations(shifts_yx) -> np.ndarray:
    tr = np.zeros((len(shifts_yx), 2, 3))
    tr[:, 0, 0] = tr[:, 1, 1] = 1.0
    tr[:, 1, 2] = [s[0] for s in shifts_yx]
    tr[:, 0, 2] = [s[1] for s in shifts_yx]
    return tr


@pytest.mark.parametrize("angle", [0.0, 10.0, 45.0, 90.0, 120.0, 179.0])
def test_motion_direction_is_the_axis_of_the_frame_offsets(angle):
    a = np.radians(angle)
    rng = np.random.default_rng(int(angle))
    # frames along the line, in acquisition order, with a little jitter across it
    shifts = [(k * 9 * np.sin(a) + rng.normal(0, 0.2), k * 9 * np.cos(a) + rng.normal(0, 0.2))
              for k in range(-2, 3)]
    got = registration.motion_direction(_translations(shifts), (128, 128))
    assert 0.0 <= got < 180.0
    diff = abs(got - angle) % 180.0
    assert min(diff, 180.0 - diff) < 3.0, (got, angle)


def test_motion_direction_from_a_real_registration():
    rng = np.random.default_rng(5)
    tex = periodic_texture(rng, SIZE)
    # stage moving along +x (rows fixed): 0 degrees
    frames = np.stack([fourier_shift(tex, 0.3 * k, 6.0 * k) for k in range(-2, 3)])
    reg = register_burst(frames, reference=2)
    got = registration.motion_direction(reg.transforms, frames.shape[1:])
    assert min(got, 180.0 - got) < 5.0, got


def test_motion_direction_unknown_without_motion():
    assert registration.motion_direction(_translations([(0, 0), (0.5, 0.4), (-0.3, 0.6)]),
                                         (64, 64)) is None
    assert registration.motion_direction(_translations([(0, 0)]), (64, 64)) is None
    # a rotation about the top-left pixel moves the top-left offsets, not the centre
    rot = np.zeros((3, 2, 3))
    for k, deg in enumerate((-1.0, 0.0, 1.0)):
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        centre = np.array([31.5, 31.5])
        m = np.array([[c, -s], [s, c]])
        rot[k, :, :2] = m
        rot[k, :, 2] = centre - m @ centre
    assert np.ptp(rot[:, :, 2]) > 1.0
    assert registration.motion_direction(rot, (64, 64)) is None
    with pytest.raises(InputError, match="shape"):
        registration.motion_direction(_translations([(0, 0), (0, 5)]), (64,))
