"""train(): supervised training of the burst networks from a YAML config, with checkpoints.

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
the best checkpoint.

Checkpoints (``<workdir>/last.pt``, ``best.pt``) hold the model, optimiser, step, the best
validation SSIM and the RNG state; they are written atomically, read back with
``torch.load(weights_only=True)`` (no arbitrary unpickling), and a rerun resumes from
``last.pt``. The best checkpoint by validation SSIM (as Wieslander et al.) is exported to the
zoo as fp16 safetensors with its card.
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
    import torch

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

    from ..models import build
    from ..models.zoo import save_model

    tcfg = cfg["train"]
    torch.set_num_threads(int(tcfg.get("threads", os.cpu_count() or 1)))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seed = int(tcfg.get("seed", 0))
    torch.manual_seed(seed)
    net = build(cfg["architecture"], cfg.get("kwargs", {})).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=float(tcfg.get("lr", 1e-3)),
                            weight_decay=float(tcfg.get("weight_decay", 1e-4)))
    steps = int(tcfg["steps"])
    lr_min = float(tcfg.get("lr_min_fraction", 0.05))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_min + (1 - lr_min) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    # the validation score that picks the exported checkpoint ("ssim", as Wieslander et al.,
    # or "psnr" where the card's quality floor is a PSNR gain, e.g. sr2x)
    select = str(tcfg.get("select", "ssim"))
    if select not in ("ssim", "psnr"):
        raise InputError(f"train.select must be 'ssim' or 'psnr'; got {select!r}")
    step, best = 0, {select: -math.inf, "step": 0}
    history: list = []
    rng = np.random.default_rng(seed)
    last = workdir / "last.pt"
    if last.exists():
        ck = torch.load(last, weights_only=True, map_location=device)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, best = int(ck["step"]), json.loads(ck["best"])
        history = json.loads(ck["history"])
        rng = np.random.default_rng(seed + step)  # a fresh, reproducible stream after resume

    sampler = make_sampler(cfg["task"], cfg["data"], "train")
    val = validation_set(cfg)
    loss_fn = make_loss(tcfg.get("loss", {"l1": 1.0, "ssim": 1.0}))
    batch = int(tcfg.get("batch", 8))
    val_every = int(tcfg.get("val_every", 250))
    ck_every = int(tcfg.get("checkpoint_every", 100))
    t_start = time.perf_counter()

    def checkpoint(path: Path) -> None:
        cpu_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        _atomic_torch_save({"model": cpu_state, "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "step": step,
                            "best": json.dumps(best), "history": json.dumps(history)}, path)

    while step < steps:
        check_cancel(cancel)
        if max_minutes is not None and (time.perf_counter() - t_start) > 60 * max_minutes:
            break
        net.train()
        b = make_batch(sampler, rng, batch)
        x, y, m = (torch.from_numpy(b[k]).to(device, non_blocking=True)
                   for k in ("x", "y", "mask"))
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                            enabled=device.startswith("cuda")):
            pred = net(x)
        total, terms = loss_fn(pred.float(), y, m)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        upd = TrainUpdate(step, steps, float(total.detach()), terms,
                          seconds=time.perf_counter() - t_start)
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
        }
        result.card = save_model(net, card, export_dir)
    return result
