"""Adversarial training modes (engine.train_gan): COMI CycleGAN and ESRGAN phase 2.

Tiny nets and generated data: defocus pairs are gaussian-blurred, noisy smooth phantoms
(``data.load_defocus_pairs`` is replaced), sr2x sections a generated TIFF stack.
"""

import copy

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_microrestore.core.errors import InputError
from napari_microrestore.engine import data
from napari_microrestore.engine import train as tr
from napari_microrestore.models import build, zoo

torch = pytest.importorskip("torch")
load_file = pytest.importorskip("safetensors.torch").load_file


def _phantom(rng, shape):
    img = ndi.gaussian_filter(rng.random(shape), 2.0)
    return ((img - img.min()) / (img.max() - img.min()) * 200 + 20).astype(np.float32)


@pytest.fixture
def defocus_cfg(monkeypatch):
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(3):
        sharp = _phantom(rng, (128, 64))
        blurred = ndi.gaussian_filter(sharp, 2.5) + rng.normal(scale=2.0, size=sharp.shape)
        pairs.append((blurred.astype(np.float32), sharp, 0.1 * (i + 1)))
    monkeypatch.setattr(data, "load_defocus_pairs", lambda root=None: pairs)
    return {
        "id": "t-comi", "title": "t", "task": "defocus", "architecture": "resnet-generator",
        "kwargs": {"ngf": 4, "n_blocks": 1, "norm": "batch", "residual": True},
        "input": {"channels": 1, "multiple": 4},
        "data": {"name": "generated", "licence": "generated", "patch": 32, "split_row": 48,
                 "simulated": 0.0},
        "train": {"mode": "cyclegan", "steps": 4, "batch": 2, "lr": 1e-3, "seed": 0,
                  "val_every": 2, "val_bursts": 2, "checkpoint_every": 2, "threads": 1,
                  "gan": {"ndf": 4, "n_layers": 2, "pool": 3},
                  "weights": {"adversarial": 0.5, "cycle": 1.0, "content": 1.0,
                              "identity": 0.5},
                  "content": {"l1": 1.0, "ssim": 1.0}},
    }


@pytest.fixture
def sections(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "sections.tif"
    tifffile.imwrite(path, np.stack([_phantom(rng, (64, 64)) for _ in range(5)]))
    return path


@pytest.fixture
def sr_init(tmp_path):
    """A phase-1 sr2x model saved as the zoo does, with a non-zero output layer (so that its
    output is not the bilinear up-sampling every untrained RRDBNet gives)."""
    kw = {"nf": 4, "gc": 4, "n_blocks": 1}
    torch.manual_seed(123)
    net = build("rrdb", kw)
    with torch.no_grad():
        net.conv_last.weight.normal_(std=0.1)
    return zoo.save_model(net, {"id": "t-sr-phase1", "task": "sr2x", "architecture": "rrdb",
                                "kwargs": kw, "input": {"scale": 2}}, tmp_path / "zoo")


@pytest.fixture
def esrgan_cfg(sections, sr_init):
    return {
        "id": "t-esrgan", "title": "t", "task": "sr2x", "architecture": "rrdb",
        "kwargs": dict(sr_init.kwargs), "input": {"channels": 1, "scale": 2},
        "data": {"sources": [str(sections)], "licence": "generated", "val_fraction": 0.4,
                 "patch": 16, "dose": [50, 50]},
        "train": {"mode": "esrgan", "init_from": str(sr_init.weights_path), "steps": 3,
                  "batch": 2, "lr": 1e-3, "seed": 0, "val_every": 3, "val_bursts": 2,
                  "checkpoint_every": 3, "threads": 1, "select": "psnr",
                  "gan": {"ndf": 4, "n_layers": 2}},
    }


def _batch(cfg, seed=0, n=2):
    sampler = data.make_sampler(cfg["task"], cfg["data"], "train")
    b = data.make_batch(sampler, np.random.default_rng(seed), n)
    return [torch.from_numpy(b[k]) for k in ("x", "y", "mask")]


def _trainer(cfg):
    return tr.make_trainer(cfg, "cpu", tr.validation_set(cfg, n=1)[0])


def test_cyclegan_logs_checkpoints_resumes_and_exports_g_ab(defocus_cfg, tmp_path):
    updates = []
    res = tr.train(defocus_cfg, tmp_path / "run", on_update=updates.append,
                   export_dir=tmp_path / "zoo")
    assert [u.step for u in updates] == [1, 2, 3, 4]
    expected = {"l1", "ssim", "adv_A", "adv_B", "cycle_A", "cycle_B", "idt_A", "idt_B",
                "d_A", "d_B"}
    for u in updates:
        assert set(u.terms) == expected and all(np.isfinite(v) for v in u.terms.values())
        assert np.isfinite(u.loss) and u.loss > 0
    assert updates[1].val is not None and "ssim" in updates[1].val
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["mode"] == "cyclegan" and set(ck["nets"]) == {"g_ba", "d_a", "d_b"}
    assert "optimizer_d" in ck and len(ck["pool_a"]) == 3
    # the export is G_AB alone (the best checkpoint's "model"), with a verifying card
    card = res.card
    weights = load_file(str(zoo.verify_weights(card)))
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert set(weights) == set(best["model"])
    assert all(torch.equal(weights[k], best["model"][k].half()) for k in weights)
    assert card.training["mode"] == "cyclegan"
    assert zoo.load_model(card)(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    # resume: more steps continue from step 4 with all four nets
    defocus_cfg["train"]["steps"] = 6
    more = []
    tr.train(defocus_cfg, tmp_path / "run", on_update=more.append)
    assert [u.step for u in more] == [5, 6]
    ck2 = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert not torch.equal(ck2["nets"]["d_b"]["net.0.weight"], ck["nets"]["d_b"]["net.0.weight"])


def _g_ab_after(cfg, workdir):
    tr.train(cfg, workdir)
    return torch.load(workdir / "last.pt", weights_only=True)["model"]


def test_cyclegan_without_adversarial_and_cycle_is_a_supervised_step(defocus_cfg, tmp_path):
    base = copy.deepcopy(defocus_cfg)
    base["train"].update(steps=2, val_every=10, betas=[0.9, 0.999])
    sup = copy.deepcopy(base)
    sup["train"]["mode"] = "supervised"
    sup["train"]["loss"] = {"l1": 1.0, "ssim": 1.0}
    content_only = copy.deepcopy(base)
    content_only["train"]["weights"] = {"adversarial": 0.0, "cycle": 0.0, "content": 1.0}
    ref = _g_ab_after(sup, tmp_path / "sup")
    got = _g_ab_after(content_only, tmp_path / "content")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # and the adversarial + cycle terms do reach G_AB (so the comparison above can fail)
    other = _g_ab_after(base, tmp_path / "full")
    assert not all(torch.equal(ref[k], other[k]) for k in ref if ref[k].is_floating_point())


def test_cyclegan_terms_follow_the_comi_formula(defocus_cfg):
    """Every logged term equals its definition, computed here on the nets before the step
    (generators perturbed away from the identity their residual start gives)."""
    from napari_microrestore.models.losses import gan_loss

    t = _trainer(defocus_cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for g in (t.net, t.g_ba):
            g.net[-1].weight.normal_(std=0.05)
    x, y, m = _batch(defocus_cfg)
    for n in (t.net, t.g_ba, t.d_a, t.d_b):
        n.train()
    l1 = torch.nn.functional.l1_loss
    with torch.no_grad():
        fb, fa = t.net(x), t.g_ba(y)
        ref = {"l1": l1(fb, y), "cycle_A": l1(t.g_ba(fb), x), "cycle_B": l1(t.net(fa), y),
               "idt_A": l1(t.g_ba(x), x), "idt_B": l1(t.net(y), y),
               "adv_A": gan_loss(t.d_a(fa), True), "adv_B": gan_loss(t.d_b(fb), True)}
    total, terms = t.step(x, y, m)
    for k, v in ref.items():
        assert terms[k] == pytest.approx(float(v), rel=1e-4, abs=1e-6), k
    w = defocus_cfg["train"]["weights"]
    expected = (w["content"] * (terms["l1"] + terms["ssim"])
                + w["adversarial"] * (terms["adv_A"] + terms["adv_B"])
                + w["cycle"] * (terms["cycle_A"] + terms["cycle_B"])
                + w["identity"] * (terms["idt_A"] + terms["idt_B"]))
    assert total == pytest.approx(expected, rel=1e-5)


def _reference_losses(t, x, y) -> tuple[dict, dict]:
    """Discriminator and generator losses of the trainer's nets on ``(x, y)``, computed here
    with the reference loss functions, independently of the trainer's step, and each
    discriminator's margin: mean logit on real images minus mean logit on fakes."""
    from napari_microrestore.models.losses import gan_loss, ragan_d_loss, ragan_g_loss

    with torch.no_grad():
        if hasattr(t, "g_ba"):
            d, g, margin = {}, {}, {}
            for name, disc, real, fake in (("A", t.d_a, x, t.g_ba(y)), ("B", t.d_b, y, t.net(x))):
                r, f = disc(real), disc(fake)
                d[name] = float(gan_loss(r, True) + gan_loss(f, False))
                g[name] = float(gan_loss(f, True))
                margin[name] = float(r.mean() - f.mean())
            return d, g, margin
        r, f = t.d(y), t.d(t.net(x))
        return ({"": float(ragan_d_loss(r, f))}, {"": float(ragan_g_loss(r, f))},
                {"": float(r.mean() - f.mean())})


@pytest.mark.parametrize("mode", ["cyclegan", "esrgan"])
def test_discriminators_learn_and_generators_fool_them(mode, defocus_cfg, esrgan_cfg):
    """With the other side frozen (learning rate 0), the discriminators' steps must lower
    their loss and the generators' steps theirs, both measured on the nets with the reference
    losses (not through the trainer's logged terms): catches a detached or sign-flipped
    adversarial loss on either side."""
    cfg = copy.deepcopy(defocus_cfg if mode == "cyclegan" else esrgan_cfg)
    cfg["train"].update(steps=100, lr=0.0)
    cfg["train"]["gan"].update(lr_d=1e-2, norm="none")
    cfg["train"]["weights"] = {"adversarial": 1.0, "content": 0.0}
    if mode == "cyclegan":
        cfg["train"]["gan"]["pool"] = 0
        cfg["train"]["weights"]["cycle"] = 0.0
    x, y, m = _batch(cfg)
    t = _trainer(cfg)
    d0, _, margin0 = _reference_losses(t, x, y)
    for _ in range(10):
        t.step(x, y, m)
    d1, g1, margin1 = _reference_losses(t, x, y)
    assert all(d1[k] < 0.8 * d0[k] and margin1[k] > margin0[k] + 0.15 for k in d0), (
        d0, d1, margin0, margin1)
    # generators alone against the trained, now frozen, discriminators
    t.sched_d.base_lrs = [0.0]
    t.sched.base_lrs = [1e-2]
    t.sched.step()
    t.sched_d.step()
    for _ in range(6):
        t.step(x, y, m)
    _, g2, _ = _reference_losses(t, x, y)
    assert all(g2[k] < 0.95 * g1[k] for k in g1), (g1, g2)


def test_esrgan_init_from_loads_the_phase1_weights(esrgan_cfg, sr_init, tmp_path):
    x = _batch(esrgan_cfg)[0]
    ref = zoo.load_model(sr_init)(x).detach()
    ck = tmp_path / "phase1.pt"
    torch.save({"model": zoo.load_model(sr_init).state_dict(), "step": 7}, ck)
    for spec in (str(sr_init.weights_path), str(sr_init.path), str(ck)):
        cfg = copy.deepcopy(esrgan_cfg)
        cfg["train"]["init_from"] = spec
        net = _trainer(cfg).net.eval()
        assert torch.equal(net(x).detach(), ref), spec
    # a run at learning rate 0 exports exactly the initial weights; the card says from what
    cfg = copy.deepcopy(esrgan_cfg)
    cfg["train"]["lr"] = 0.0
    updates = []
    card = tr.train(cfg, tmp_path / "run", on_update=updates.append,
                    export_dir=tmp_path / "out").card
    assert [u.step for u in updates] == [1, 2, 3]
    assert all(set(u.terms) == {"l1", "adv", "d"} for u in updates)
    assert all(np.isfinite(v) for u in updates for v in u.terms.values())
    init = load_file(str(sr_init.weights_path))
    out = load_file(str(zoo.verify_weights(card)))
    assert set(out) == set(init) and all(torch.equal(out[k], init[k]) for k in init)
    assert card.training["mode"] == "esrgan"
    assert sr_init.weights["sha256"] in card.training["init_from"]


def test_esrgan_trains_with_vgg_discriminator_and_perceptual_content(esrgan_cfg, tmp_path):
    """ESRGAN's VGG-style discriminator and a VGG19 perceptual content term (a random VGG19
    truncated after conv1_2: the state-dict format a user supplies)."""
    from napari_microrestore.models.losses import _vgg19_features

    torch.manual_seed(0)
    vgg = tmp_path / "vgg.pt"
    torch.save({f"features.{k}": v for k, v in _vgg19_features(3).state_dict().items()}, vgg)
    cfg = copy.deepcopy(esrgan_cfg)
    cfg["train"]["gan"] = {"discriminator": "vgg", "ndf": 4}
    cfg["train"].update(content={"l1": 1.0, "perceptual": 0.1}, vgg_weights=str(vgg),
                        vgg_layer=3, steps=2, val_every=2)
    x, y, m = _batch(cfg)
    t = _trainer(cfg)
    before = {k: v.clone() for k, v in t.net.state_dict().items()}
    _, terms = t.step(x, y, m)
    assert set(terms) == {"l1", "perceptual", "adv", "d"}
    assert all(np.isfinite(v) for v in terms.values()) and terms["perceptual"] > 0
    assert not all(torch.equal(before[k], v) for k, v in t.net.state_dict().items())


def test_bad_configs_are_refused(defocus_cfg, esrgan_cfg, tmp_path):
    cfg = copy.deepcopy(defocus_cfg)
    cfg["train"]["mode"] = "wgan"
    with pytest.raises(InputError, match="train.mode"):
        tr.train(cfg, tmp_path / "a")
    cfg = copy.deepcopy(esrgan_cfg)
    cfg["train"]["init_from"] = str(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="not found"):
        tr.train(cfg, tmp_path / "b")
    cfg["train"].pop("init_from")
    with pytest.raises(InputError, match="init_from"):
        tr.train(cfg, tmp_path / "c")
    cfg = copy.deepcopy(esrgan_cfg)
    cfg["kwargs"] = {"nf": 8, "gc": 4, "n_blocks": 1}
    with pytest.raises(InputError, match="does not fit"):
        tr.train(cfg, tmp_path / "d")
    cfg = copy.deepcopy(defocus_cfg)
    cfg["train"]["weights"]["adversarial_typo"] = 1.0
    with pytest.raises(InputError, match="adversarial_typo"):
        tr.train(cfg, tmp_path / "e")
    cfg = copy.deepcopy(esrgan_cfg)  # a 2x task cannot cycle back with the same net
    cfg["train"]["mode"] = "cyclegan"
    with pytest.raises(InputError, match="same shape"):
        tr.train(cfg, tmp_path / "f")


def test_resume_of_another_mode_is_refused(defocus_cfg, tmp_path):
    sup = copy.deepcopy(defocus_cfg)
    sup["train"].update(mode="supervised", steps=1)
    tr.train(sup, tmp_path / "sup")
    gan = copy.deepcopy(defocus_cfg)
    gan["train"]["steps"] = 1
    with pytest.raises(InputError, match="supervised run"):
        tr.train(gan, tmp_path / "sup")
    tr.train(gan, tmp_path / "gan")
    with pytest.raises(InputError, match="cyclegan run"):
        tr.train(sup, tmp_path / "gan")
