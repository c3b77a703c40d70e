"""Training losses: pixel, gradient, SSIM, perceptual, adversarial and cycle-consistency.

Image losses take ``(pred, target)`` tensors of shape ``(N, C, H, W)`` (in the engine's
normalised space) and return a scalar tensor (the mean over the batch). They are combined,
with weights and names for logging, by :class:`CompositeLoss`.

Adversarial losses take discriminator logits (unbounded real numbers; "real" is positive):

* :func:`gan_loss`: LSGAN (CycleGAN's default) or the vanilla (binary cross-entropy) GAN;
* :func:`ragan_d_loss` / :func:`ragan_g_loss`: the relativistic average GAN of ESRGAN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InputError
from ..core.metrics import ssim_torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_pair(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if pred.dim() != 4 or pred.shape != target.shape:
        raise InputError(f"{what} needs two (N, C, H, W) tensors of the same shape; got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")


# --------------------------------------------------------------------------------------------
# image losses
# --------------------------------------------------------------------------------------------
def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference."""
    _check_pair(pred, target, "the L1 loss")
    return F.l1_loss(pred, target)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 distance between the images' finite differences, the mean of the vertical and the
    horizontal term: blind to a constant offset, it rewards sharp and correctly placed edges."""
    _check_pair(pred, target, "the gradient loss")
    if min(pred.shape[-2:]) < 2:
        raise InputError(f"the gradient loss needs at least 2x2 pixels; got "
                         f"{pred.shape[-2]}x{pred.shape[-1]}")
    dy = F.l1_loss(pred.diff(dim=-2), target.diff(dim=-2))
    dx = F.l1_loss(pred.diff(dim=-1), target.diff(dim=-1))
    return 0.5 * (dy + dx)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - SSIM`` (Gaussian window, :func:`~napari_microrestore.core.metrics.ssim_torch`),
    with each sample's data range taken from its target (``max - min``, at least 1e-6)."""
    _check_pair(pred, target, "the SSIM loss")
    t = target.detach().flatten(1)
    data_range = (t.max(1).values - t.min(1).values).clamp_min(1e-6)
    return 1 - ssim_torch(pred, target, data_range=data_range, reduction="mean")


def cycle_loss(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """CycleGAN's cycle-consistency loss: L1 between ``G_BA(G_AB(a))`` and ``a`` (CycleGAN
    weights it by 10 against the adversarial loss)."""
    _check_pair(reconstructed, original, "the cycle-consistency loss")
    return F.l1_loss(reconstructed, original)


# --------------------------------------------------------------------------------------------
# VGG19 perceptual loss
# --------------------------------------------------------------------------------------------
# torchvision's VGG19 "features": convolution widths, "M" = 2x2 max-pool
_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _vgg19_features(last: int) -> nn.Sequential:
    """torchvision's ``vgg19().features[: last + 1]`` (the same indices, so the same keys)."""
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    if not 0 <= last < len(layers):
        raise InputError(f"the VGG19 feature layer must be in 0..{len(layers) - 1}; got {last}")
    return nn.Sequential(*layers[: last + 1])


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a file that is not a state dict
        raise InputError(f"cannot read VGG19 weights from {path}: {e}") from None
    if not isinstance(sd, Mapping):
        raise InputError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(sd)


class VGGPerceptualLoss(nn.Module):
    """L1 distance between VGG19 features of ``pred`` and ``target`` (ESRGAN's perceptual loss).

    torchvision cannot be installed here, so the VGG19 ``features`` layers are built by hand
    and their weights come only from a file the user supplies: a torchvision VGG19 state dict
    (``features.<i>.weight`` keys, as saved by ``torch.save(vgg19(weights=...).state_dict(),
    path)``) or one of the features alone (``<i>.weight``), as ``.pt``/``.pth`` (read with
    ``weights_only=True``) or ``.safetensors``. No default training config uses it.

    Single-channel images are repeated to three channels and fed as they are: the engine's
    zero-mean, unit-std inputs are close to ImageNet-normalised grey images.

    Parameters
    ----------
    weights
        Path of the state dict; required.
    layer
        Index in ``vgg19().features`` of the last layer used: 34 (default) is conv5_4 before
        its ReLU, as in ESRGAN; 35 after it; 26 conv4_4 before its ReLU.
    """

    def __init__(self, weights: Union[str, Path, None] = None, layer: int = 34) -> None:
        super().__init__()
        if weights is None:
            raise InputError("the VGG19 perceptual loss needs a VGG19 state dict file "
                             "(weights=...); none was given and none is bundled")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InputError(f"VGG19 weights file not found: {path}")
        self.features = _vgg19_features(layer)
        sd = _read_state_dict(path)
        if any(k.startswith("features.") for k in sd):
            sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        own = self.features.state_dict()
        missing = [k for k in own if k not in sd]
        if missing:
            raise InputError(f"{path} lacks VGG19 feature weights up to layer {layer} "
                             f"(e.g. {missing[0]!r})")
        bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
        if bad:
            raise InputError(f"{path} is not a VGG19: {bad[0]!r} has shape "
                             f"{tuple(sd[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
        self.features.load_state_dict({k: sd[k] for k in own})
        self.features.eval()
        for p in self.features.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "VGGPerceptualLoss":
        """Keep the frozen feature extractor in eval mode whatever the trainer asks."""
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target, "the perceptual loss")
        if pred.shape[1] not in (1, 3):
            raise InputError(f"the perceptual loss needs 1- or 3-channel images; got "
                             f"{pred.shape[1]} channels")
        if pred.shape[1] == 1:
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        return F.l1_loss(self.features(pred), self.features(target.detach()))


# --------------------------------------------------------------------------------------------
# weighted sum of named terms
# --------------------------------------------------------------------------------------------
TERMS: dict[str, LossFn] = {"l1": l1_loss, "gradient": gradient_loss, "ssim": ssim_loss}


class CompositeLoss(nn.Module):
    """Weighted sum of named loss terms; returns the total and each term for logging.

    Parameters
    ----------
    terms
        ``name -> weight`` for the built-in terms (``"l1"``, ``"gradient"``, ``"ssim"``,
        ``"perceptual"``), or ``name -> (weight, fn)`` with any ``fn(pred, target)`` returning
        a scalar tensor. Weights must be >= 0; terms of weight 0 are not computed.
    vgg_weights, vgg_layer
        The weights file and layer of the ``"perceptual"`` term
        (see :class:`VGGPerceptualLoss`).

    Examples
    --------
    >>> loss = CompositeLoss({"l1": 1.0, "ssim": 0.2, "gradient": 0.1})
    >>> total, parts = loss(pred, target)  # parts: {"l1": 0.12, "ssim": 0.3, ...} (unweighted)
    """

    def __init__(self, terms: Mapping[str, Union[float, tuple[float, LossFn]]], *,
                 vgg_weights: Union[str, Path, None] = None, vgg_layer: int = 34) -> None:
        super().__init__()
        if not terms:
            raise InputError("CompositeLoss needs at least one term; got none")
        self.weights: dict[str, float] = {}
        self._fns: dict[str, LossFn] = {}
        # terms that are modules (the VGG) are registered, so that .to(device) moves them
        self.term_modules = nn.ModuleList()
        for name, spec in terms.items():
            if isinstance(spec, tuple):
                weight, fn = spec
            elif name == "perceptual":
                weight, fn = spec, VGGPerceptualLoss(vgg_weights, vgg_layer)
            elif name in TERMS:
                weight, fn = spec, TERMS[name]
            else:
                raise InputError(f"unknown loss term {name!r}; built-in terms are "
                                 f"{', '.join([*TERMS, 'perceptual'])}, or give (weight, fn)")
            weight = float(weight)
            if not weight >= 0:
                raise InputError(f"the weight of loss term {name!r} must be >= 0; got {weight}")
            self.weights[name] = weight
            self._fns[name] = fn
            if isinstance(fn, nn.Module):
                self.term_modules.append(fn)

    def forward(self, pred: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(total, {name: unweighted value})``; ``total`` carries the gradient."""
        total = pred.new_zeros(())
        parts: dict[str, float] = {}
        for name, weight in self.weights.items():
            if weight == 0:
                continue
            value = self._fns[name](pred, target)
            total = total + weight * value
            parts[name] = float(value.detach())
        return total, parts


# --------------------------------------------------------------------------------------------
# adversarial losses
# --------------------------------------------------------------------------------------------
def gan_loss(logits: torch.Tensor, target_is_real: bool, mode: str = "lsgan") -> torch.Tensor:
    """GAN loss of discriminator ``logits`` against an all-real or all-fake target.

    ``mode="lsgan"``: mean squared distance to 1 (real) or 0 (fake) (Mao et al. 2017,
    CycleGAN's default); ``"vanilla"``: binary cross-entropy with logits (Goodfellow et al.
    2014). The discriminator minimises it with the real label on real and the fake label on
    generated images; the generator with the real label on generated images.
    """
    if mode == "lsgan":
        target = torch.ones_like(logits) if target_is_real else torch.zeros_like(logits)
        return F.mse_loss(logits, target)
    if mode == "vanilla":
        target = torch.ones_like(logits) if target_is_real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)
    raise InputError(f"GAN loss mode must be 'lsgan' or 'vanilla'; got {mode!r}")


def _ragan(real_logits: torch.Tensor, fake_logits: torch.Tensor,
           real_label: float) -> torch.Tensor:
    if real_logits.shape != fake_logits.shape:
        raise InputError("RaGAN losses need real and fake logits of the same shape; got "
                         f"{tuple(real_logits.shape)} and {tuple(fake_logits.shape)}")
    rel_real = real_logits - fake_logits.mean()
    rel_fake = fake_logits - real_logits.mean()
    bce = F.binary_cross_entropy_with_logits
    return 0.5 * (bce(rel_real, torch.full_like(rel_real, real_label))
                  + bce(rel_fake, torch.full_like(rel_fake, 1 - real_label)))


def ragan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """ESRGAN's relativistic average discriminator loss.

    With ``D(a, b) = sigmoid(C(a) - mean C(b))``: ``-(log D(real, fake) + log(1 - D(fake,
    real))) / 2``, averaged over the batch: the discriminator learns that real images are
    *more realistic than the average fake* (not that they are real). Pass the fake logits of
    detached generator outputs.
    """
    return _ragan(real_logits, fake_logits, 1.0)


def ragan_g_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """ESRGAN's relativistic average generator loss, the discriminator loss with the roles of
    real and fake swapped: ``ragan_g_loss(r, f) == ragan_d_loss(f, r)``. The generator gets
    gradients from both terms; ESRGAN detaches the real logits here."""
    return _ragan(real_logits, fake_logits, 0.0)
