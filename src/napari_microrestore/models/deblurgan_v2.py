"""Single-image baseline in the style of DeblurGAN-v2 (FPN over a MobileNetV2-like backbone).

O. Kupyn, T. Martyniuk, J. Wu, Z. Wang, "DeblurGAN-v2: Deblurring (orders-of-magnitude)
faster and better", ICCV 2019: the "FPN-MobileNet" generator. Wieslander et al. (PLoS ONE
2021) compared their burst nets with it fed three registered frames as input channels; we do
the same. Here it is trained from scratch without its discriminator, with L1 + SSIM + gradient
losses (the training's business), so there is no GAN part in this file.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._flops import Span, check_input

# MobileNetV2 stages used by the FPN: (expansion is 1 for the first, else `expansion`),
# output channels at width 1.0, stride of the first block. Stage outputs 0, 1, 2, 3 and 5 feed
# the FPN at 1/2, 1/4, 1/8, 1/16 and 1/32 (stage 4 keeps 1/16).
_STAGES = ((16, 1), (24, 2), (32, 2), (64, 2), (96, 1), (160, 2))
_STEM = 32
_TAPS = (0, 1, 2, 3, 5)


def _width(channels: int, multiplier: float) -> int:
    """MobileNet rounding: nearest multiple of 8, at least 8, never below 90 % of the target."""
    target = channels * multiplier
    rounded = max(8, int(target + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * target else rounded


def _conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Conv ("same" padding, or halving with ``stride=2``) - BatchNorm - ``activation``."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        activation(inplace=True),
    )


def _up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour up-sampling by an integer ``factor`` (identity for 1)."""
    return x if factor == 1 else F.interpolate(x, scale_factor=float(factor), mode="nearest")


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand - 3x3 depthwise (stride 1 or 2) - 1x1 linear projection,
    with an identity shortcut when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu(in_channels, hidden, 1, activation=nn.ReLU6))
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.body = nn.Sequential(*layers)
        self.shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.shortcut else self.body(x)


class DeblurGANv2(nn.Module):
    """DeblurGAN-v2-style FPN generator over a light MobileNetV2 backbone, from scratch.

    Backbone: MobileNetV2 (3x3 stride-2 stem, inverted residual blocks with depthwise 3x3
    convs, BatchNorm, ReLU6) up to its 160-channel stage, taps at 1/2, 1/4, 1/8, 1/16, 1/32.
    FPN as in DeblurGAN-v2: 1x1 lateral convs, a top-down path (nearest 2x up-sampling, sum,
    3x3 conv-BN-ReLU) giving maps at 1/4 .. 1/32; each map goes through a head of two 3x3
    conv-ReLU, is up-sampled (nearest) to 1/4 and the four are concatenated, smoothed by a 3x3
    conv-BN-ReLU, up-sampled to 1/2, summed with the 1/2 lateral, smoothed again to half the
    width, up-sampled to full resolution and mapped to one channel by a 3x3 conv. The output is
    the centre input frame plus that residual (no tanh, no clamp: the engine's normalised
    space). The last conv is zero-initialised, so an untrained net returns the centre frame.
    No discriminator: it is trained with L1 + SSIM + gradient losses.

    Parameters
    ----------
    in_channels : int
        Registered frames stacked as channels (odd; 3 as in Wieslander et al. 2021). The output
        adds the residual to channel ``in_channels // 2``. NOT permutation-invariant.
    width : float
        Backbone width multiplier (MobileNetV2's alpha).
    expansion : int
        Expansion factor of the inverted residual blocks (except the first stage, 1).
    stage_repeats : sequence of 6 int
        Blocks per backbone stage (16, 24, 32, 64, 96, 160 channels at width 1.0); DeblurGAN-v2
        uses ``(1, 2, 3, 4, 3, 2)``.
    fpn_channels : int
        Width of the lateral and top-down FPN maps.
    head_channels : int
        Width of the per-level heads and of the merged map (the last smoothing halves it).

    Attributes
    ----------
    task : str
        ``"single-deblur"``.
    scale : int
        1.
    multiple : int
        32: H and W must be multiples of 32 (five 2x down-samplings).
    receptive_radius : int
        Exact bound, in input pixels, of the reach of one input pixel, from the layer
        structure (283 px for the default config; it grows with ``stage_repeats``).

    Notes
    -----
    Input ``(N, in_channels, H, W)``, output ``(N, 1, H, W)``.

    Default config: 2.11 M parameters; 81.5 GFLOP per megapixel, measured by
    :func:`._flops.gflops_per_megapixel` on a ``(1, 3, 256, 256)`` input.
    """

    task = "single-deblur"
    scale = 1
    multiple = 32

    def __init__(
        self,
        in_channels: int = 3,
        width: float = 1.0,
        expansion: int = 6,
        stage_repeats: Sequence[int] = (1, 2, 3, 4, 3, 2),
        fpn_channels: int = 128,
        head_channels: int = 64,
    ) -> None:
        super().__init__()
        repeats = [int(r) for r in stage_repeats]
        if in_channels < 1 or in_channels % 2 == 0:
            raise ValueError(f"in_channels must be odd (a centre frame); got {in_channels}")
        if len(repeats) != len(_STAGES) or min(repeats) < 1:
            raise ValueError(f"stage_repeats must be {len(_STAGES)} ints >= 1; got {stage_repeats}")
        if width <= 0 or expansion < 1 or fpn_channels < 1 or head_channels < 2:
            raise ValueError(
                "width > 0, expansion >= 1, fpn_channels >= 1 and head_channels >= 2 are "
                f"required; got {width}, {expansion}, {fpn_channels}, {head_channels}"
            )
        self.in_channels = in_channels
        self.stage_repeats = tuple(repeats)

        prev = _width(_STEM, width)
        self.stem = _conv_bn_relu(in_channels, prev, 3, stride=2, activation=nn.ReLU6)
        self.stages = nn.ModuleList()
        tap_widths = []
        for i, ((channels, stride), n) in enumerate(zip(_STAGES, repeats)):
            out = _width(channels, width)
            t = 1 if i == 0 else expansion
            blocks = [_InvertedResidual(prev, out, stride, t)]
            blocks += [_InvertedResidual(out, out, 1, t) for _ in range(n - 1)]
            self.stages.append(nn.Sequential(*blocks))
            prev = out
            if i in _TAPS:
                tap_widths.append(out)

        f, h = fpn_channels, head_channels
        self.lateral0 = nn.Conv2d(tap_widths[0], h, 1, bias=False)  # 1/2
        # 1/4 .. 1/32
        self.laterals = nn.ModuleList(nn.Conv2d(c, f, 1, bias=False) for c in tap_widths[1:])
        self.top_down = nn.ModuleList(_conv_bn_relu(f, f, 3) for _ in range(3))  # at 1/16, 1/8, 1/4
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(f, h, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(h, h, 3, padding=1), nn.ReLU(inplace=True),
            )
            for _ in range(4)
        )
        self.smooth = _conv_bn_relu(4 * h, h, 3)
        self.smooth2 = _conv_bn_relu(h, h // 2, 3)
        self.final = nn.Conv2d(h // 2, 1, 3, padding=1)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    @property
    def receptive_radius(self) -> int:
        """Upper bound, in input pixels, of the reach of one input pixel (tiling halo)."""
        span = Span().conv(stride=2)
        taps = []
        for i, ((_, stride), n) in enumerate(zip(_STAGES, self.stage_repeats)):
            for b in range(n):  # 1x1 convs do not widen; a shortcut is within the block's span
                span = span.conv(stride=stride if b == 0 else 1)
            if i in _TAPS:
                taps.append(span)
        maps = [taps[4]]  # 1/32
        for tap in (taps[3], taps[2], taps[1]):  # top-down to 1/16, 1/8, 1/4
            maps.insert(0, tap.merge(maps[0].up()).conv())
        merged = []
        for level_map in maps:  # heads, then nearest up-sampling to 1/4
            head = level_map.conv().conv()
            while head.level > 2:
                head = head.up()
            merged.append(head)
        span = merged[0].merge(*merged[1:]).conv().up().merge(taps[0]).conv().up().conv()
        return span.merge(Span()).radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``(N, in_channels, H, W)`` stacked frames into ``(N, 1, H, W)``."""
        check_input(
            x, ndim=4, channels=self.in_channels, multiple=self.multiple, name="DeblurGANv2"
        )
        feats = self.stem(x)
        taps = []
        for i, stage in enumerate(self.stages):
            feats = stage(feats)
            if i in _TAPS:
                taps.append(feats)
        lat = [lateral(tap) for lateral, tap in zip(self.laterals, taps[1:])]  # 1/4 .. 1/32
        maps = [lat[3]]
        for lateral, conv in zip((lat[2], lat[1], lat[0]), self.top_down):
            maps.insert(0, conv(lateral + _up(maps[0], 2)))
        # heads, nearest up-sampled to 1/4 (map k is at 1/2**(k + 2))
        merged = [_up(head(m), 2**k) for k, (head, m) in enumerate(zip(self.heads, maps))]
        out = _up(self.smooth(torch.cat(merged, dim=1)), 2)
        out = _up(self.smooth2(out + self.lateral0(taps[0])), 2)
        centre = self.in_channels // 2
        return x[:, centre : centre + 1] + self.final(out)
