"""Adversarial training modes of :func:`napari_microrestore.engine.train.train`.

* :class:`CycleGANTrainer` (``train.mode: cyclegan``): COMI-style defocus correction (Zhang et
  al., Comput. Struct. Biotechnol. J. 2022), a CycleGAN (Zhu et al. 2017) with a weighted
  multi-term generator loss: adversarial, cycle consistency, content on the pairs (the data
  here are paired, so COMI's content term applies) and an optional identity term.
* :class:`ESRGANTrainer` (``train.mode: esrgan``): ESRGAN's second phase (Wang et al. 2018),
  content + relativistic average adversarial loss, from the phase-1 (L1) weights.

Both follow the protocol of :class:`~napari_microrestore.engine.train.SupervisedTrainer`
(``net``, ``step``, ``state``, ``load``, ``card_notes``), so validation, best-checkpoint
selection, export and resume are those of the supervised mode. The config keys and their
defaults are documented in :mod:`napari_microrestore.engine.train`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

from ..core.errors import InputError
from ..models import build
from ..models.defocus_gan import PatchDiscriminator
from ..models.losses import VGGPerceptualLoss, cycle_loss, gan_loss, ragan_d_loss, ragan_g_loss
from .train import (autocast, check_betas, cosine_schedule, load_init, make_loss,
                    make_optimizer)

# weights of the generator's loss terms and their defaults, per mode (COMI: adversarial
# 0.001, content and cycle 1; ESRGAN without its perceptual term: see ESRGANTrainer)
WEIGHTS = {
    "cyclegan": {"adversarial": 0.001, "cycle": 1.0, "content": 1.0, "identity": 0.0},
    "esrgan": {"adversarial": 0.005, "content": 1.0},
}
# train.gan defaults per mode: CycleGAN's (Adam betas 0.5, D lr 2e-4, pool 50) and ESRGAN's
# (Adam betas (0.9, 0.99), lr 1e-4)
GAN = {
    "cyclegan": {"loss": "lsgan", "discriminator": "patch", "ndf": 32, "n_layers": 3,
                 "norm": "instance", "lr_d": 2e-4, "betas_d": (0.5, 0.999), "pool": 50},
    "esrgan": {"loss": "ragan", "discriminator": "patch", "ndf": 32, "n_layers": 3,
               "norm": "instance", "lr_d": 1e-4, "betas_d": (0.9, 0.99)},
}
G_BETAS = {"cyclegan": (0.5, 0.999), "esrgan": (0.9, 0.99)}
CONTENT = {"cyclegan": {"l1": 1.0, "ssim": 1.0}, "esrgan": {"l1": 1.0}}


def _settings(given: dict | None, defaults: dict, what: str) -> dict:
    """``defaults`` updated by the config's ``given`` mapping; unknown keys are refused."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise InputError(f"unknown {what} setting {unknown[0]!r}; known: "
                         f"{', '.join(defaults)}")
    return {**defaults, **given}


def _number(value, what: str) -> float:
    """``value`` as a float >= 0 (YAML reads ``2e-4`` as a string: it is accepted)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not v >= 0:
        raise InputError(f"{what} must be a number >= 0; got {value!r}")
    return v


def _weights(tcfg: dict, mode: str) -> dict:
    w = _settings(tcfg.get("weights"), WEIGHTS[mode], f"train.weights ({mode})")
    return {k: _number(v, f"train.weights.{k}") for k, v in w.items()}


def content_terms(tcfg: dict, mode: str) -> dict:
    """``train.content`` (else ``train.loss``, else the mode's default), checked: the terms of
    :func:`~napari_microrestore.engine.train.make_loss` and ``perceptual``."""
    terms = dict(tcfg.get("content", tcfg.get("loss", CONTENT[mode])))
    unknown = sorted(set(terms) - {"l1", "ssim", "grad", "perceptual"})
    if unknown:
        raise InputError(f"unknown train.content term {unknown[0]!r}; known: l1, ssim, grad, "
                         "perceptual")
    terms = {k: _number(v, f"train.content.{k}") for k, v in terms.items()}
    if not any(terms.values()):
        raise InputError(f"train.content needs a term of weight > 0; got {terms}")
    return terms


def make_content_loss(terms: dict, tcfg: dict, device: str):
    """The content term: :func:`~napari_microrestore.engine.train.make_loss` of ``terms``
    (``l1``, ``ssim``, ``grad`` over the mask, as the supervised mode), plus ``perceptual``
    (the VGG19 loss of ``train.vgg_weights`` / ``train.vgg_layer``) with the uncovered border
    filled from the target. Returns ``fn(pred, target, mask) -> (total, {name: unweighted
    value})``."""
    pixel_terms = {k: v for k, v in terms.items() if k != "perceptual"}
    w_vgg = terms.get("perceptual", 0.0)
    pixel = make_loss(pixel_terms) if any(pixel_terms.values()) else None
    vgg = (VGGPerceptualLoss(tcfg.get("vgg_weights"), int(tcfg.get("vgg_layer", 34))).to(device)
           if w_vgg else None)

    def loss(pred, target, mask):
        total, parts = pixel(pred, target, mask) if pixel else (pred.new_zeros(()), {})
        if vgg is not None:
            value = vgg(pred * mask + target * (1 - mask), target)
            total = total + w_vgg * value
            parts["perceptual"] = float(value.detach())
        return total, parts

    return loss


def _discriminator(gcfg: dict, channels: int, size: int) -> nn.Module:
    kind = str(gcfg["discriminator"])
    if kind == "patch":
        return PatchDiscriminator(channels, ndf=int(gcfg["ndf"]), n_layers=int(gcfg["n_layers"]),
                                  norm=str(gcfg["norm"]))
    if kind == "vgg":
        from ..models.rrdb import RelativisticDiscriminator

        return RelativisticDiscriminator(channels, nf=int(gcfg["ndf"]), patch_size=size)
    raise InputError(f"train.gan.discriminator must be 'patch' or 'vgg'; got {kind!r}")


def _requires_grad(nets, flag: bool) -> None:
    for n in nets:
        for p in n.parameters():
            p.requires_grad_(flag)


def _module_state(net: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al. 2017): the discriminator
    sees, for each new fake, with probability 1/2 an older one instead (which the new one
    replaces), so it does not forget what the generator used to make."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 0:
            raise InputError(f"train.gan.pool must be >= 0; got {size}")
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = np.random.default_rng(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of the same shape: each image, or a stored older one."""
        if self.size == 0:
            return images
        if self.images and self.images[0].shape != images.shape[1:]:
            self.images = []  # the patch size changed (a resumed run with another config)
        out = []
        for img in images.detach():
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif self.rng.random() < 0.5:
                i = int(self.rng.integers(self.size))
                out.append(self.images[i].clone())
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state(self) -> torch.Tensor:
        if not self.images:
            return torch.zeros(0)
        return torch.stack(self.images).cpu()

    def load(self, images: torch.Tensor, device: str, seed: int) -> None:
        self.images = [im.to(device) for im in images][: self.size]
        self.rng = np.random.default_rng(seed)


class _AdversarialTrainer:
    """What both modes share: the generator (``net``, built and seeded as in the supervised
    mode, optionally loaded from ``init_from``), its optimiser and schedule, the
    discriminators' optimiser and schedule, checkpoint entries and card notes."""

    mode = ""

    def __init__(self, cfg: dict, device: str, probe: dict) -> None:
        tcfg = cfg["train"]
        self.device = device
        self.seed = int(tcfg.get("seed", 0))
        self.w = _weights(tcfg, self.mode)
        self.gcfg = _settings(tcfg.get("gan"), GAN[self.mode], f"train.gan ({self.mode})")
        self.clip = float(tcfg.get("clip", 1.0))
        self.content_terms = content_terms(tcfg, self.mode)
        self.content = make_content_loss(self.content_terms, tcfg, device)
        torch.manual_seed(self.seed)  # the generator starts as the supervised mode's would
        self.net = build(cfg["architecture"], cfg.get("kwargs", {})).to(device)
        self.init_note = load_init(self.net, cfg) if tcfg.get("init_from") else None
        self.channels = int(probe["y"].shape[0])
        self.size = int(probe["y"].shape[-1])

    def _optimisers(self, tcfg: dict, g_params, d_params) -> None:
        self.g_params, self.d_params = list(g_params), list(d_params)
        self.opt = make_optimizer(self.g_params, tcfg, betas=G_BETAS[self.mode])
        self.sched = cosine_schedule(self.opt, tcfg)
        lr_d = _number(self.gcfg["lr_d"], "train.gan.lr_d")
        betas_d = check_betas(self.gcfg["betas_d"], "train.gan.betas_d")
        self.opt_d = torch.optim.Adam(self.d_params, lr=lr_d, betas=betas_d)
        self.sched_d = cosine_schedule(self.opt_d, tcfg)

    def _g_update(self, total: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.g_params, self.clip)
        self.opt.step()
        self.sched.step()

    def _d_update(self, loss: torch.Tensor) -> None:
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        self.sched_d.step()

    def _nets(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def state(self) -> dict:
        return {"model": _module_state(self.net),
                "nets": {k: _module_state(n) for k, n in self._nets().items()},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "optimizer_d": self.opt_d.state_dict(), "scheduler_d": self.sched_d.state_dict()}

    def load(self, ck: dict) -> None:
        self.net.load_state_dict(ck["model"])
        for k, n in self._nets().items():
            n.load_state_dict(ck["nets"][k])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.opt_d.load_state_dict(ck["optimizer_d"])
        self.sched_d.load_state_dict(ck["scheduler_d"])

    def card_notes(self) -> dict:
        notes = {"mode": self.mode, "loss_weights": dict(self.w),
                 "content": dict(self.content_terms),
                 "gan": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in self.gcfg.items()}}
        if self.init_note:
            notes["init_from"] = self.init_note
        return notes


class CycleGANTrainer(_AdversarialTrainer):
    """COMI / CycleGAN: ``net`` = ``G_AB`` (input domain A -> target domain B), ``g_ba`` the
    way back, ``d_a`` / ``d_b`` PatchGAN discriminators of each domain (see the generator loss
    in :mod:`napari_microrestore.engine.train`). Discriminators: ``(gan(D(real), real) +
    gan(D(pool(fake)), fake)) / 2`` each, as CycleGAN."""

    mode = "cyclegan"

    def __init__(self, cfg: dict, device: str, probe: dict) -> None:
        if probe.get("burst") or probe["x"].shape != probe["y"].shape:
            raise InputError(
                f"train.mode cyclegan needs a single-image task whose input and target have "
                f"the same shape (e.g. defocus); task {cfg['task']!r} gives inputs "
                f"{tuple(probe['x'].shape)} and targets {tuple(probe['y'].shape)}")
        super().__init__(cfg, device, probe)
        if getattr(self.net, "scale", 1) != 1:
            raise InputError(f"train.mode cyclegan needs a same-size generator; "
                             f"{cfg['architecture']} has scale {self.net.scale} (use esrgan)")
        if self.gcfg["loss"] not in ("lsgan", "vanilla"):
            raise InputError(f"train.gan.loss must be 'lsgan' or 'vanilla' for cyclegan; got "
                             f"{self.gcfg['loss']!r}")
        if self.gcfg["discriminator"] != "patch":
            raise InputError("train.mode cyclegan uses PatchGAN discriminators "
                             "(train.gan.discriminator: patch)")
        self.g_ba = build(cfg["architecture"], cfg.get("kwargs", {})).to(device)
        self.d_a = _discriminator(self.gcfg, self.channels, self.size).to(device)
        self.d_b = _discriminator(self.gcfg, self.channels, self.size).to(device)
        self._optimisers(cfg["train"], itertools.chain(self.net.parameters(),
                                                       self.g_ba.parameters()),
                         itertools.chain(self.d_a.parameters(), self.d_b.parameters()))
        self.pool_a = ImagePool(int(self.gcfg["pool"]), self.seed + 1)
        self.pool_b = ImagePool(int(self.gcfg["pool"]), self.seed + 2)

    def _nets(self) -> dict[str, nn.Module]:
        return {"g_ba": self.g_ba, "d_a": self.d_a, "d_b": self.d_b}

    def _gan(self, disc: nn.Module, img: torch.Tensor, real: bool) -> torch.Tensor:
        with autocast(self.device):
            logits = disc(img)
        return gan_loss(logits.float(), real, self.gcfg["loss"])

    def step(self, x, y, m) -> tuple[float, dict]:
        w, terms = self.w, {}
        g_ab, g_ba, d_a, d_b = self.net, self.g_ba, self.d_a, self.d_b
        for n in (g_ab, g_ba, d_a, d_b):
            n.train()
        _requires_grad((d_a, d_b), False)  # the generator step leaves the discriminators be
        with autocast(self.device):
            fake_b = g_ab(x).float()
            fake_a = g_ba(y).float()
        total = x.new_zeros(())
        if w["content"]:
            content, parts = self.content(fake_b, y, m)
            total = total + w["content"] * content
            terms.update(parts)
        if w["adversarial"]:
            adv_b, adv_a = self._gan(d_b, fake_b, True), self._gan(d_a, fake_a, True)
            total = total + w["adversarial"] * (adv_a + adv_b)
            terms.update(adv_A=float(adv_a.detach()), adv_B=float(adv_b.detach()))
        if w["cycle"]:
            with autocast(self.device):
                rec_a, rec_b = g_ba(fake_b).float(), g_ab(fake_a).float()
            cyc_a, cyc_b = cycle_loss(rec_a, x), cycle_loss(rec_b, y)
            total = total + w["cycle"] * (cyc_a + cyc_b)
            terms.update(cycle_A=float(cyc_a.detach()), cycle_B=float(cyc_b.detach()))
        if w["identity"]:
            with autocast(self.device):
                idt_b, idt_a = g_ab(y).float(), g_ba(x).float()
            i_a, i_b = cycle_loss(idt_a, x), cycle_loss(idt_b, y)
            total = total + w["identity"] * (i_a + i_b)
            terms.update(idt_A=float(i_a.detach()), idt_B=float(i_b.detach()))
        self._g_update(total)
        if w["adversarial"]:
            _requires_grad((d_a, d_b), True)
            loss_a = 0.5 * (self._gan(d_a, x, True)
                            + self._gan(d_a, self.pool_a.query(fake_a.detach()), False))
            loss_b = 0.5 * (self._gan(d_b, y, True)
                            + self._gan(d_b, self.pool_b.query(fake_b.detach()), False))
            self._d_update(loss_a + loss_b)
            terms.update(d_A=float(loss_a.detach()), d_B=float(loss_b.detach()))
        return float(total.detach()), terms

    def state(self) -> dict:
        return {**super().state(), "pool_a": self.pool_a.state(), "pool_b": self.pool_b.state()}

    def load(self, ck: dict) -> None:
        super().load(ck)
        step = int(ck["step"])  # fresh, reproducible pool draws after a resume
        self.pool_a.load(ck["pool_a"], self.device, self.seed + 1 + 1000 * step)
        self.pool_b.load(ck["pool_b"], self.device, self.seed + 2 + 1000 * step)


class ESRGANTrainer(_AdversarialTrainer):
    """ESRGAN phase 2 without the perceptual term (no VGG19 weights can be shipped):
    ``w_content * content(G(x), y) + w_adv * ragan_g_loss(D(y), D(G(x)))`` (real logits
    detached, as ESRGAN), the discriminator trained with ``ragan_d_loss``.

    Defaults: content L1 weight 1 and adversarial weight 5e-3. ESRGAN weighs L1 by 1e-2 and
    the adversarial term by 5e-3 beside a perceptual term of weight 1 that carries most of
    the gradient; without that term, L1 of weight 1 keeps the generator at its phase-1
    answer and the adversarial term nudges it towards sharper output, so that a PSNR- or
    SSIM-selected checkpoint invents little texture (raise ``adversarial`` for more).

    Discriminator: PatchGAN by default (``train.gan.discriminator: patch``), not ESRGAN's
    VGG-style network (``vgg``, also available): it takes any patch size (the VGG one needs a
    multiple of 32 and is sized for it), gives one logit per 70 px patch (many relativistic
    comparisons per batch where the VGG net gives one per image, which matters with the
    small CPU batches) and costs a fraction of the VGG net's compute and parameters.
    """

    mode = "esrgan"

    def __init__(self, cfg: dict, device: str, probe: dict) -> None:
        if not cfg["train"].get("init_from"):
            raise InputError("train.mode esrgan is ESRGAN's second phase and needs "
                             "train.init_from (the phase-1 weights: a zoo id, a .safetensors "
                             "file or a .pt checkpoint)")
        super().__init__(cfg, device, probe)
        if self.gcfg["loss"] != "ragan":
            raise InputError(f"train.mode esrgan uses the relativistic average GAN loss "
                             f"(train.gan.loss: ragan); got {self.gcfg['loss']!r}")
        self.d = _discriminator(self.gcfg, self.channels, self.size).to(device)
        self._optimisers(cfg["train"], self.net.parameters(), self.d.parameters())

    def _nets(self) -> dict[str, nn.Module]:
        return {"d": self.d}

    def _logits(self, img: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return self.d(img).float()

    def step(self, x, y, m) -> tuple[float, dict]:
        w, terms = self.w, {}
        self.net.train()
        self.d.train()
        _requires_grad((self.d,), False)
        with autocast(self.device):
            fake = self.net(x).float()
        total = x.new_zeros(())
        if w["content"]:
            content, parts = self.content(fake, y, m)
            total = total + w["content"] * content
            terms.update(parts)
        if w["adversarial"]:
            adv = ragan_g_loss(self._logits(y).detach(), self._logits(fake))
            total = total + w["adversarial"] * adv
            terms["adv"] = float(adv.detach())
        self._g_update(total)
        if w["adversarial"]:
            _requires_grad((self.d,), True)
            d_loss = ragan_d_loss(self._logits(y), self._logits(fake.detach()))
            self._d_update(d_loss)
            terms["d"] = float(d_loss.detach())
        return float(total.detach()), terms
