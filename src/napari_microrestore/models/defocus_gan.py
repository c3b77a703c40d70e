"""Defocus restoration, COMI-style: a CycleGAN ResNet generator and a PatchGAN discriminator.

COMI (C. Zhang, H. Jiang, W. Liu et al., "Correction of out-of-focus microscopic images by deep
learning", Comput. Struct. Biotechnol. J. 2022) restores defocused micrographs with a CycleGAN
(Zhu et al. 2017) trained between defocused and in-focus images, which needs no pixel-aligned
pairs, and a weighted multi-term loss (see :mod:`napari_microrestore.models.losses`). The two networks here follow the CycleGAN reference
implementation, with three changes for this project:

* up-sampling is nearest-neighbour x2 + 3x3 convolution instead of transposed convolutions
  (which leave a checkerboard pattern);
* the output is linear (no ``tanh``): inputs are normalised to about zero mean and unit std
  by the engine, not scaled to [-1, 1];
* an optional residual output (``output = input + G(input)``) whose last convolution starts at
  zero, so the untrained generator is the identity.

Tensors are ``(N, C, H, W)`` float; the generator maps ``(N, 1, H, W)`` to ``(N, 1, H, W)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import InputError
from ._flops import Span, check_input

_NORMS = ("instance", "batch", "none")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    """CycleGAN's norm choices: InstanceNorm without affine or running statistics, BatchNorm
    (affine, running statistics: works with the engine's ``adapt_bn``), or none."""
    if norm == "instance":
        return nn.InstanceNorm2d(channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _check_norm(norm: str) -> None:
    if norm not in _NORMS:
        raise InputError(f"norm must be one of {', '.join(_NORMS)}; got {norm!r}")


class _ResnetBlock(nn.Module):
    """Two reflection-padded 3x3 convolutions with a norm, ReLU between them, plus identity."""

    def __init__(self, channels: int, norm: str, bias: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=bias),
            _norm_layer(norm, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=bias),
            _norm_layer(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator for single-image defocus restoration.

    Layout: reflection-padded 7x7 convolution (``ngf`` features), ``n_down`` stride-2 3x3
    convolutions (features doubling), ``n_blocks`` residual blocks at ``1 / 2**n_down`` of the
    resolution, ``n_down`` stages of nearest x2 up-sampling + 3x3 convolution (features
    halving), reflection-padded 7x7 convolution to ``out_channels``. Every convolution but the
    last is followed by the norm and a ReLU.

    Parameters
    ----------
    in_channels, out_channels
        Image channels (1 for EM). ``residual=True`` needs them equal.
    ngf
        Features of the first layer (CycleGAN uses 64; 32 keeps the default at a quarter of
        its parameters and FLOPs).
    n_blocks
        Residual blocks at the bottleneck (CycleGAN: 9 for 256x256 images).
    n_down
        Stride-2 down-sampling stages (CycleGAN: 2).
    norm
        ``"instance"`` (CycleGAN's default), ``"batch"`` or ``"none"``. InstanceNorm
        normalises every feature map with the statistics of the whole input, so two tiles of
        one image get different brightness and contrast: a net with it must run on whole slices
        (or tiles normalised consistently), which ``tile_safe = False`` tells the engine.
        BatchNorm in eval mode is a fixed per-channel affine map and tiles agree.
    residual
        ``output = input + G(input)``, with the last convolution zero-initialised so that the
        untrained generator returns its input. Otherwise ``output = G(input)``.
    skips
        Add the encoder's features to the decoder's at every resolution above the bottleneck
        (full and 1/2 for ``n_down=2``), U-Net style but additive, so no new weights. Not in
        CycleGAN: without them a narrow generator must carry pixel-scale detail through its
        1/4-resolution bottleneck, and at ``ngf=16`` it stayed at the identity on the
        defocus pairs. The receptive radius is unchanged (the skips reach less far).

    Attributes
    ----------
    task : str
        ``"defocus"``.
    scale : int
        1: the output has the input's size.
    multiple : int
        ``2**n_down``: input height and width must be multiples of it.
    tile_safe : bool
        False with ``norm="instance"`` (see above), True otherwise.
    receptive_radius : int
        Upper bound, in input pixels (Chebyshev distance), of how far an input pixel can
        change the output: ``15 + 8 * n_blocks`` for ``n_down=2`` (87 for the default). It
        counts the convolutions only; with InstanceNorm every output pixel also depends on the
        statistics of the whole input.

    Notes
    -----
    Default config measured by :func:`napari_microrestore.models._flops.gflops_per_megapixel`
    on a ``(1, 1, 64, 64)`` input: 2.84 M parameters, 430 GFLOP per megapixel (``ngf=64``:
    11.4 M parameters, about four times the FLOPs).
    """

    task = "defocus"
    scale = 1
    tile_safe = True

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 32,
                 n_blocks: int = 9, n_down: int = 2, norm: str = "instance",
                 residual: bool = True, skips: bool = False) -> None:
        super().__init__()
        _check_norm(norm)
        if residual and in_channels != out_channels:
            raise InputError(
                "residual=True adds the input to the output, so in_channels must equal "
                f"out_channels; got {in_channels} and {out_channels}"
            )
        if min(in_channels, out_channels, ngf) < 1 or min(n_blocks, n_down) < 0:
            raise InputError(
                "in_channels, out_channels and ngf must be >= 1 and n_blocks, n_down >= 0; got "
                f"{in_channels}, {out_channels}, {ngf}, {n_blocks}, {n_down}"
            )
        self.in_channels = in_channels
        self.n_down = n_down
        self.n_blocks = n_blocks
        self.residual = residual
        self.skips = skips
        self.multiple = 2 ** n_down
        self.tile_safe = norm != "instance"
        bias = norm != "batch"  # CycleGAN: no bias before BatchNorm

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ngf, 7, padding=3, padding_mode="reflect", bias=bias),
            _norm_layer(norm, ngf),
            nn.ReLU(inplace=True),
        ]
        ch = ngf
        # with ``skips``: indices of the encoder layers whose output is kept, and of the decoder
        # layers at the same resolution (and width) to whose output it is added
        self._keep: list[int] = [len(layers) - 1]
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1, bias=bias),
                       _norm_layer(norm, 2 * ch), nn.ReLU(inplace=True)]
            self._keep.append(len(layers) - 1)
            ch *= 2
        self._keep.pop()  # the bottleneck itself is not skipped
        layers += [_ResnetBlock(ch, norm, bias) for _ in range(n_blocks)]
        self._add: list[int] = []
        for _ in range(n_down):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(ch, ch // 2, 3, padding=1, bias=bias),
                       _norm_layer(norm, ch // 2), nn.ReLU(inplace=True)]
            self._add.append(len(layers) - 1)
            ch //= 2
        last = nn.Conv2d(ch, out_channels, 7, padding=3, padding_mode="reflect")
        if residual:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    @property
    def receptive_radius(self) -> int:
        span = Span()
        for layer in self.net:
            if isinstance(layer, nn.Conv2d):
                span = span.conv(layer.kernel_size[0], layer.stride[0], layer.padding[0])
            elif isinstance(layer, nn.Upsample):
                span = span.up("nearest")
            elif isinstance(layer, _ResnetBlock):
                span = span.conv().conv()  # the identity path reaches less far
        return span.radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)``."""
        check_input(x, ndim=4, channels=self.in_channels, multiple=self.multiple,
                    name="ResnetGenerator")
        if self.skips:
            kept, y = [], x
            for i, layer in enumerate(self.net):
                y = layer(y)
                if i in self._keep:
                    kept.append(y)
                elif i in self._add:  # the decoder meets the encoder in reverse order
                    y = y + kept.pop()
        else:
            y = self.net(x)
        return x + y if self.residual else y


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / CycleGAN ``NLayerDiscriminator``).

    ``n_layers`` stride-2 4x4 convolutions (features doubling from ``ndf``, capped at
    ``8 * ndf``), one stride-1 4x4 convolution, and a stride-1 4x4 convolution to one logit
    per patch; LeakyReLU(0.2) and the norm (not after the first layer) in between. Each logit
    judges one ``receptive_field`` x ``receptive_field`` patch: 70 px for ``n_layers=3``,
    and a 256x256 input gives 30x30 logits.

    Parameters
    ----------
    in_channels
        Channels of the judged image (2 for a conditional discriminator that sees the input
        and the output stacked).
    ndf
        Features of the first layer.
    n_layers
        Stride-2 layers (3: the 70x70 PatchGAN).
    norm
        ``"instance"`` (CycleGAN), ``"batch"`` or ``"none"``.
    """

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3,
                 norm: str = "instance") -> None:
        super().__init__()
        _check_norm(norm)
        if min(in_channels, ndf, n_layers) < 1:
            raise InputError(f"in_channels, ndf and n_layers must be >= 1; got {in_channels}, "
                             f"{ndf}, {n_layers}")
        self.in_channels = in_channels
        self.n_layers = n_layers
        bias = norm != "batch"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=bias),
                       _norm_layer(norm, out), nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        """Side, in input pixels, of the patch one output logit sees (70 for n_layers=3)."""
        rf = 1
        for stride in [1, 1] + [2] * self.n_layers:  # from the output back to the input
            rf = (rf - 1) * stride + 4
        return rf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 1, H', W')`` (one per patch; real > 0 for the vanilla GAN loss)."""
        check_input(x, ndim=4, channels=self.in_channels, multiple=1, name="PatchDiscriminator")
        return self.net(x)
