"""engine.finetune: fine-tuning a burst net on the user's burst, keeping the best weights,
cancelling, saving as a user model, refusing bad input. Tiny random nets on small bursts."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_microrestore.core import degrade, probes  # noqa: E402
from napari_microrestore.core.errors import CancelToken, InputError  # noqa: E402
from napari_microrestore.engine.finetune import (  # noqa: E402
    FinetuneUpdate,
    adapt,
    default_holdout,
    finetune,
    save_finetuned,
)
from napari_microrestore.models import build  # noqa: E402
from napari_microrestore.models.zoo import (  # noqa: E402
    get_card,
    list_cards,
    load_model,
    save_model,
    sha256_file,
    verify_weights,
)

FAST = {"budget_seconds": None, "patch": 32, "batch": 2, "lr": 3e-3, "threads": 1}


@pytest.fixture(scope="module")
def burst():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    texture = gaussian_filter(rng.normal(size=(200, 200)), 3.0)
    scene = probes.make_probe("spots-lines", (200, 200), rng=rng) * 100 + 40 \
        + 15 * texture / texture.std()
    scene = np.clip(scene, 0, None)
    return degrade.simulate_burst(scene, 4, shape=(80, 80), blur_length=4, dose=30, rng=rng)


@pytest.fixture
def tiny_card(tmp_path, monkeypatch):
    """A tiny random BurstFastNet saved as a user model (its own models folder)."""
    monkeypatch.setenv("MICRORESTORE_MODELS", str(tmp_path / "models"))
    torch.manual_seed(0)
    net = build("burst-fast", {"channels": [4, 8, 8], "head_channels": 4})
    card = {"id": "tiny-burst", "task": "burst-deblur", "architecture": "burst-fast",
            "kwargs": {"channels": [4, 8, 8], "head_channels": 4},
            "input": {"frames": {"min": 2, "max": 9, "default": 5}, "multiple": 8,
                      "register": True},
            "training": {"licence": "test data"}}
    return save_model(net, card, tmp_path / "base", dtype="float32")


def test_pairs_finetune_improves_the_holdout_and_keeps_the_best(burst, tiny_card):
    updates: list[FinetuneUpdate] = []
    res = finetune(tiny_card, burst.frames, mode="pairs", reference=burst.ground_truth,
                   steps=40, on_update=updates.append, data_name="my burst", **FAST)
    assert not res.cancelled and res.steps == 40 and res.mode == "pairs"
    assert res.after["psnr"] > res.before["psnr"] + 0.5
    # the returned weights are the best evaluated ones, and the scores say so
    scored = [h for h in res.history if "score" in h]
    assert [h["step"] for h in scored] == [0, 10, 20, 30, 40]
    best = max(scored, key=lambda h: h["score"])
    assert res.best_step == best["step"] and res.after["psnr"] == pytest.approx(best["psnr"])
    # typed updates: one per step plus the base model's score; previews of the holdout crop
    assert [u.step for u in updates] == list(range(41))
    hh, hw = res.holdout[2:]
    previews = [u for u in updates if u.preview is not None]
    assert len(previews) == 5 and all(u.preview.shape == (hh, hw) for u in previews)
    assert all(u.holdout == res.holdout for u in previews)
    assert previews[0].preview.dtype == np.float32
    # previews are in the input's units (counts), not normalised
    assert abs(float(previews[-1].preview.mean()) - float(burst.frames.mean())) < \
        0.3 * float(burst.frames.mean())
    assert res.preview_after.shape == (hh, hw)
    # the input is never modified
    assert np.isfinite(res.preview_after).all()


def test_training_patches_never_overlap_the_holdout(burst, tiny_card, monkeypatch):
    from napari_microrestore.engine import finetune as ft

    seen = []
    real = ft._patch_origins

    def spy(d, patch):
        ys, xs = real(d, patch)
        seen.append((d.holdout, patch, ys, xs))
        return ys, xs

    monkeypatch.setattr(ft, "_patch_origins", spy)
    finetune(tiny_card, burst.frames, mode="pairs", reference=burst.ground_truth, steps=1,
             **FAST)
    (hy, hx, hh, hw), p, ys, xs = seen[0]
    assert len(ys) > 0
    overlap = (ys < hy + hh) & (ys + p > hy) & (xs < hx + hw) & (xs + p > hx)
    assert not overlap.any()


def test_self_supervised_lowers_the_holdout_loss(burst, tiny_card):
    res = finetune(tiny_card, burst.frames, mode="self-supervised", steps=30, **FAST)
    assert "psnr" not in res.before and res.after["loss"] < res.before["loss"]
    assert res.card["training"]["mode"] == "self-supervised"
    # with a reference (never trained on), the holdout is scored by PSNR instead
    res2 = finetune(tiny_card, burst.frames, mode="self-supervised",
                    reference=burst.ground_truth, steps=2, **FAST)
    assert "psnr" in res2.before and "loss" in res2.before


def test_self_supervised_reads_the_blur_on_the_recorded_frames(tiny_card):
    from napari_microrestore.engine.finetune import _prepare

    rng = np.random.default_rng(0)
    scene = probes.make_probe("spots-lines", (420, 420), rng=rng) * 100 + 10
    b = degrade.simulate_burst(scene, 5, shape=(192, 192), blur_length=8, blur_angle=0.0,
                               angle_jitter=3.0, dose=40, rng=rng)
    d = _prepare(b.frames, tiny_card, "self-supervised", None, None, None, None, None)
    assert abs(d.orientation["rotation_deg"]) > 80 and d.rotation is not None
    # measured on the frames as recorded (warped frames have smoothed noise), reported in the
    # user's view (along the rows) and used in the net's (along the columns)
    est = probes.estimate_degradation(b.frames)
    assert d.blur["blur_length"] == round(est.blur_length, 2)
    assert d.blur["blur_length"] == pytest.approx(8.0, rel=0.6)
    assert min(d.blur["blur_angle"], 180 - d.blur["blur_angle"]) < 10
    yy, xx = np.indices(d.psf.shape)
    spread_y = (d.psf * (yy - (d.psf * yy).sum()) ** 2).sum()
    spread_x = (d.psf * (xx - (d.psf * xx).sum()) ** 2).sum()
    assert spread_y > 10 * spread_x


def test_cancel_returns_the_best_weights_so_far(burst, tiny_card):
    token = CancelToken()

    def on_update(u: FinetuneUpdate) -> None:
        if u.step >= 12:
            token.cancel()

    res = finetune(tiny_card, burst.frames, mode="pairs", reference=burst.ground_truth,
                   steps=1000, cancel=token, on_update=on_update, **FAST)
    assert res.cancelled and res.steps == 12
    scored = {h["step"]: h for h in res.history if "score" in h}
    assert sorted(scored) == [0, 10, 12]          # the weights at the stop are scored too
    assert res.best_step == max(scored, key=lambda s: scored[s]["score"])
    assert res.card["training"]["cancelled"] is True
    assert res.after["psnr"] == pytest.approx(scored[res.best_step]["psnr"])


def test_stop_token_ends_early_too(burst, tiny_card):
    stop = CancelToken()
    stop.cancel()
    res = finetune(tiny_card, burst.frames, mode="pairs", reference=burst.ground_truth,
                   steps=50, stop=stop, **FAST)
    assert res.cancelled and res.steps == 0 and res.after == res.before


def test_time_budget_is_kept(burst, tiny_card):
    res = finetune(tiny_card, burst.frames, mode="pairs", reference=burst.ground_truth,
                   **{**FAST, "budget_seconds": 2.0})
    assert res.steps > 0 and res.seconds < 3.5


def test_save_lists_the_model_with_a_verified_checksum(burst, tiny_card, tmp_path):
    res = finetune(tiny_card, burst.frames, mode="pairs", reference=burst.ground_truth,
                   steps=20, data_name="my burst", **FAST)
    card = save_finetuned(res, "tiny-ft")
    assert card.path.parent == tmp_path / "models" and card.source == "user"
    listed = {c.id: c for c in list_cards()}
    assert "tiny-ft" in listed and listed["tiny-ft"].source == "user"
    assert verify_weights(card) == card.weights_path
    assert sha256_file(card.weights_path) == card.weights["sha256"]
    tr = card.training
    assert tr["base_model"] == "tiny-burst" and tr["base_sha256"] == tiny_card.weights["sha256"]
    assert tr["mode"] == "pairs" and tr["steps"] == 20
    assert tr["data_details"]["name"] == "my burst"
    assert tr["data_details"]["shape"] == list(burst.frames.shape)
    assert tr["parameters"]["patch"] == 32 and "finetune(" in tr["command"]
    vals = card.metrics["values"]
    assert vals["before_psnr"] == pytest.approx(res.before["psnr"], abs=1e-3)
    assert vals["after_psnr"] == pytest.approx(res.after["psnr"], abs=1e-3)
    assert "test data" in tr["licence"]
    # the saved weights are the result's (fp16 rounding aside)
    net = load_model(get_card("tiny-ft"))
    x = torch.randn(1, 3, 1, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(net(x).numpy(), res.net(x).numpy(), atol=2e-2)
    # the Restore path with the saved model beats the base model on the held-out crop
    from napari_microrestore.core import metrics
    from napari_microrestore.engine.restore import restore

    y, x, h, w = res.holdout
    psnr = {m.id: metrics.compare(restore(burst.frames, m, device="cpu").image[y:y + h, x:x + w],
                               burst.ground_truth[y:y + h, x:x + w], fit=True,
                               border=4)["psnr"] for m in (tiny_card, card)}
    assert res.best_step > 0 and psnr["tiny-ft"] > psnr["tiny-burst"]
    # a shipped id and an existing id are refused; a bad id too
    with pytest.raises(InputError, match="shipped model"):
        save_finetuned(res, "tem-burst-fast")
    with pytest.raises(InputError, match="already exists"):
        save_finetuned(res, "tiny-ft")
    with pytest.raises(InputError, match="plain name"):
        save_finetuned(res, "a/b")
    assert save_finetuned(res, "tiny-ft", overwrite=True).id == "tiny-ft"


def test_bad_inputs_are_refused(burst, tiny_card):
    ref = burst.ground_truth
    with pytest.raises(InputError, match=r"\(T, Y, X\) burst"):
        finetune(tiny_card, burst.frames[0], reference=ref, steps=1, **FAST)
    with pytest.raises(InputError, match="reference image must have a frame's shape"):
        finetune(tiny_card, burst.frames, reference=ref[:40], steps=1, **FAST)
    with pytest.raises(InputError, match="pairs mode needs a clean reference"):
        finetune(tiny_card, burst.frames, steps=1, **FAST)
    with pytest.raises(InputError, match="at least 3 frames"):
        finetune(tiny_card, burst.frames[:2], mode="self-supervised", steps=1, **FAST)
    with pytest.raises(InputError, match="mode must be"):
        finetune(tiny_card, burst.frames, mode="n2v", steps=1, **FAST)
    bad = burst.frames.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        finetune(tiny_card, bad, reference=ref, steps=1, **FAST)
    with pytest.raises(InputError, match="sstem model"):
        finetune("sstem-restore", burst.frames, reference=ref, steps=1, **FAST)
    with pytest.raises(InputError, match="classical"):
        finetune("registered-mean", burst.frames, reference=ref, steps=1, **FAST)
    with pytest.raises(InputError, match="holdout"):
        finetune(tiny_card, burst.frames, reference=ref, steps=1, holdout=(70, 70, 32, 32),
                 **FAST)


def test_default_holdout_is_inside_the_covered_region():
    cov = np.zeros((100, 120), bool)
    cov[10:90, 5:115] = True
    y, x, h, w = default_holdout(cov)
    assert (h, w) == (64, 64) or h == w
    assert cov[y:y + h, x:x + w].all() and y + h == 90 and x + w == 115
    with pytest.raises(InputError, match="no pixel in common"):
        default_holdout(np.zeros((50, 50), bool))


def test_adapt_bn_needs_batchnorm(burst, tiny_card):
    with pytest.raises(InputError, match="no BatchNorm"):
        adapt(tiny_card, burst.frames)


def test_adapt_bn_of_tem_single_saves_like_a_finetune(burst, tiny_card):
    res = adapt("tem-single", burst.frames, passes=3, data_name="my burst")
    assert res.mode == "adapt-bn" and res.preview_after.shape == res.holdout[2:]
    assert not np.allclose(res.preview_after, res.preview_before)   # statistics changed
    card = save_finetuned(res, "single-bn")
    assert card.training["mode"] == "adapt-bn" and card.training["base_model"] == "tem-single"
    assert "adapt(" in card.training["command"] and verify_weights(card)


@pytest.mark.parametrize("model_id, mode", [("tem-burst-fast", "pairs"),
                                            ("tem-burst", "self-supervised"),
                                            ("tem-single", "pairs"),
                                            ("tem-single", "self-supervised")])
def test_shipped_burst_models_finetune(burst, model_id, mode):
    res = finetune(model_id, burst.frames, mode=mode, reference=burst.ground_truth, steps=2,
                   patch=32, batch=1, lr=1e-4, threads=1, budget_seconds=None)
    assert res.base.id == model_id and res.steps == 2 and res.mode == mode
    assert res.after["score"] >= res.before["score"]
    assert res.card["architecture"] == res.base.architecture
    assert res.preview_after.shape == res.holdout[2:]


def test_a_sideways_burst_is_fine_tuned_as_restore_sees_it(tiny_card):
    """Stage moving along the rows: fine-tuning trains the net on the turned burst, as
    restore() feeds it, and reports the holdout and previews in the user's orientation."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)
    texture = gaussian_filter(rng.normal(size=(220, 220)), 3.0)
    scene = np.clip(probes.make_probe("spots-lines", (220, 220), rng=rng) * 100 + 40
                    + 15 * texture / texture.std(), 0, None)
    b = degrade.simulate_burst(scene, 4, shape=(88, 120), blur_length=4, blur_angle=0.0,
                               step=6.0, dose=30, rng=rng)
    holdout = (40, 64, 32, 48)  # (y, x, h, w), not square
    updates: list[FinetuneUpdate] = []
    res = finetune(tiny_card, b.frames, mode="pairs", reference=b.ground_truth, steps=6,
                   holdout=holdout, on_update=updates.append, **FAST)
    assert abs(res.card["training"]["data_details"]["motion_direction"]["rotation_deg"]) > 80
    assert res.holdout == holdout
    assert res.preview_before.shape == res.preview_after.shape == (32, 48)
    scored = [u for u in updates if u.preview is not None]
    assert scored and all(u.holdout == holdout and u.preview.shape == (32, 48) for u in scored)
    from napari_microrestore.engine.restore import restore

    # the preview is restore()'s answer on that crop (same net, same view)
    want = restore(b.frames, tiny_card, device="cpu").image[40:72, 64:112]
    assert np.corrcoef(res.preview_before.ravel(), want.ravel())[0, 1] > 0.9
