import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from napari_microrestore.core import metrics
from napari_microrestore.core.errors import InputError


def _texture(rng, shape=(96, 80), sigma=2.0, scale=100.0):
    return (ndimage.gaussian_filter(rng.normal(size=shape), sigma) * scale + 500).astype(np.float32)


@pytest.mark.parametrize("shape", [(64, 64), (57, 91)])
@pytest.mark.parametrize("noise", [1.0, 10.0, 40.0])
def test_ssim_matches_skimage(rng, shape, noise):
    ref = _texture(rng, shape)
    img = ref + rng.normal(scale=noise, size=shape).astype(np.float32)
    dr = float(ref.max() - ref.min())
    expected = structural_similarity(
        img, ref, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=dr
    )
    assert abs(metrics.ssim(img, ref) - expected) < 1e-4
    assert abs(metrics.ssim(img, ref, data_range=255.0) - structural_similarity(
        img, ref, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255.0
    )) < 1e-4


def test_ssim_torch_matches_numpy(rng):
    torch = pytest.importorskip("torch")
    ref = _texture(rng, (48, 40))
    img = ref + rng.normal(scale=15, size=ref.shape).astype(np.float32)
    dr = float(ref.max() - ref.min())
    t = torch.from_numpy(img.astype(np.float64))[None, None].requires_grad_(True)
    r = torch.from_numpy(ref.astype(np.float64))[None, None]
    val = metrics.ssim_torch(t, r, data_range=dr)
    assert abs(val.item() - metrics.ssim(img, ref)) < 1e-6
    val.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    per = metrics.ssim_torch(torch.cat([t, r]).detach(), torch.cat([r, r]), data_range=dr,
                             reduction="none")
    assert per.shape == (2,) and per[1].item() == pytest.approx(1.0)


def test_psnr_matches_skimage_and_identity(rng):
    ref = _texture(rng)
    img = ref + rng.normal(scale=5, size=ref.shape).astype(np.float32)
    dr = float(ref.max() - ref.min())
    assert metrics.psnr(img, ref) == pytest.approx(
        peak_signal_noise_ratio(ref.astype(np.float64), img.astype(np.float64), data_range=dr),
        abs=1e-9)
    assert metrics.psnr(ref, ref) == math.inf
    # more noise, lower PSNR and SSIM
    worse = ref + rng.normal(scale=20, size=ref.shape).astype(np.float32)
    assert metrics.psnr(worse, ref) < metrics.psnr(img, ref)
    assert metrics.ssim(worse, ref) < metrics.ssim(img, ref)


def test_pcc_invariant_to_gain_offset(rng):
    ref = _texture(rng)
    assert metrics.pcc(3 * ref - 7, ref) == pytest.approx(1.0)
    assert metrics.pcc(-ref, ref) == pytest.approx(-1.0)
    other = _texture(np.random.default_rng(7))
    assert abs(metrics.pcc(other, ref)) < 0.3


def test_mask_and_border_restrict_the_measure(rng):
    ref = _texture(rng, (64, 64))
    img = ref.copy()
    img[:, :20] += 300  # damage the left part only
    mask = np.zeros(ref.shape, bool)
    mask[:, 32:] = True
    assert metrics.psnr(img, ref, mask=mask) == math.inf
    assert metrics.ssim(img, ref, mask=mask) > 0.999
    assert metrics.ssim(img, ref) < 0.9
    assert metrics.psnr(img, ref, border=21) == math.inf
    with pytest.raises(InputError, match="mask"):
        metrics.psnr(img, ref, mask=np.zeros((3, 3), bool))
    with pytest.raises(InputError, match="no pixel"):
        metrics.psnr(img, ref, mask=np.zeros(ref.shape, bool))
    with pytest.raises(InputError, match="border"):
        metrics.psnr(img, ref, border=40)


def test_fit_gain_offset_and_compare(rng):
    ref = _texture(rng)
    img = 0.5 * ref + 20
    gain, offset = metrics.fit_gain_offset(img, ref)
    assert gain == pytest.approx(2.0) and offset == pytest.approx(-40.0, abs=1e-4)
    res = metrics.compare(img, ref, fit=True, border=4)
    assert res["psnr"] > 100 and res["ssim"] == pytest.approx(1.0) and res["pcc"] == pytest.approx(1.0)
    raw = metrics.compare(img, ref)
    assert raw["psnr"] < 20 and set(raw) == {"psnr", "ssim", "pcc"}


def test_noise_sigma_recovers_white_noise_on_texture(rng):
    clean = _texture(rng, (256, 256), sigma=3.0, scale=400.0)
    for s in (2.0, 8.0, 25.0):
        noisy = clean + rng.normal(scale=s, size=clean.shape)
        assert metrics.noise_sigma(noisy) == pytest.approx(s, rel=0.15)
    # Poisson data: the estimate is the noise at a typical intensity
    counts = rng.poisson(np.full((200, 200), 40.0)).astype(np.float32)
    assert metrics.noise_sigma(counts) == pytest.approx(math.sqrt(40), rel=0.15)


def test_sharpness_prefers_sharp_and_ignores_noise(rng):
    clean = _texture(rng, (200, 200), sigma=1.5, scale=400.0)
    blurred = ndimage.gaussian_filter(clean, 2.0)
    s_clean = metrics.sharpness(clean)
    assert metrics.sharpness(blurred) < 0.6 * s_clean
    # noise must not make an image look sharper
    noisy = clean + rng.normal(scale=3.0, size=clean.shape)
    assert metrics.sharpness(noisy) == pytest.approx(s_clean, rel=0.2)
    # invariant to gain and offset
    assert metrics.sharpness(5 * clean + 100) == pytest.approx(s_clean, rel=1e-3)
    nr = metrics.no_reference(noisy)
    assert set(nr) == {"noise", "sharpness", "snr"} and nr["snr"] > 10


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), "2-D"),
        (np.zeros((16, 16)), np.zeros((16, 17)), "same shape"),
        (np.full((16, 16), np.nan), np.zeros((16, 16)), "NaN"),
        (np.zeros((0, 5)), np.zeros((0, 5)), "empty"),
    ],
)
def test_bad_input(a, b, match):
    with pytest.raises(InputError, match=match):
        metrics.psnr(a, b, data_range=1.0)


def test_constant_reference_needs_data_range():
    with pytest.raises(InputError, match="data_range"):
        metrics.psnr(np.ones((16, 16)), np.zeros((16, 16)))
    assert metrics.psnr(np.ones((16, 16)), np.zeros((16, 16)), data_range=1.0) == pytest.approx(0.0)
    with pytest.raises(InputError, match="at least 11x11"):
        metrics.ssim(np.ones((8, 8)), np.zeros((8, 8)), data_range=1.0)
