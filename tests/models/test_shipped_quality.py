"""Quality floors of the shipped weights on small real crops (held-out sections)."""

import numpy as np
import pytest

from napari_microrestore.core import degrade, metrics
from napari_microrestore.engine.data import load_sections
from napari_microrestore.engine.restore import restore
from napari_microrestore.models.zoo import list_cards

pytest.importorskip("torch")

BURST_MODELS = [c.id for c in list_cards() if c.is_burst and not c.is_classical and c.source == "zoo"]


@pytest.mark.data
@pytest.mark.parametrize("model_id", BURST_MODELS)
def test_burst_model_beats_registered_mean_on_real_sections(model_id, shared_data):
    sections = load_sections(["sstem/isbi2012_train_volume.tif"], split="val",
                             root=shared_data)
    rng = np.random.default_rng(7)
    gains = []
    for k in range(3):
        img = sections[k % len(sections)][:256, :256] + 1.0
        b = degrade.simulate_burst(img, 5, shape=(160, 160), blur_length=(6, 14),
                                   dose=(12, 80), rng=rng)
        res = restore(b.frames, model_id, device="cpu")
        mean = res.registration.aligned.mean(0)
        out = metrics.compare(res.image, b.ground_truth, fit=True, border=24)
        base = metrics.compare(mean, b.ground_truth, fit=True, border=24)
        gains.append(out["psnr"] - base["psnr"])
        assert out["ssim"] > base["ssim"]
    assert np.mean(gains) > 1.0, gains
