"""Burst Dense UNet for TEM image streams (Wieslander, Wählby & Sintorn, PLoS ONE 2021).

H. Wieslander, C. Wählby, I.-M. Sintorn, "TEM image restoration from fast image streams",
PLoS ONE 16(2): e0246336 (2021). Their best model, "BDU+UC+SSIM", is a fully convolutional
DenseNet ("Tiramisu", Jégou et al. 2017) made permutation-invariant over the frames of a burst
in the way of Aittala & Durand (2018), with up-sampling + convolution ("UC") instead of
transposed convolutions, trained with an SSIM loss (the loss is the training's business).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._flops import Span, check_input
from .burst_unet import concat_frame_max, frame_max

_LEVELS = 4  # dense blocks (and 2x down-samplings) in the encoder, and in the decoder


class _DenseBlock(nn.Module):
    """``layers`` x (BN - ReLU - 3x3 conv to ``growth`` channels - dropout), densely connected.

    Layer ``i`` sees the block input concatenated with the outputs of layers ``0 .. i-1``.
    """

    def __init__(self, in_channels: int, growth: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(in_channels + i * growth),
                nn.ReLU(inplace=True),
                nn.Conv2d(in_channels + i * growth, growth, 3, padding=1),
                nn.Dropout(dropout),
            )
            for i in range(layers)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(input and all new features, new features only)``."""
        new: list[torch.Tensor] = []
        for layer in self.layers:
            new.append(layer(torch.cat([x, *new], dim=1)))
        return torch.cat([x, *new], dim=1), torch.cat(new, dim=1)


class BurstDenseUNet(nn.Module):
    """Permutation-invariant burst Dense UNet ("BDU+UC", Wieslander et al. 2021).

    Per frame, with tied weights: a 3x3 stem conv, then 4 encoder levels, each a dense block
    (``layers_per_block`` x BN-ReLU-conv3x3(``growth_rate``)-dropout) whose output is
    concatenated with its maximum over the frames (cross-frame max pooling) before the
    transition down (BN-ReLU-conv1x1 back to the per-frame width-dropout-2x2 max pool), and a
    bottleneck dense block at 1/16. The frames are then collapsed by a maximum over frames, so
    the decoder runs once per burst: 4 levels of transition up (nearest 2x up-sampling + 3x3
    conv of the previous block's new features, no transposed conv), concatenation with the skip
    (the maximum over frames of that level's encoder dense-block output) and a dense block. A
    1x1 conv maps the last block's full output to the image, predicted directly (no residual) in
    the engine's normalised space. Defaults follow FC-DenseNet (Jégou et al. 2017), on which
    the BDU builds: 48-channel stem, growth rate 16, 4 layers per block, dropout 0.2.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels per frame and of the output (1 for EM).
    stem_channels : int
        Width of the first 3x3 conv.
    growth_rate : int
        Channels added by each dense layer.
    layers_per_block : int
        Dense layers per block (the same in every block).
    dropout : float
        Dropout probability after each dense layer and transition down (train mode only).

    Attributes
    ----------
    task : str
        ``"burst-deblur"``.
    scale : int
        1.
    multiple : int
        16: H and W must be multiples of 16 (four 2x max pools).
    receptive_radius : int
        Exact bound, in input pixels, of the reach of one input pixel, from the layer
        structure (215 px for the default 4 layers per block).

    Notes
    -----
    Input ``(N, T, C, H, W)`` registered frames, any ``T >= 1``; output ``(N, C_out, H, W)``;
    invariant to the order of the frames. BatchNorm statistics are taken over all frames of
    all bursts in the encoder and over the bursts in the decoder, so ``adapt_bn`` works as for
    any BN network.

    Default config: 1.82 M parameters; 1660 GFLOP per megapixel for a 5-frame burst (680 for
    one frame), measured by :func:`._flops.gflops_per_megapixel` on a ``(1, 5, 1, 256, 256)``
    burst.
    """

    task = "burst-deblur"
    scale = 1
    multiple = 2**_LEVELS

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        stem_channels: int = 48,
        growth_rate: int = 16,
        layers_per_block: int = 4,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if min(stem_channels, growth_rate, layers_per_block) < 1:
            raise ValueError(
                "stem_channels, growth_rate and layers_per_block must be >= 1; got "
                f"{stem_channels}, {growth_rate}, {layers_per_block}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.in_channels = in_channels
        self.layers_per_block = layers_per_block
        self.stem = nn.Conv2d(in_channels, stem_channels, 3, padding=1)

        width = stem_channels
        skip_widths = []
        self.down_blocks = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        for _ in range(_LEVELS):
            self.down_blocks.append(_DenseBlock(width, growth_rate, layers_per_block, dropout))
            width += growth_rate * layers_per_block
            skip_widths.append(width)
            self.transitions_down.append(
                nn.Sequential(
                    nn.BatchNorm2d(2 * width),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(2 * width, width, 1),
                    nn.Dropout(dropout),
                    nn.MaxPool2d(2),
                )
            )
        self.bottleneck = _DenseBlock(width, growth_rate, layers_per_block, dropout)

        new = growth_rate * layers_per_block
        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for skip_width in reversed(skip_widths):
            self.transitions_up.append(nn.Conv2d(new, new, 3, padding=1))
            self.up_blocks.append(
                _DenseBlock(new + skip_width, growth_rate, layers_per_block, dropout)
            )
        self.head = nn.Conv2d(new + skip_widths[0] + new, out_channels, 1)

    @property
    def receptive_radius(self) -> int:
        """Upper bound, in input pixels, of the reach of one input pixel (tiling halo)."""

        def dense(span: Span) -> Span:
            for _ in range(self.layers_per_block):
                span = span.conv()
            return span

        span = Span().conv()
        skips = []
        for _ in range(_LEVELS):
            span = dense(span)
            skips.append(span)
            span = span.conv(kernel=1).down()
        span = dense(span)
        for skip in reversed(skips):
            span = dense(span.up().conv().merge(skip))
        return span.conv(kernel=1).radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``(N, T, C, H, W)`` registered frames into ``(N, C_out, H, W)``."""
        check_input(
            x, ndim=5, channels=self.in_channels, multiple=self.multiple, name="BurstDenseUNet"
        )
        n = x.shape[0]
        feats = self.stem(x.flatten(0, 1))
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down):
            feats, _ = block(feats)
            skips.append(frame_max(feats, n))
            feats = down(concat_frame_max(feats, n))
        _, new = self.bottleneck(feats)
        new = frame_max(new, n)  # frames collapsed: the decoder runs once per burst
        for up, block, skip in zip(self.transitions_up, self.up_blocks, reversed(skips)):
            feats, new = block(
                torch.cat([up(F.interpolate(new, scale_factor=2.0, mode="nearest")), skip], dim=1)
            )
        return self.head(feats)
