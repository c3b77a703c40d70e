"""2x super-resolution and denoising, ESRGAN-style (Wang et al. 2018).

``RRDBNet`` is ESRGAN's generator: residual-in-residual dense blocks (RRDB) without batch
norm, with residual scaling 0.2, a nearest-neighbour x2 up-sampling + convolution (no
transposed convolution, so no checkerboard), and, here, a global skip that adds the bilinear
x2 up-sampled input (the net learns the detail a bilinear interpolation misses).
``RelativisticDiscriminator`` is ESRGAN's VGG-style patch discriminator; its relativistic
average GAN losses are in :mod:`napari_microrestore.models.losses`.

Tensors are ``(N, C, H, W)`` float, normalised by the engine; ``RRDBNet`` maps
``(N, 1, H, W)`` to ``(N, 1, 2H, 2W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InputError
from ._flops import check_input


class _DenseBlock(nn.Module):
    """ESRGAN's residual dense block: five 3x3 convolutions, each seeing all earlier
    features (``gc`` growth channels), output scaled by ``res_scale`` and added to the input."""

    def __init__(self, nf: int, gc: int, res_scale: float) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, padding=1) for i in range(5)
        )
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.res_scale = res_scale
        for conv in self.convs:  # ESRGAN's init: Kaiming, scaled by 0.1 for a stable start
            nn.init.kaiming_normal_(conv.weight, a=0.2)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs[:-1]:
            feats.append(self.act(conv(torch.cat(feats, 1))))
        return x + self.res_scale * self.convs[-1](torch.cat(feats, 1))


class _RRDB(nn.Module):
    """Three dense blocks in a chain, the chain's output scaled and added to its input."""

    def __init__(self, nf: int, gc: int, res_scale: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(_DenseBlock(nf, gc, res_scale) for _ in range(3)))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.blocks(x)


class RRDBNet(nn.Module):
    """ESRGAN generator for 2x super-resolution (+ denoising) of single images.

    Layout: 3x3 convolution to ``nf`` features; ``n_blocks`` RRDBs (each three dense blocks of
    five 3x3 convolutions) and a 3x3 convolution, added to the first features; nearest x2
    up-sampling, 3x3 convolution + LeakyReLU, 3x3 convolution + LeakyReLU, 3x3 convolution to
    ``out_channels``; plus, with ``residual``, the bilinear x2 up-sampled input.

    Parameters
    ----------
    in_channels, out_channels
        Image channels (1 for EM); ``residual=True`` needs them equal.
    nf
        Features of the trunk (ESRGAN: 64).
    gc
        Growth channels of the dense blocks (ESRGAN: 32).
    n_blocks
        RRDBs in the trunk (ESRGAN: 23, 16.7 M parameters with ``nf=64, gc=32``). The whole
        net runs at the input's resolution, so its cost per pixel is about twice its
        parameter count: the default ``nf=32, gc=16, n_blocks=6`` has 1.1 M parameters and
        costs 2.3 TFLOP per input megapixel (``nf=64, gc=32``: 4.4 M and 9.3 TFLOP/MP).
    res_scale
        Residual scaling of the dense blocks and RRDBs (ESRGAN: 0.2).
    residual
        Add the bilinearly up-sampled input to the output; the last convolution then starts at
        zero, so the untrained net is bilinear interpolation.

    Attributes
    ----------
    task : str
        ``"sr2x"``.
    scale : int
        2: the output is twice the input's height and width.
    multiple : int
        1: any input size.
    receptive_radius : int
        Upper bound, in input pixels (Chebyshev distance), of how far an input pixel can
        change the output, where the output pixel ``p`` sits at input coordinate
        ``(p + 0.5) / 2 - 0.5``: ``15 * n_blocks + 4`` (94 for the default).

    Notes
    -----
    Default config measured by :func:`napari_microrestore.models._flops.gflops_per_megapixel`
    on a ``(1, 1, 32, 32)`` input: 1.11 M parameters, 2325 GFLOP per input megapixel.
    """

    task = "sr2x"
    scale = 2
    multiple = 1

    def __init__(self, in_channels: int = 1, out_channels: int = 1, nf: int = 32, gc: int = 16,
                 n_blocks: int = 6, res_scale: float = 0.2, residual: bool = True) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise InputError(
                "residual=True adds the up-sampled input to the output, so in_channels must "
                f"equal out_channels; got {in_channels} and {out_channels}"
            )
        if min(in_channels, out_channels, nf, gc) < 1 or n_blocks < 0:
            raise InputError("in_channels, out_channels, nf and gc must be >= 1 and n_blocks "
                             f">= 0; got {in_channels}, {out_channels}, {nf}, {gc}, {n_blocks}")
        self.in_channels = in_channels
        self.n_blocks = n_blocks
        self.residual = residual
        self.conv_first = nn.Conv2d(in_channels, nf, 3, padding=1)
        self.body = nn.Sequential(*(_RRDB(nf, gc, res_scale) for _ in range(n_blocks)))
        self.conv_body = nn.Conv2d(nf, nf, 3, padding=1)
        self.upsample = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(nf, nf, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(nf, nf, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
        )
        self.conv_last = nn.Conv2d(nf, out_channels, 3, padding=1)
        if residual:
            nn.init.zeros_(self.conv_last.weight)
            nn.init.zeros_(self.conv_last.bias)

    @property
    def receptive_radius(self) -> int:
        # low resolution: first conv + 15 convs per RRDB + trunk conv; high resolution: three
        # 3x3 convs (1.5 input px) and the nearest parent's offset (0.25 input px), so 1.75
        return 15 * self.n_blocks + 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve ``(N, in_channels, H, W)`` -> ``(N, out_channels, 2H, 2W)``."""
        check_input(x, ndim=4, channels=self.in_channels, multiple=1, name="RRDBNet")
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        y = self.conv_last(self.upsample(feat))
        if self.residual:
            y = y + F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return y


class RelativisticDiscriminator(nn.Module):
    """ESRGAN's VGG-style discriminator (``Discriminator_VGG_128``) for square patches.

    Five stages of a 3x3 convolution and a stride-2 4x4 convolution (features ``nf``,
    ``2 nf``, ``4 nf``, ``8 nf``, ``8 nf``; BatchNorm after all but the very first
    convolution; LeakyReLU 0.2), then two linear layers (100 hidden units) to one logit per
    patch. Trained with the relativistic average GAN losses
    (:func:`napari_microrestore.models.losses.ragan_d_loss`).

    Parameters
    ----------
    in_channels
        Image channels (1 for EM).
    nf
        Features of the first stage (ESRGAN: 64).
    patch_size
        Height and width of the judged patches: a multiple of 32 (ESRGAN: 128); the linear
        layer is sized for it.
    """

    def __init__(self, in_channels: int = 1, nf: int = 64, patch_size: int = 128) -> None:
        super().__init__()
        if patch_size < 32 or patch_size % 32:
            raise InputError(f"patch_size must be a positive multiple of 32; got {patch_size}")
        if min(in_channels, nf) < 1:
            raise InputError(f"in_channels and nf must be >= 1; got {in_channels}, {nf}")
        self.in_channels = in_channels
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        ch = in_channels
        for i, out in enumerate((nf, 2 * nf, 4 * nf, 8 * nf, 8 * nf)):
            layers.append(nn.Conv2d(ch, out, 3, padding=1, bias=i == 0))
            if i:
                layers.append(nn.BatchNorm2d(out))
            layers += [nn.LeakyReLU(0.2, inplace=True),
                       nn.Conv2d(out, out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        self.features = nn.Sequential(*layers)
        side = patch_size // 32
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(ch * side * side, 100), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(100, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 1)``, one per ``(N, in_channels, patch_size, patch_size)`` patch."""
        expected = (self.in_channels, self.patch_size, self.patch_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise InputError(f"RelativisticDiscriminator needs (N, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}) patches; got {tuple(x.shape)}")
        return self.classifier(self.features(x))
