"""The evaluation protocols behind the model cards, checked with untrained nets whose answer
is known (identity / the classical baseline), on the real held-out data."""

import numpy as np
import pytest

from napari_microrestore.engine import evaluate as ev
from napari_microrestore.models import build
from napari_microrestore.models.zoo import get_card, save_model

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.data


def _card(tmp_path, task, arch, kwargs, sources, **inp):
    torch.manual_seed(0)
    net = build(arch, kwargs)
    return save_model(net, {"id": f"t-{task}", "task": task, "architecture": arch,
                            "kwargs": kwargs, "input": inp,
                            "training": {"data": sources}}, tmp_path, dtype="float32")


def test_burst_protocol_classical_mean_has_zero_gain(shared_data):
    res = ev.evaluate_burst(get_card("registered-mean"), n_bursts=2, size=128, device="cpu")
    assert res["values"]["gain_over_mean_db"] == pytest.approx(0.0, abs=1e-6)
    assert len(res["per_burst"]) == 2
    # any direction of stage motion by default; a range narrows it
    assert res["protocol"]["motion_angle"] == [0.0, 180.0]
    res = ev.evaluate_burst(get_card("tem-burst-fast"), n_bursts=2, size=128, device="cpu",
                            blur_angle=(10.0, 10.0))
    for row in res["per_burst"]:
        assert abs(row["blur_angle"] - 10.0) <= 10.0 and -90 <= row["rotation_deg"] < -70


def test_defocus_protocol_identity_net_has_zero_gain(shared_data, tmp_path):
    card = _card(tmp_path, "defocus", "resnet-generator",
                 {"ngf": 4, "n_blocks": 1, "norm": "batch", "residual": True},
                 ["defocus/dfnn_microtubules"], multiple=4)
    res = ev.evaluate_defocus(card, device="cpu")
    assert len(res["per_level"]) >= 14  # every real defocus level is scored
    assert abs(res["values"]["min_gain_over_input_db"]) < 1e-3
    # a self-ensemble of the identity is the identity, and the protocol records it
    res = ev.evaluate(card, device="cpu", ensemble="dihedral")
    assert abs(res["values"]["min_gain_over_input_db"]) < 1e-3
    assert res["protocol"]["ensemble"] == "dihedral"
    assert "ensemble" not in ev.evaluate(card, device="cpu")["protocol"]


def test_sr2x_protocol_runs_against_bicubic(shared_data, tmp_path):
    card = _card(tmp_path, "sr2x", "rrdb", {"nf": 4, "gc": 4, "n_blocks": 1},
                 ["fluorescence/cells3d_nuclei_zstack.tif"], scale=2)
    res = ev.evaluate_sr2x(card, doses=(50.0,), size=64, device="cpu")
    # the untrained net is bilinear interpolation: close to bicubic, not 2 dB better
    assert abs(res["values"]["min_gain_over_bicubic_db"]) < 1.5


def test_align_to_recovers_a_sub_pixel_shift():
    """The defocus pairs are aligned by align_to: a known shift of a smooth random image is
    found to 0.05 px and undone without smoothing (Fourier shift)."""
    from scipy import ndimage

    from napari_microrestore.engine.data import align_to

    rng = np.random.default_rng(5)
    img = ndimage.gaussian_filter(rng.random((128, 128)), 2.0).astype(np.float32) * 100
    shifted = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(img), (1.3, -2.6))).real
    aligned, (dy, dx) = align_to(img, shifted.astype(np.float32))
    assert abs(dy - 1.3) < 0.05 and abs(dx + 2.6) < 0.05, (dy, dx)
    inner = (slice(16, -16),) * 2
    assert np.abs(aligned[inner] - img[inner]).max() < 0.05 * img.std()
