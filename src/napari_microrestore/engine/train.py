"""train(): training of the networks from a YAML config, with checkpoints and resume.

Config (``configs/*.yaml``)::

    id: tem-burst-fast                       # the model id the zoo will list
    title: ...
    task: burst-deblur
    architecture: burst-fast
    kwargs: {...}
    input: {frames: {min: 3, max: 7, default: 5}, channels: 1, normalisation: mean-std,
            multiple: 8, register: true}
    data:
      sources: [sstem/gerhard_vnc_stack1.tif, ...]   # under ../shared/data
      licence: ...
      val_fraction: 0.2                      # last 20 % of each stack: validation, never trained
      burst: {patch: 128, frames: [5, 5], blur_length: [6, 14], dose: [12, 80], align: ecc}
    train: {steps: 3000, batch: 8, lr: 0.001, seed: 0, loss: {l1: 1.0, ssim: 1.0},
            val_every: 250, val_bursts: 32, checkpoint_every: 100, threads: 2}

``train.select`` (``ssim`` or ``psnr``, default ``ssim``) is the validation score that picks
the best checkpoint. Optional optimiser settings: ``weight_decay`` (default 1e-4), ``betas``
(AdamW's, default ``[0.9, 0.999]`` in supervised mode), ``lr_min_fraction`` (the cosine
schedule's floor, default 0.05).

Training modes (``train.mode``):

* ``supervised`` (default): the net's output against the target, loss ``train.loss``
  (weighted ``l1``, ``ssim``, ``grad``, over the sample's mask).
* ``cyclegan``: COMI (Zhang et al. 2022) / CycleGAN (Zhu et al. 2017) for same-size,
  single-image tasks (defocus). ``G_AB``, the exported net, maps the input domain (defocused)
  to the target domain (in focus); ``G_BA``, the same architecture, maps back; two
  PatchGAN discriminators judge each domain. Generator loss per batch ``(x, y)``::

      w_adv * (gan(D_B(G_AB(x)), real) + gan(D_A(G_BA(y)), real))
      + w_cycle * (|G_BA(G_AB(x)) - x| + |G_AB(G_BA(y)) - y|)
      + w_content * content(G_AB(x), y)              # pairs exist: COMI's content term
      + w_identity * (|G_AB(y) - y| + |G_BA(x) - x|)

  then the discriminators learn from real images and from CycleGAN's history pool of fakes.
* ``esrgan``: ESRGAN's second phase (Wang et al. 2018): the generator starts from
  ``train.init_from`` (required; phase 1 is a supervised L1 run) and learns
  ``w_content * content(G(x), y) + w_adv * ragan_g_loss`` against a discriminator trained with
  the relativistic average GAN loss.

Settings of the adversarial modes (the values shown are the defaults; cyclegan / esrgan where
they differ)::

    train:
      mode: cyclegan
      gan: {loss: lsgan,          # cyclegan: lsgan | vanilla; esrgan: ragan (the only one)
            discriminator: patch, # patch (PatchGAN) | vgg (esrgan only: ESRGAN's VGG-style,
                                  #   whole-patch logit; the target patch a multiple of 32)
            ndf: 32, n_layers: 3, norm: instance,   # PatchGAN (vgg: ndf only)
            lr_d: 2e-4 / 1e-4,    # discriminator learning rate (same cosine schedule as G)
            betas_d: [0.5, 0.999] / [0.9, 0.99],
            pool: 50}             # cyclegan: CycleGAN's image history (0: none)
      weights: {adversarial: 0.001, cycle: 1.0, content: 1.0, identity: 0.0}   # cyclegan
               {adversarial: 0.005, content: 1.0}                             # esrgan
      content: {l1: 1.0, ssim: 1.0}   # esrgan {l1: 1.0}; terms as train.loss, or add
                                      # perceptual: 1.0 with vgg_weights: <VGG19 state dict>
      vgg_weights: path               # and vgg_layer: 34 (conv5_4 before ReLU, ESRGAN)
      betas: [0.5, 0.999] / [0.9, 0.99]   # generator AdamW
      clip: 1.0                       # generator gradient-norm clip (as the supervised mode)
      init_from: sr2x                 # a zoo model id, a model card (.yaml), a .safetensors
                                      # file or a .pt checkpoint (its "model") / state dict

Terms of weight 0 are not computed; with ``adversarial: 0`` the discriminators are not
trained either. ``init_from`` (any mode; required by esrgan) initialises the exported net at
a fresh start; a resumed run continues from its checkpoint. ``TrainUpdate.terms`` logs every
unweighted term (``l1``, ``ssim``, ``adv_A``, ``adv_B``, ``cycle_A``, ``cycle_B``, ``idt_A``,
``idt_B``, ``d_A``, ``d_B``; esrgan: ``adv``, ``d``); ``TrainUpdate.loss`` is the generator's
weighted total.

Checkpoints (``<workdir>/last.pt``, ``best.pt``) hold the model (the exported net), the
optimiser, the training mode, step, the best validation score and the history, and in the
adversarial modes also the other networks, their optimiser and CycleGAN's image pool; they
are written atomically, read back with ``torch.load(weights_only=True)`` (no arbitrary
unpickling), and a rerun resumes from ``last.pt`` (a checkpoint of another mode is refused).
The best checkpoint by the validation score (SSIM, as Wieslander et al.) is exported to the
zoo as fp16 safetensors with its card: the exported net only, never a discriminator.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import yaml

from ..core.errors import CancelToken, InputError, check_cancel
from .data import make_batch, make_sampler

MODES = ("supervised", "cyclegan", "esrgan")


@dataclass
class TrainUpdate:
    """A typed progress update (the napari scheduler renders these)."""
    step: int
    steps: int
    loss: float
    terms: dict
    val: Optional[dict] = None
    seconds: float = 0.0


@dataclass
class TrainResult:
    best: dict
    history: list = field(default_factory=list)
    workdir: Optional[Path] = None
    card: object = None


def load_config(path: str | Path) -> dict:
    p = Path(path)
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read training config {p}: {e}") from None
    for key in ("id", "task", "architecture", "data", "train"):
        if key not in cfg:
            raise InputError(f"training config {p} lacks '{key}'")
    cfg["_path"] = str(p)
    return cfg


def train_mode(cfg: dict) -> str:
    """The config's ``train.mode`` (default ``supervised``), checked."""
    mode = str(cfg["train"].get("mode", "supervised"))
    if mode not in MODES:
        raise InputError(f"train.mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def validation_set(cfg: dict, n: Optional[int] = None, seed: int = 12345) -> list[dict]:
    """Fixed validation samples from the held-out data (same seed, same set)."""
    sampler = make_sampler(cfg["task"], cfg["data"], "val")
    if getattr(sampler, "spec", None) is not None:
        sampler.n_frames = int(round(np.mean(sampler.spec.frames)))
    rng = np.random.default_rng(seed)
    n = n or int(cfg["train"].get("val_bursts", 32))
    samples = [sampler.sample(rng) for _ in range(n)]
    for s in samples:
        s["burst"] = sampler.burst
    return samples


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_loss(weights: dict):
    """Weighted sum of 'l1', 'ssim' and 'grad' terms over a mask; returns (total, terms)."""

    from ..core.metrics import ssim_torch

    def loss(pred, target, mask):
        terms = {}
        m = mask
        denom = m.sum().clamp_min(1.0)
        if weights.get("l1"):
            terms["l1"] = ((pred - target).abs() * m).sum() / denom
        if weights.get("grad"):
            dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
            dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
            my, mx = m[..., 1:, :] * m[..., :-1, :], m[..., :, 1:] * m[..., :, :-1]
            terms["grad"] = (((dy(pred) - dy(target)).abs() * my).sum() / my.sum().clamp_min(1)
                             + ((dx(pred) - dx(target)).abs() * mx).sum() / mx.sum().clamp_min(1))
        if weights.get("ssim"):
            rng_t = (target.flatten(1).amax(1) - target.flatten(1).amin(1)).clamp_min(1e-3)
            # fill the uncovered border with the target so it does not count against SSIM
            p = pred * m + target * (1 - m)
            terms["ssim"] = 1.0 - ssim_torch(p, target, data_range=rng_t)
        total = sum(float(weights[k]) * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}

    return loss


def check_betas(value, what: str) -> tuple[float, float]:
    """Adam's ``betas`` from a config: two numbers in [0, 1)."""
    try:
        b = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        b = ()
    if len(b) != 2 or not all(0 <= v < 1 for v in b):
        raise InputError(f"{what} must be two numbers in [0, 1); got {value!r}")
    return b


def make_optimizer(params, tcfg: dict, *, lr: Optional[float] = None,
                   weight_decay: Optional[float] = None,
                   betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW with the config's ``lr``, ``weight_decay`` (default 1e-4) and ``betas`` (default
    ``betas``); the explicit ``lr`` / ``weight_decay`` arguments win (the discriminators)."""
    import torch

    b = check_betas(tcfg.get("betas", betas), "train.betas")
    return torch.optim.AdamW(
        params, lr=float(tcfg.get("lr", 1e-3)) if lr is None else lr,
        weight_decay=float(tcfg.get("weight_decay", 1e-4)) if weight_decay is None
        else weight_decay, betas=b)


def cosine_schedule(opt, tcfg: dict):
    """Cosine decay of ``opt``'s learning rate over ``train.steps`` to ``lr_min_fraction``."""
    import torch

    steps = int(tcfg["steps"])
    lr_min = float(tcfg.get("lr_min_fraction", 0.05))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_min + (1 - lr_min) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


class SupervisedTrainer:
    """One network, one loss against the target (the default mode).

    ``net`` is the exported network; ``step(x, y, mask)`` does one optimiser step and returns
    ``(total, terms)``; ``state()`` / ``load(ck)`` give and take the checkpoint's entries.
    """

    mode = "supervised"

    def __init__(self, cfg: dict, device: str) -> None:
        import torch

        from ..models import build

        tcfg = cfg["train"]
        self.device = device
        torch.manual_seed(int(tcfg.get("seed", 0)))
        self.net = build(cfg["architecture"], cfg.get("kwargs", {})).to(device)
        self.init_note = load_init(self.net, cfg) if tcfg.get("init_from") else None
        self.opt = make_optimizer(self.net.parameters(), tcfg)
        self.sched = cosine_schedule(self.opt, tcfg)
        self.loss_fn = make_loss(tcfg.get("loss", {"l1": 1.0, "ssim": 1.0}))

    def step(self, x, y, m) -> tuple[float, dict]:
        import torch

        self.net.train()
        with autocast(self.device):
            pred = self.net(x)
        total, terms = self.loss_fn(pred.float(), y, m)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        return float(total.detach()), terms

    def state(self) -> dict:
        return {"model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load(self, ck: dict) -> None:
        self.net.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])

    def card_notes(self) -> dict:
        return {"init_from": self.init_note} if self.init_note else {}


def autocast(device: str):
    """bf16 autocast on CUDA, a no-op elsewhere (CPU trains in fp32)."""
    import torch

    return torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                          enabled=device.startswith("cuda"))


def load_init(net, cfg: dict) -> str:
    """Load ``train.init_from`` into ``net``; returns a line for the card's provenance.

    ``init_from`` is a zoo model id or a model card (weights checked against the card's
    sha256), a ``.safetensors`` weights file, or a ``.pt`` / ``.pth`` file: a checkpoint of
    this trainer (its ``model``) or a plain state dict, read with ``weights_only=True``.
    The architecture must match the config's exactly (every key, every shape).
    """
    import torch

    from ..models import zoo

    spec = str(cfg["train"]["init_from"])
    p = Path(spec).expanduser()
    suffix = p.suffix.lower()
    if suffix in (".safetensors", ".pt", ".pth") and not p.is_file():
        raise InputError(f"train.init_from file not found: {p}")
    if p.is_file() and suffix in (".safetensors", ".pt", ".pth"):
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                state = load_file(str(p))
            except Exception as e:  # a corrupt or foreign file
                raise InputError(f"cannot read train.init_from {p}: {e}") from None
        else:
            try:
                state = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as e:  # pickle / zip errors of a file that is not a checkpoint
                raise InputError(f"cannot read train.init_from {p}: {e}") from None
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]
        if not isinstance(state, dict):
            raise InputError(f"train.init_from {p} does not hold a state dict")
        note = f"{p} (sha256 {zoo.sha256_file(p)})"
    else:
        card = zoo.get_card(spec)
        if card.is_classical:
            raise InputError(f"train.init_from {spec!r} is a classical method with no weights")
        if (card.architecture, dict(card.kwargs)) != (cfg["architecture"],
                                                      dict(cfg.get("kwargs") or {})):
            raise InputError(
                f"train.init_from model {card.id} is {card.architecture} {dict(card.kwargs)}, "
                f"but the config builds {cfg['architecture']} {dict(cfg.get('kwargs') or {})}")
        state = zoo.load_model(card).state_dict()
        note = f"model {card.id} (sha256 {card.weights['sha256']})"
    own = net.state_dict()
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v
             for k, v in state.items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise InputError(f"train.init_from {spec} does not fit the config's "
                         f"{cfg['architecture']} network: {' '.join(first)}") from None
    return note


def make_trainer(cfg: dict, device: str, probe: dict):
    """The trainer of the config's mode; ``probe`` is one validation sample (its shapes)."""
    mode = train_mode(cfg)
    if mode == "supervised":
        return SupervisedTrainer(cfg, device)
    from .train_gan import CycleGANTrainer, ESRGANTrainer

    return (CycleGANTrainer if mode == "cyclegan" else ESRGANTrainer)(cfg, device, probe)


def evaluate_net(net, samples: list[dict], device: str = "cpu") -> dict:
    """Mean PSNR / SSIM (normalised space, over the mask, after a gain + offset fit) of ``net``
    on prepared validation samples, and the same for each sample's classical ``base``
    (registered mean, bicubic, neighbour average, the defocused input)."""
    import torch

    from ..core import metrics

    net.eval()
    scores = {"psnr": [], "ssim": [], "mean_psnr": [], "mean_ssim": []}
    with torch.inference_mode():
        for s in samples:
            x = torch.from_numpy(s["x"])[None]
            if s.get("burst"):
                x = x[:, :, None]
            pred = net(x.to(device))[0, 0].float().cpu().numpy()
            mask = s["mask"][0] > 0
            for key, img in (("", pred), ("mean_", s["base"])):
                r = metrics.compare(img, s["y"][0], mask=mask, fit=True)
                scores[key + "psnr"].append(r["psnr"])
                scores[key + "ssim"].append(r["ssim"])
    return {k: float(np.mean(v)) for k, v in scores.items()}


def train(cfg: dict, workdir: str | Path, *, max_minutes: Optional[float] = None,
          on_update: Optional[Callable[[TrainUpdate], None]] = None,
          cancel: Optional[CancelToken] = None, export_dir: Optional[Path] = None,
          device: str = "cpu") -> TrainResult:
    """Train (or resume) the network of ``cfg``; export the best checkpoint to ``export_dir``.

    ``device``: "cpu", "cuda", "cuda:N" or "auto"; on CUDA the forward / loss run under bf16
    autocast. Checkpoints are always stored on the CPU, so a run can resume on another device.
    """
    from .restore import resolve_device

    device = resolve_device(device)
    import torch

    from ..models.zoo import save_model

    tcfg = cfg["train"]
    mode = train_mode(cfg)
    torch.set_num_threads(int(tcfg.get("threads", os.cpu_count() or 1)))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seed = int(tcfg.get("seed", 0))
    steps = int(tcfg["steps"])
    # the validation score that picks the exported checkpoint ("ssim", as Wieslander et al.,
    # or "psnr" where the card's quality floor is a PSNR gain, e.g. sr2x)
    select = str(tcfg.get("select", "ssim"))
    if select not in ("ssim", "psnr"):
        raise InputError(f"train.select must be 'ssim' or 'psnr'; got {select!r}")
    sampler = make_sampler(cfg["task"], cfg["data"], "train")
    val = validation_set(cfg)
    trainer = make_trainer(cfg, device, val[0])
    net = trainer.net
    step, best = 0, {select: -math.inf, "step": 0}
    history: list = []
    rng = np.random.default_rng(seed)
    last = workdir / "last.pt"
    if last.exists():
        ck = torch.load(last, weights_only=True, map_location=device)
        ck_mode = str(ck.get("mode", "supervised"))
        if ck_mode != mode:
            raise InputError(f"{last} is a checkpoint of a {ck_mode} run, but the config asks "
                             f"for train.mode {mode}; use another --workdir")
        trainer.load(ck)
        step, best = int(ck["step"]), json.loads(ck["best"])
        history = json.loads(ck["history"])
        rng = np.random.default_rng(seed + step)  # a fresh, reproducible stream after resume

    batch = int(tcfg.get("batch", 8))
    val_every = int(tcfg.get("val_every", 250))
    ck_every = int(tcfg.get("checkpoint_every", 100))
    t_start = time.perf_counter()

    def checkpoint(path: Path) -> None:
        _atomic_torch_save({**trainer.state(), "mode": mode, "step": step,
                            "best": json.dumps(best), "history": json.dumps(history)}, path)

    while step < steps:
        check_cancel(cancel)
        if max_minutes is not None and (time.perf_counter() - t_start) > 60 * max_minutes:
            break
        b = make_batch(sampler, rng, batch)
        x, y, m = (torch.from_numpy(b[k]).to(device, non_blocking=True)
                   for k in ("x", "y", "mask"))
        total, terms = trainer.step(x, y, m)
        step += 1
        upd = TrainUpdate(step, steps, total, terms, seconds=time.perf_counter() - t_start)
        if step % val_every == 0 or step == steps:
            upd.val = evaluate_net(net, val, device=device)
            history.append({"step": step, **upd.val, "loss": upd.loss})
            if upd.val[select] > best.get(select, -math.inf):
                best = {"step": step, **upd.val}
                checkpoint(workdir / "best.pt")
        if step % ck_every == 0 or step == steps:
            checkpoint(last)
        if on_update is not None:
            on_update(upd)
    checkpoint(last)

    result = TrainResult(best=best, history=history, workdir=workdir)
    if export_dir is not None and (workdir / "best.pt").exists():
        ck = torch.load(workdir / "best.pt", weights_only=True, map_location="cpu")
        net = net.cpu()
        net.load_state_dict(ck["model"])
        card = {k: cfg[k] for k in ("id", "title", "task", "architecture", "kwargs", "input",
                                    "description") if k in cfg}
        card["training"] = {
            "data": list(cfg["data"].get("sources", [cfg["data"].get("name", "")])),
            "licence": cfg["data"].get("licence", ""),
            "command": f"microrestore train {cfg.get('_path', '<config>')}",
            "device": (torch.cuda.get_device_name(device) if device.startswith("cuda")
                       else f"cpu ({torch.get_num_threads()} threads)"),
            "steps": int(best["step"]), "best_val": best,
            **trainer.card_notes(),
        }
        result.card = save_model(net, card, export_dir)
    return result
