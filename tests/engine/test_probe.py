"""run_probe(): a probe degraded, restored by a (fast, classical) model and scored."""

import numpy as np
import pytest

from napari_microrestore.core import degrade, probes
from napari_microrestore.core.errors import Cancelled, CancelToken, InputError
from napari_microrestore.engine import probe as engine
from napari_microrestore.engine import restore as restore_engine


def test_burst_probe_with_registered_mean():
    seen = []
    res = engine.run_probe("spots-lines", "registered-mean", shape=(96, 96), seed=3,
                           blur_length=4.0, dose=30.0,
                           progress=lambda f, m: seen.append((f, m)))
    assert res.truth.shape == res.restored.shape == (96, 96)
    assert res.degraded.shape == (5, 96, 96) and res.restored.dtype == np.float32
    assert set(res.metrics) == set(res.invented) == {"degraded", "restored"}
    # averaging the registered frames beats the single reference frame
    assert res.metrics["restored"]["psnr"] > res.metrics["degraded"]["psnr"] + 2
    assert res.metrics["restored"]["ssim"] > res.metrics["degraded"]["ssim"]
    # a mean of frames invents nothing
    assert res.invented["restored"]["score"] < 0.01
    params = res.provenance["parameters"]
    assert params["pattern"] == "spots-lines" and params["seed"] == 3 and params["n_frames"] == 5
    assert params["degradation"]["dose"] == 30.0
    assert res.provenance["model"] == "registered-mean" and res.provenance["device"] == "cpu"
    assert res.restore_provenance["model"] == "registered-mean"
    assert res.mask.shape == (96, 96) and 0.5 < res.mask.mean() < 1
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    again = engine.run_probe("spots-lines", "registered-mean", shape=(96, 96), seed=3,
                             blur_length=4.0, dose=30.0)
    np.testing.assert_array_equal(again.restored, res.restored)          # seeded


def test_probe_degraded_like_real_data():
    rng = np.random.default_rng(0)
    scene = probes.make_probe("spots-lines", (200, 200), rng=rng) * 100 + 10
    like = degrade.simulate_burst(scene, 5, shape=(128, 128), blur_length=8, dose=40,
                                  rng=rng).frames
    res = engine.run_probe("line-pairs", "registered-mean", shape=(96, 96), like=like)
    est = res.estimate
    assert est is not None and res.provenance["like"] == est
    assert est["blur_length"] > 3 and est["dose"] is not None      # motion blur, shot noise
    got = res.provenance["parameters"]["degradation"]
    assert np.mean(got["blur_lengths"]) == pytest.approx(est["blur_length"], rel=0.15)
    # a value given by hand overrides the estimate
    res2 = engine.run_probe("line-pairs", "registered-mean", shape=(96, 96), like=like,
                            blur_length=2.0)
    assert np.mean(res2.provenance["parameters"]["degradation"]["blur_lengths"]) < 2.5


def test_a_model_that_adds_a_grid_is_caught(monkeypatch):
    """The readout on a fake model that adds faint grid lines (the calibration-grid artefact)
    next to one that adds white noise of the same energy."""
    def make_fake(kind):
        def fake(data, model, **kwargs):
            mean = np.asarray(data, np.float32).mean(0)
            yy, xx = np.mgrid[0:mean.shape[0], 0:mean.shape[1]]
            if kind == "grid":
                extra = ((yy % 8 == 0) | (xx % 8 == 0)).astype(np.float32)
            else:
                extra = np.random.default_rng(0).normal(size=mean.shape).astype(np.float32)
            extra = (extra - extra.mean()) / extra.std() * 0.1 * mean.std()
            return restore_engine.RestoreResult(mean + extra, {"model": model.id,
                                                               "device": "cpu"})
        return fake

    scores = {}
    for kind in ("grid", "noise"):
        monkeypatch.setattr(restore_engine, "restore", make_fake(kind))
        res = engine.run_probe("siemens-star", "registered-mean", shape=(96, 96), seed=1,
                               blur_length=3.0, dose=200.0)
        scores[kind] = res.invented["restored"]
    assert scores["grid"]["score"] > 0.03 and scores["noise"]["score"] < 0.005
    assert scores["grid"]["peaks"][0]["period"] in (pytest.approx(8.0, rel=0.05),
                                                    pytest.approx(4.0, rel=0.05))
    text = engine.describe_invented(scores["grid"])
    assert text.startswith("invented structure at") and "px" in text
    assert engine.describe_invented(scores["noise"]).startswith("no invented")


def test_bad_input_and_cancel():
    with pytest.raises(InputError, match="sstem"):
        engine.run_probe("spots-lines", "sstem-restore")
    with pytest.raises(InputError, match="unknown probe"):
        engine.run_probe("zebra", "registered-mean")
    with pytest.raises(InputError, match="frames"):
        engine.run_probe("spots-lines", "registered-mean", shape=(64, 64), n_frames=1)
    with pytest.raises(InputError, match="dose"):
        engine.run_probe("spots-lines", "registered-mean", shape=(64, 64), dose=0.0)
    with pytest.raises(InputError, match="constant"):
        engine.run_probe("spots-lines", "registered-mean", shape=(64, 64),
                         like=np.ones((3, 64, 64)))
    with pytest.raises(InputError, match="no structure"):
        engine.run_probe("siemens-star", "registered-mean", shape=(64, 64), blur_length=30.0)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        engine.run_probe("spots-lines", "registered-mean", shape=(64, 64), cancel=token)
