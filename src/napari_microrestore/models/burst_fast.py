"""A fast permutation-invariant burst network for interactive CPU use and live streams.

Our own design, for the cases where the burst UNets are too slow: restoring a TEM stream while
it is acquired, previewing in napari on a laptop CPU, fine-tuning on a user's data in minutes.
The ideas that make it cheap:

* a 2x pixel-unshuffle stem, so no convolution runs at full resolution except one tiny
  output conv;
* a weight-shared per-frame encoder whose frames exchange information at every level through
  their maximum and mean over the frames, computed once per burst and added to every frame
  (a 1x1 conv of ``[f_t, max_t f, mean_t f]`` split into a per-frame and a per-burst part);
* the frames are collapsed (max and mean) before ONE decoder, which therefore runs once per
  burst instead of once per frame;
* the output is the registered mean of the frames plus a learned residual whose last conv is
  zero-initialised: an untrained net returns the mean exactly, and training starts from it;
* no normalisation layers (nothing to re-estimate, identical behaviour in train and eval mode,
  batch size 1 is fine).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._flops import Span, check_input

_SLOPE = 0.1  # LeakyReLU negative slope


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, _SLOPE, inplace=True)


def _conv(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    """Conv with "same" padding (or halving the size with ``stride=2``), He-initialised."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
    nn.init.kaiming_normal_(conv.weight, a=_SLOPE, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return conv


def _icnr_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """Conv to ``4 * out_channels`` for a 2x pixel shuffle, ICNR-initialised.

    The 4 sub-pixel copies of each output channel start with identical weights, so the
    shuffle initially equals nearest up-sampling of one conv: no checkerboard at the start.
    """
    conv = _conv(in_channels, 4 * out_channels, kernel)
    with torch.no_grad():
        conv.weight.copy_(conv.weight[::4].repeat_interleave(4, dim=0))
    return conv


def _pool_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(N * T, C, h, w)`` frame features -> ``(N, 2C, h, w)``: max and mean over frames."""
    frames = x.unflatten(0, (n, -1))
    return torch.cat([frames.amax(dim=1), frames.mean(dim=1)], dim=1)


def _max_mean(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and mean over a list of ``(N, C, h, w)`` frame features (no stacked copy)."""
    peak, total = frames[0].clone(), frames[0].clone()
    for f in frames[1:]:
        torch.maximum(peak, f, out=peak)
        total.add_(f)
    return peak, total.div_(len(frames))


def _conv_parts(conv: nn.Conv2d, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``conv(torch.cat(parts, dim=1))`` without the concatenated tensor.

    Each part meets its slice of the weight's input channels and the results are summed in
    place: the same numbers up to float rounding, and no tensor wider than the output.
    """
    out, start = None, 0
    for part in parts:
        stop = start + part.shape[1]
        y = F.conv2d(part, conv.weight[:, start:stop], None, conv.stride, conv.padding)
        out = y if out is None else out.add_(y)
        start = stop
    if conv.bias is not None:
        out.add_(conv.bias[:, None, None])
    return out


class _Fuse(nn.Module):
    """``act(W_f f_t + W_g [max_t f, mean_t f])``: per-frame features informed by the burst.

    Equal to a 1x1 conv of the concatenation ``[f_t, max_t f, mean_t f]``, but the burst part is
    computed once per burst and broadcast to its frames.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.frame = _conv(channels, channels, 1)
        self.burst = nn.Conv2d(2 * channels, channels, 1, bias=False)
        nn.init.kaiming_normal_(self.burst.weight, a=_SLOPE, nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        burst = self.burst(_pool_frames(x, n)).unsqueeze(1)
        # in place on the fresh conv output: no extra (N * T, C, h, w) tensor
        return _act(self.frame(x).unflatten(0, (n, -1)).add_(burst)).flatten(0, 1)


class BurstFastNet(nn.Module):
    """Fast burst restoration: shared per-frame encoder, one decoder, mean + residual.

    Layers, with widths ``c0, c1, c2 = channels``:

    * per frame (tied weights): 2x pixel unshuffle, 3x3 conv to ``c0``, 3x3 conv, fuse (1/2);
      stride-2 3x3 conv to ``c1``, two 3x3 convs, fuse (1/4); stride-2 3x3 conv to ``c2``, two
      3x3 convs, fuse (1/8). "Fuse" mixes each frame's features with their max and mean over
      the frames;
    * collapse: at each level the max and the mean over the frames of the fused features;
    * one decoder: a 3x3 conv at 1/8; then twice: 1x1 conv + 2x pixel shuffle (ICNR), concat
      with the collapsed features of that level, two 3x3 convs; finally a 3x3 conv + 2x pixel
      shuffle (ICNR) to ``head_channels`` at full resolution and a 3x3 conv to the residual
      (zero-initialised);
    * output = mean of the input frames + residual.

    LeakyReLU(0.1) activations, no normalisation layers.

    Parameters
    ----------
    in_channels : int
        Channels per frame (1 for EM); the output has as many.
    channels : sequence of 3 int
        Per-frame widths at 1/2, 1/4 and 1/8 of the input size.
    head_channels : int
        Width of the full-resolution features before the last conv.

    Attributes
    ----------
    task : str
        ``"burst-deblur"``.
    scale : int
        1.
    multiple : int
        8: H and W must be multiples of 8 (unshuffle + two stride-2 convs).
    receptive_radius : int
        Exact bound, in input pixels, of the reach of one input pixel, from the layer
        structure (64 px).

    Notes
    -----
    Input ``(N, T, C, H, W)`` registered frames, any ``T >= 1``; output ``(N, C, H, W)``;
    invariant to the order of the frames (up to float rounding of the mean).

    Without autograd (inference) on the CPU the forward runs frame by frame and never
    concatenates (:meth:`forward_lean`): the same output up to float rounding, no tensor
    larger than one frame's features. Besides a smaller peak, that matters in a worker thread:
    glibc serves a thread's allocations above its 64 MB heap size with a fresh ``mmap``, so a
    batched forward on a 1024^2 tile (five frames' features in one 200 MB tensor) page-faults
    and zeroes every layer's output afresh (1.8x slower than on the main thread); frame by
    frame, every tensor of ``tem-burst-fast`` at that tile fits a heap and is reused.

    Default config: 1.07 M parameters; 205 GFLOP per megapixel for a 5-frame burst (86 for one
    frame: the decoder's share is paid once), measured by :func:`._flops.gflops_per_megapixel`
    on a ``(1, 5, 1, 256, 256)`` burst.
    """

    task = "burst-deblur"
    scale = 1
    multiple = 8
    #: frame-by-frame inference: None = on the CPU only (a GPU's throughput with batched
    #: frames against its smaller peak memory is still to be measured on a lent GPU)
    lean_inference: bool | None = None

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        head_channels: int = 8,
    ) -> None:
        super().__init__()
        c = [int(v) for v in channels]
        if len(c) != 3 or min(c) < 1 or head_channels < 1:
            raise ValueError(
                f"channels must be 3 positive widths and head_channels >= 1; got {channels}, "
                f"{head_channels}"
            )
        self.in_channels = in_channels
        self.encoder = nn.ModuleList(
            [
                nn.ModuleList([_conv(4 * in_channels, c[0]), _conv(c[0], c[0])]),
                nn.ModuleList([_conv(c[0], c[1], stride=2), _conv(c[1], c[1]), _conv(c[1], c[1])]),
                nn.ModuleList([_conv(c[1], c[2], stride=2), _conv(c[2], c[2]), _conv(c[2], c[2])]),
            ]
        )
        self.fuse = nn.ModuleList(_Fuse(width) for width in c)
        self.bottom = _conv(2 * c[2], c[2])
        # decoder levels 1/4 then 1/2
        self.up = nn.ModuleList([_icnr_conv(c[2], c[1], 1), _icnr_conv(c[1], c[0], 1)])
        self.decoder = nn.ModuleList(
            nn.ModuleList([_conv(3 * c[lvl], c[lvl]), _conv(c[lvl], c[lvl])]) for lvl in (1, 0)
        )
        self.head_up = _icnr_conv(c[0], head_channels, 3)
        self.head = nn.Conv2d(head_channels, in_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def receptive_radius(self) -> int:
        """Upper bound, in input pixels, of the reach of one input pixel (tiling halo)."""
        span = Span().down().conv().conv()  # unshuffle, two convs; fuse is 1x1
        skips = [span]
        for _ in range(2):
            span = span.conv(stride=2).conv().conv()
            skips.append(span)
        span = skips.pop().conv()
        for skip in reversed(skips):
            span = span.conv(kernel=1).up().merge(skip).conv().conv()
        return span.conv().up().conv().merge(Span()).radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``(N, T, C, H, W)`` registered frames into ``(N, C, H, W)``.

        Batched over frames when autograd is on (training) or on a GPU, frame by frame on
        the CPU without autograd (:meth:`forward_lean`; ``lean_inference`` True / False
        forces it on / off wherever autograd is off).
        """
        lean = self.lean_inference
        if lean is None:
            lean = x.device.type == "cpu"
        if lean and not torch.is_grad_enabled():
            return self.forward_lean(x)  # checks x itself
        check_input(
            x, ndim=5, channels=self.in_channels, multiple=self.multiple, name="BurstFastNet"
        )
        n = x.shape[0]
        feats = F.pixel_unshuffle(x.flatten(0, 1), 2)
        pooled = []
        for level, fuse in zip(self.encoder, self.fuse):
            for conv in level:
                feats = _act(conv(feats))
            feats = fuse(feats, n)
            pooled.append(_pool_frames(feats, n))
        out = _act(self.bottom(pooled.pop()))
        for up, (conv_a, conv_b), skip in zip(self.up, self.decoder, reversed(pooled)):
            out = torch.cat([F.pixel_shuffle(up(out), 2), skip], dim=1)
            out = _act(conv_b(_act(conv_a(out))))
        residual = self.head(_act(F.pixel_shuffle(self.head_up(out), 2)))
        return residual.add_(x.mean(dim=1))

    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """The forward frame by frame, without concatenations (inference only).

        Every per-frame conv runs on one ``(N, C, h, w)`` frame; the frames' max and mean are
        accumulated in place; the 1x1 fusion, the bottom conv and the decoder's first convs
        apply their weights' input-channel slices to the parts they would have concatenated
        (:func:`_conv_parts`). Equal to the batched forward up to float rounding; uses
        in-place ops that autograd cannot differentiate, hence ``forward`` calls it only
        with autograd off.
        """
        check_input(
            x, ndim=5, channels=self.in_channels, multiple=self.multiple, name="BurstFastNet"
        )
        frames = [F.pixel_unshuffle(x[:, i], 2) for i in range(x.shape[1])]
        pooled = []
        for level, fuse in zip(self.encoder, self.fuse):
            for k, f in enumerate(frames):
                for conv in level:
                    f = _act(conv(f))
                frames[k] = f
            burst = _conv_parts(fuse.burst, _max_mean(frames))
            for k in range(len(frames)):
                frames[k] = _act(fuse.frame(frames[k]).add_(burst))
            del burst
            pooled.append(_max_mean(frames))
        del frames
        out = _act(_conv_parts(self.bottom, pooled.pop()))
        for up, (conv_a, conv_b), skip in zip(self.up, self.decoder, reversed(pooled)):
            out = _act(_conv_parts(conv_a, (F.pixel_shuffle(up(out), 2), *skip)))
            out = _act(conv_b(out))
        return self._head_rows(out).add_(x.mean(dim=1))

    def _head_rows(self, out: torch.Tensor, max_bytes: int = 32 << 20) -> torch.Tensor:
        """The full-resolution head on ``out`` (1/2 resolution) in bands of rows whose widest
        tensor (``4 * head_channels`` at 1/2 resolution) stays under ``max_bytes``.

        Each band is read with 2 rows of context at 1/2 resolution on each side (the 3x3
        ``head_up`` needs one, the full-resolution 3x3 ``head`` half of one), so the bands
        join without a seam: the same numbers as the whole head at once.
        """
        n, _, h, w = out.shape
        row_bytes = n * self.head_up.out_channels * w * out.element_size()
        rows = max(8, max_bytes // max(row_bytes, 1))
        if rows >= h:
            return self.head(_act(F.pixel_shuffle(self.head_up(out), 2)))
        bands = []
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            lo, hi = max(0, r0 - 2), min(h, r1 + 2)
            band = self.head(_act(F.pixel_shuffle(self.head_up(out[:, :, lo:hi]), 2)))
            bands.append(band[:, :, 2 * (r0 - lo):2 * (r1 - lo)])
        return torch.cat(bands, dim=2)
