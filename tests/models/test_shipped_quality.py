"""Quality floors of the shipped weights on small real crops (held-out sections)."""

import numpy as np
import pytest

from napari_microrestore.core import degrade, metrics
from napari_microrestore.engine.data import load_sections
from napari_microrestore.engine.restore import restore
from napari_microrestore.models.zoo import list_cards

pytest.importorskip("torch")

# sr2x at 20 counts/px: the card says +2.03 dB on the whole validation split; these four
# crops (two ssTEM, two confocal) gave +1.47 dB when the weights were shipped
SR2X_FLOOR_DB = 1.0

BURST_MODELS = [c.id for c in list_cards() if c.is_burst and not c.is_classical and c.source == "zoo"]


@pytest.mark.data
@pytest.mark.parametrize("angle", [90.0, 10.0, 140.0])
@pytest.mark.parametrize("model_id", BURST_MODELS)
def test_burst_model_beats_registered_mean_on_real_sections(model_id, angle, shared_data):
    """The stage moving along the columns (as trained), along the rows (the engine turns the
    burst) and diagonally."""
    sections = load_sections(["sstem/isbi2012_train_volume.tif"], split="val",
                             root=shared_data)
    rng = np.random.default_rng(7)
    gains, ssim_gains = [], []
    for k in range(3):
        img = sections[k % len(sections)][:256, :256] + 1.0
        b = degrade.simulate_burst(img, 5, shape=(160, 160), blur_length=(6, 14),
                                   blur_angle=angle, dose=(12, 80), rng=rng)
        res = restore(b.frames, model_id, device="cpu")
        mean = res.registration.aligned.mean(0)
        out = metrics.compare(res.image, b.ground_truth, fit=True, border=24)
        base = metrics.compare(mean, b.ground_truth, fit=True, border=24)
        gains.append(out["psnr"] - base["psnr"])
        ssim_gains.append(out["ssim"] - base["ssim"])
    if model_id == "tem-single" and angle != 90.0:
        # the 3-frame baseline: +1.1 dB as trained, +0.1-0.7 dB off that direction when its
        # weights were shipped (its card's any-direction score: +0.49 dB)
        assert np.mean(gains) > 0.0 and np.mean(ssim_gains) > 0.0, (gains, ssim_gains)
    else:
        assert np.mean(gains) > 1.0 and min(ssim_gains) > 0.0, (gains, ssim_gains)


@pytest.mark.data
def test_sstem_model_restores_missing_and_damaged_sections(shared_data):
    if "sstem-restore" not in [c.id for c in list_cards()]:
        pytest.skip("no shipped sstem model")
    from napari_microrestore.core import io

    st = np.asarray(io.read(shared_data / "sstem/isbi2012_train_volume.tif").data[-6:],
                    np.float32)[:, :256, :256]
    rng = np.random.default_rng(3)
    gains_missing, gains_fold = [], []
    for s in (1, 3):
        trio = st[s - 1:s + 2].copy()
        truth = trio[1].copy()
        trio[1] = 0
        out = restore(trio, "sstem-restore", device="cpu", sections=[1]).image
        np.testing.assert_array_equal(out[0], st[s - 1])  # neighbours are left alone
        avg = 0.5 * (st[s - 1] + st[s + 1])
        gains_missing.append(metrics.psnr(out[1], truth, border=24)
                             - metrics.psnr(avg, truth, border=24))
        damaged, mask = degrade.fold(truth, rng=rng)
        trio[1] = damaged
        masks = np.zeros(trio.shape, bool)
        masks[1] = mask
        out = restore(trio, "sstem-restore", device="cpu", masks=masks).image
        gains_fold.append(metrics.psnr(out[1], truth, border=24)
                          - metrics.psnr(damaged, truth, border=24))
    assert np.mean(gains_missing) > 0.0, gains_missing
    assert np.mean(gains_fold) > 0.0, gains_fold


@pytest.mark.data
def test_sr2x_model_beats_bicubic_on_held_out_sections(shared_data):
    """Low dose (20 counts/px), where denoising is worth the most: the shipped sr2x model
    beats bicubic up-sampling on held-out ssTEM and confocal crops (the card's protocol)."""
    import cv2

    if "sr2x" not in [c.id for c in list_cards()]:
        pytest.skip("no shipped sr2x model")
    rng = np.random.default_rng(11)
    gains = []
    for src in ("sstem/isbi2012_train_volume.tif", "fluorescence/cells3d_nuclei_zstack.tif"):
        for img in load_sections([src], split="val", root=shared_data)[:2]:
            hr = img[:192, :192] + 1.0
            lr = degrade.poisson_gaussian_noise(degrade.downsample2x(hr), 20.0, rng=rng)
            out = restore(lr, "sr2x", device="cpu").image
            assert out.shape == hr.shape and out.dtype == np.float32
            bic = cv2.resize(lr, (192, 192), interpolation=cv2.INTER_CUBIC)
            gains.append(metrics.compare(out, hr, fit=True, border=24)["psnr"]
                         - metrics.compare(bic, hr, fit=True, border=24)["psnr"])
    assert np.mean(gains) > SR2X_FLOOR_DB, gains


# zstack-defocus: the card gives +1.26..+2.25 dB per defocus level on the validation rows
DEFOCUS_FLOOR_DB = 1.0


@pytest.mark.data
def test_defocus_model_beats_its_input_on_held_out_rows(shared_data):
    """Two real pairs far from focus (a single shot at -0.7 um and a stack plane at +0.75 um),
    validation rows only, in-focus image aligned as in the card's protocol: the shipped
    zstack-defocus model gains on the defocused input and keeps its intensities."""
    if "zstack-defocus" not in [c.id for c in list_cards()]:
        pytest.skip("no shipped zstack-defocus model")
    from napari_microrestore.engine.data import DefocusSampler

    pairs = {round(a, 2): (b, s) for b, s, a in
             DefocusSampler({"patch": 128}, "val").validation_pairs()}
    for amount in (-0.7, 0.75):
        blurred, sharp = (a[:, 128:384] for a in pairs[amount])
        out = restore(blurred, "zstack-defocus", device="cpu").image
        assert out.shape == blurred.shape and out.dtype == np.float32
        assert abs(float(out.mean()) - float(blurred.mean())) < 0.05 * float(blurred.std())
        gain = (metrics.compare(out, sharp, fit=True, border=24)["psnr"]
                - metrics.compare(blurred, sharp, fit=True, border=24)["psnr"])
        assert gain > DEFOCUS_FLOOR_DB, (amount, gain)
