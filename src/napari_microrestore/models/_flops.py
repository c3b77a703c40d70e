"""Cost and footprint of the architectures: FLOPs, parameters, receptive spans, input checks.

Shared by the model files of the zoo (and their tests) so that every architecture reports its
compute cost and its tiling halo the same way:

* :func:`gflops_per_megapixel` measures the forward cost with torch's own
  :class:`~torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as 2 FLOPs; only
  matrix products and convolutions are counted, not activations, norms or pooling);
* :func:`count_parameters` counts weights;
* :class:`Span` derives an exact upper bound of a network's receptive radius from its layer
  structure, which the architectures expose as ``receptive_radius`` (the engine's tiling halo);
* :func:`check_input` raises one clear sentence when a tensor has the wrong rank, channel count
  or a spatial size that is not a multiple of the network's down-sampling factor (the engine
  pads to ``multiple`` before calling a model, so this only fires on misuse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.errors import InputError


def gflops_per_megapixel(model: nn.Module, example: torch.Tensor) -> float:
    """Forward-pass cost of ``model`` in GFLOP per megapixel of the input frame size.

    The forward pass runs once on ``example`` under ``torch.no_grad()`` in eval mode (the
    model's training flag is restored afterwards). FLOPs are counted by
    :class:`torch.utils.flop_counter.FlopCounterMode`: a multiply-add is 2 FLOPs, convolutions
    and matrix products are counted, element-wise operations are not. The total is divided by
    ``H * W / 1e6`` where ``H, W = example.shape[-2:]`` is the size of one INPUT frame, so a
    burst net is charged for all of its frames per megapixel of the restored image, and a 2x
    super-resolution net per megapixel of its low-resolution input.

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    example : torch.Tensor
        A valid input, e.g. ``(1, 5, 1, 256, 256)`` for a 5-frame burst net or
        ``(1, 3, 256, 256)`` for a single-image net.

    Returns
    -------
    float
        GFLOP per input megapixel.
    """
    height, width = example.shape[-2:]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9 / (height * width / 1e6)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``; buffers are not counted."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Span:
    """Input pixels that one feature pixel depends on, along one axis.

    A feature map at ``level`` has a stride of ``2 ** level`` input pixels; its pixel ``j``
    depends on input pixels ``2 ** level * j + lo`` to ``2 ** level * j + hi`` (inclusive).
    Starting from the input (``Span()``), each layer maps a span to the span of its output,
    so walking a network's layers gives an exact bound of how far information travels. Paths
    that are concatenated or added are combined with :meth:`merge`. The same bound holds in
    Y and X for square kernels.

    Parameters
    ----------
    lo, hi : int
        Offsets in input pixels (``lo <= 0 <= hi`` for centred layers).
    level : int
        Down-sampling level (stride ``2 ** level``).
    """

    lo: int = 0
    hi: int = 0
    level: int = 0

    @property
    def _stride(self) -> int:
        return 2**self.level

    def conv(
        self, kernel: int = 3, stride: int = 1, padding: Optional[int] = None, dilation: int = 1
    ) -> Span:
        """After a convolution or pooling (stride 1 or 2; ``padding`` defaults to "same")."""
        if stride not in (1, 2):
            raise InputError(f"Span handles strides 1 and 2; got {stride}")
        pad = dilation * (kernel - 1) // 2 if padding is None else padding
        reach = dilation * (kernel - 1)
        level = self.level + (1 if stride == 2 else 0)
        return Span(
            self.lo - pad * self._stride, self.hi + (reach - pad) * self._stride, level
        )

    def down(self) -> Span:
        """After a 2x2 stride-2 pooling or a 2x pixel unshuffle."""
        return self.conv(kernel=2, stride=2, padding=0)

    def up(self, mode: str = "nearest") -> Span:
        """After a 2x up-sampling: ``"nearest"`` (also pixel shuffle) or ``"bilinear"``.

        Bilinear means ``align_corners=False``: fine pixel ``j`` reads the two coarse pixels
        nearest to its centre, ``j // 2 - 1`` and ``j // 2`` (even ``j``) or ``j // 2`` and
        ``j // 2 + 1`` (odd ``j``).
        """
        if self.level < 1:
            raise InputError(f"cannot up-sample a span at level {self.level}")
        fine = self._stride // 2
        if mode == "nearest":
            return Span(self.lo - fine, self.hi, self.level - 1)
        if mode == "bilinear":
            return Span(self.lo - 2 * fine, self.hi + fine, self.level - 1)
        raise InputError(f"unknown up-sampling mode {mode!r}; expected 'nearest' or 'bilinear'")

    def merge(self, *others: Span) -> Span:
        """Union with spans of other paths at the same level (concatenation, sum)."""
        for other in others:
            if other.level != self.level:
                raise InputError(f"cannot merge spans at levels {self.level} and {other.level}")
        spans = (self, *others)
        return Span(min(s.lo for s in spans), max(s.hi for s in spans), self.level)

    @property
    def radius(self) -> int:
        """Receptive radius in input pixels (Chebyshev); the span must be back at level 0."""
        if self.level != 0:
            raise InputError(f"the receptive radius is defined at level 0; span is at {self.level}")
        return max(-self.lo, self.hi)


def check_input(
    x: torch.Tensor, *, ndim: int, channels: int, multiple: int, name: str
) -> None:
    """Raise ``ValueError`` unless ``x`` has rank ``ndim``, ``channels`` channels at dim
    ``ndim - 3`` and H, W divisible by ``multiple`` (``name`` is the model, for the message)."""
    layout = "(N, T, C, H, W)" if ndim == 5 else "(N, C, H, W)"
    if x.ndim != ndim:
        raise InputError(f"{name} expects a {ndim}-D tensor {layout}; got shape {tuple(x.shape)}")
    if x.shape[ndim - 3] != channels:
        raise InputError(
            f"{name} expects C = {channels} in {layout}; got shape {tuple(x.shape)}"
        )
    height, width = x.shape[-2:]
    if height % multiple or width % multiple:
        raise InputError(
            f"{name} needs H and W that are multiples of {multiple} (the engine pads); "
            f"got {height}x{width}"
        )
    if x.shape[0] == 0 or (ndim == 5 and x.shape[1] == 0) or height == 0 or width == 0:
        raise InputError(f"{name} got an empty tensor of shape {tuple(x.shape)}")
