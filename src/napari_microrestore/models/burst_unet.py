"""Permutation-invariant burst UNet after Aittala & Durand (ECCV 2018).

M. Aittala and F. Durand, "Burst image deblurring using permutation invariant convolutional
neural networks", ECCV 2018. A UNet runs on every frame of the burst with tied weights; after
each stage the per-frame features are concatenated with their maximum over the frames, so that
every frame sees what all the others found, and the output is read from the maximum over the
frames of the last per-frame features. The network is therefore invariant to the order of the
frames and accepts any number of them (T >= 1).

The cross-frame helpers :func:`concat_frame_max` and :func:`frame_max` are shared with the
burst Dense UNet (:mod:`.burst_dense_unet`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._flops import Span, check_input


def frame_max(x: torch.Tensor, n: int) -> torch.Tensor:
    """Maximum over the frames: ``(N * T, C, H, W)`` frame-major features -> ``(N, C, H, W)``."""
    return x.unflatten(0, (n, -1)).amax(dim=1)


def concat_frame_max(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each frame's features followed by their maximum over the frames of its burst.

    ``(N * T, C, H, W)`` (bursts of ``T`` frames, frame index fastest) -> ``(N * T, 2C, H, W)``.
    """
    frames = x.unflatten(0, (n, -1))
    pooled = frames.amax(dim=1, keepdim=True).expand_as(frames)
    return torch.cat([frames, pooled], dim=2).flatten(0, 1)


def _conv_elu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution ("same" padding, or halving the size with ``stride=2``) + ELU."""
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.ELU(inplace=True))


class BurstUNet(nn.Module):
    """Burst deblurring UNet with cross-frame max pooling (Aittala & Durand 2018).

    Every frame goes through the same (weight-shared) 5-level UNet. Encoder level 0 is two
    3x3 conv + ELU at full resolution; levels 1-4 each halve the size with a stride-2 3x3 conv
    and add one 3x3 conv (level 4 is the bottleneck at 1/16). The input of every stride-2 conv
    and of every decoder level is the per-frame features concatenated with their maximum over
    the frames. Each decoder level up-samples (nearest, 2x) and convolves (3x3) instead of a
    transposed convolution, concatenates the frame's own encoder features of that level (skip)
    and applies one more 3x3 conv. The last per-frame features are max-pooled over the frames
    and two 3x3 convs map them to the image. No normalisation layers; ELU activations as in the
    paper; stride-2 convs and up-sample + conv replace the paper's 4x4 strided and transposed
    convs. The output is predicted directly (no residual), in the engine's normalised space.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels per frame and of the output (1 for EM).
    channels : sequence of 5 int
        Per-frame feature channels at levels 0 (full resolution) to 4 (1/16, bottleneck).

    Attributes
    ----------
    task : str
        ``"burst-deblur"``.
    scale : int
        1 (same size out as in).
    multiple : int
        16: H and W must be multiples of 16 (four 2x down-samplings).
    receptive_radius : int
        Exact bound, in input pixels, of how far an input pixel can influence the output,
        from the layer structure (94 px).

    Notes
    -----
    Input ``(N, T, C, H, W)`` registered frames, any ``T >= 1``; output ``(N, C_out, H, W)``.
    The output does not depend on the order of the frames (up to float rounding).

    Default config: 6.86 M parameters; 2764 GFLOP per megapixel for a 5-frame burst (568 for
    one frame), measured by :func:`._flops.gflops_per_megapixel` on a ``(1, 5, 1, 256, 256)``
    burst. A GPU model; ``channels=(16, 32, 64, 128, 128)`` is about 4x cheaper.
    """

    task = "burst-deblur"
    scale = 1
    multiple = 16

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256, 256),
    ) -> None:
        super().__init__()
        c = [int(v) for v in channels]
        if len(c) != 5 or min(c) < 1:
            raise ValueError(f"channels must be 5 positive widths (levels 0-4); got {channels}")
        self.in_channels = in_channels
        self.encoder = nn.ModuleList(
            [nn.Sequential(_conv_elu(in_channels, c[0]), _conv_elu(c[0], c[0]))]
            + [
                nn.Sequential(
                    _conv_elu(2 * c[lvl - 1], c[lvl], stride=2), _conv_elu(c[lvl], c[lvl])
                )
                for lvl in range(1, 5)
            ]
        )
        # decoder levels 3 .. 0: up-sample + conv of the fused coarser features, then a conv
        # of [that, the frame's own skip features]
        levels = range(3, -1, -1)
        self.up_convs = nn.ModuleList([_conv_elu(2 * c[lvl + 1], c[lvl]) for lvl in levels])
        self.decoder = nn.ModuleList([_conv_elu(2 * c[lvl], c[lvl]) for lvl in levels])
        self.head = nn.Sequential(
            _conv_elu(c[0], c[0]), nn.Conv2d(c[0], out_channels, 3, padding=1)
        )

    @property
    def receptive_radius(self) -> int:
        """Upper bound, in input pixels, of the reach of one input pixel (tiling halo)."""
        span = Span().conv().conv()
        skips = [span]
        for _ in range(4):
            span = span.conv(stride=2).conv()
            skips.append(span)
        skips.pop()  # the bottleneck feeds the decoder directly
        for skip in reversed(skips):
            span = span.up().conv().merge(skip).conv()
        return span.conv().conv().radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``(N, T, C, H, W)`` registered frames into ``(N, C_out, H, W)``."""
        check_input(
            x, ndim=5, channels=self.in_channels, multiple=self.multiple, name="BurstUNet"
        )
        n = x.shape[0]
        feats = self.encoder[0](x.flatten(0, 1))
        skips = [feats]
        for stage in self.encoder[1:]:
            feats = stage(concat_frame_max(feats, n))
            skips.append(feats)
        skips.pop()
        for up_conv, conv, skip in zip(self.up_convs, self.decoder, reversed(skips)):
            up = F.interpolate(concat_frame_max(feats, n), scale_factor=2.0, mode="nearest")
            feats = conv(torch.cat([up_conv(up), skip], dim=1))
        return self.head(frame_max(feats, n))
