import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_microrestore.engine import train as tr
from napari_microrestore.models import zoo

torch = pytest.importorskip("torch")


@pytest.fixture
def cfg(tmp_path):
    rng = np.random.default_rng(0)
    stack = np.stack([ndimage.gaussian_filter(rng.random((160, 160)), 1.5) * 200 + 20
                      for _ in range(5)]).astype(np.float32)
    src = tmp_path / "sections.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    return {
        "id": "test-burst", "title": "t", "task": "burst-deblur", "architecture": "burst-fast",
        "kwargs": {"channels": [8, 8, 8], "head_channels": 4},
        "input": {"frames": {"min": 2, "max": 7, "default": 3}, "multiple": 8},
        "data": {"sources": [str(src)], "licence": "generated", "val_fraction": 0.4,
                 "burst": {"patch": 48, "frames": [3, 3], "blur_length": [4, 6],
                           "dose": [30, 30], "align": "oracle"}},
        "train": {"steps": 6, "batch": 2, "lr": 1e-3, "val_every": 3, "val_bursts": 2,
                  "checkpoint_every": 2, "threads": 1},
    }


def test_train_checkpoints_resumes_and_exports(cfg, tmp_path):
    updates = []
    res = tr.train(cfg, tmp_path / "run", on_update=updates.append, export_dir=tmp_path / "zoo")
    assert [u.step for u in updates] == list(range(1, 7))
    assert all(np.isfinite(u.loss) for u in updates)
    assert updates[2].val is not None and "ssim" in updates[2].val
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "best.pt").exists()
    card = res.card
    assert card.id == "test-burst" and zoo.verify_weights(card)
    assert card.training["command"].startswith("microrestore train")
    # resume: asking for more steps continues from step 6, not from scratch
    cfg["train"]["steps"] = 8
    more = []
    tr.train(cfg, tmp_path / "run", on_update=more.append)
    assert [u.step for u in more] == [7, 8]


def test_validation_set_is_fixed_and_held_out(cfg):
    a = tr.validation_set(cfg, n=2)
    b = tr.validation_set(cfg, n=2)
    assert np.array_equal(a[0]["x"], b[0]["x"])
    assert a[0]["x"].shape == (3, 48, 48)


def test_loss_is_zero_for_perfect_prediction():
    loss = tr.make_loss({"l1": 1.0, "ssim": 1.0, "grad": 0.5})
    y = torch.randn(2, 1, 32, 32)
    total, terms = loss(y.clone(), y, torch.ones_like(y))
    assert float(total) == pytest.approx(0.0, abs=1e-5)
    total2, _ = loss(y + 0.5 * torch.randn_like(y), y, torch.ones_like(y))
    assert float(total2) > 0.1


def test_rotated_bursts_reach_the_net_with_the_motion_along_the_columns():
    """``burst.rotate``: a stage moving in any direction, turned as restore() turns it."""
    from napari_microrestore.core.errors import InputError
    from napari_microrestore.engine.data import BurstSpec, make_burst_sample

    rng = np.random.default_rng(3)
    sections = [(ndimage.gaussian_filter(rng.random((360, 360)), 1.5) * 200 + 20)
                .astype(np.float32)]
    spec = BurstSpec(patch=64, frames=(3, 3), blur_length=(12, 12), dose=(1e4, 1e4),
                     align="oracle", oracle_jitter=0.0, angle_jitter=0.0, rotate=1.0)
    gen = np.random.default_rng(0)
    angles = []
    for _ in range(4):
        s = make_burst_sample(sections, spec, gen)
        assert s["x"].shape == (3, 64, 64) and s["y"].shape == s["mask"].shape == (64, 64)
        assert s["mask"].mean() > 0.5
        angles.append(s["params"]["blur_angles"][0] % 180)
        mean, y = s["x"].mean(0), s["y"]

        def err(axis):  # the frames' mean against the target blurred along one axis
            return np.abs(ndimage.uniform_filter1d(y, 11, axis=axis) - mean)[12:-12, 12:-12].mean()
        assert err(0) < 0.5 * err(1), (angles[-1], err(0), err(1))
    # the stage moved in directions well away from the columns, not only upright
    assert max(min(abs(a - 90), 180 - abs(a - 90)) for a in angles) > 30
    with pytest.raises(InputError, match="burst.rotate"):
        BurstSpec(patch=64, rotate=1.5)
    with pytest.raises(InputError, match="burst.angle_error"):
        BurstSpec(patch=64, angle_error=-1.0)
