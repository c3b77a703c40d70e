"""Restoration of damaged or missing ssTEM sections, after Deng et al. 2022.

S. Deng, W. Huang, C. Chen, X. Fu, Z. Xiong, "A unified deep learning framework for ssTEM
image restoration", IEEE Trans. Med. Imaging 41(12):3734-3746, 2022, restore support-film
folds, staining precipitates and missing sections with three modules: an *interpolation*
module that predicts the section from its two artefact-free neighbours, a *correction* module
that rectifies the section from the degraded image itself, and a *fusion* module that combines
the two. :class:`SectionRestorer` keeps that structure with flow-free UNets (robust, no
warping artefacts at folds):

* interpolation: ``(prev + next) / 2`` plus a UNet correction computed from ``[prev, next]``;
* correction: ``known + UNet([known, mask])`` with ``known = current * (1 - mask)``: damaged
  pixels are treated as unknown and in-painted from the intact rest of the section (and the
  intact but displaced tissue next to a fold can be moved back). Unlike the paper's
  correction module, it does not see the damaged pixels' values: that is what makes the
  missing-section guarantee below hold exactly;
* fusion: ``w * interpolation + (1 - w) * correction`` with per-pixel weights
  ``w = sigmoid(F([interpolation, correction, mask]) + mask_prior * (2 mask - 1))``. The
  last layer of ``F`` starts at zero, so the untrained net takes ~98 % (``mask_prior=4``) of
  the interpolation where the mask is 1 and of the section itself where it is 0.

Because the section enters only through ``current * (1 - mask)``, a section whose mask is all
ones (a missing one) cannot influence the output: it relies on the interpolation.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from ..core.errors import InputError
from ._flops import Span, check_input

_NORMS = ("batch", "none")


def _double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    bn = norm == "batch"
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _UNet(nn.Module):
    """UNet: ``depth`` levels of two 3x3 convs + 2x2 max-pool (features ``base * 2**level``),
    a two-conv bottleneck, nearest x2 up-sampling + skip concatenation + two 3x3 convs per
    level, and a 1x1 output convolution that starts at zero (so the UNet starts as 0)."""

    def __init__(self, in_channels: int, out_channels: int, base: int, depth: int,
                 norm: str) -> None:
        super().__init__()
        chans = [base * 2 ** level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans[:-1]:
            self.down.append(_double_conv(cin, c, norm))
            cin = c
        self.bottleneck = _double_conv(cin, chans[-1], norm)
        self.up = nn.ModuleList(
            _double_conv(chans[level + 1] + chans[level], chans[level], norm)
            for level in reversed(range(depth))
        )
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(chans[0], out_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def span(self, span: Span) -> Span:
        """The receptive span of the output, given that of the input (see :class:`Span`)."""
        skips = []
        for _ in self.down:
            span = span.conv().conv()
            skips.append(span)
            span = span.down()
        span = span.conv().conv()
        for skip in reversed(skips):
            span = span.up("nearest").merge(skip).conv().conv()
        return span

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([self.upsample(x), skip], 1))
        return self.head(x)


class SectionRestorer(nn.Module):
    """Interpolation + correction + fusion network for one ssTEM section (Deng et al. 2022).

    Input ``(N, 4, H, W)``: channels ``[previous section, current section (damaged, or zeros
    when missing), next section, artefact mask (1 = damaged; all ones for a missing
    section)]``, sections normalised (e.g. by the mean and std of the two neighbours), the mask
    in [0, 1]. Output ``(N, 1, H, W)``: the restored current section, in the same normalised
    space. See the module docstring for the three branches.

    Parameters
    ----------
    base
        Features of the first UNet level (both UNets).
    depth
        Down-sampling levels of the UNets.
    fusion_channels
        Features of the fusion module's two hidden 3x3 convolutions.
    norm
        ``"batch"`` (works with the engine's ``adapt_bn``) or ``"none"``.
    mask_prior
        Logit added to the fusion weight, ``+mask_prior`` where damaged and ``-mask_prior``
        where intact: the untrained net leans on the interpolation in damaged pixels and
        keeps the section elsewhere; training adjusts the weights around that prior.

    Attributes
    ----------
    task : str
        ``"sstem"``.
    scale : int
        1.
    multiple : int
        ``2**depth``: input height and width must be multiples of it.
    receptive_radius : int
        Upper bound, in input pixels (Chebyshev distance), of how far an input pixel can
        change the output: the UNet's ``7 * 2**depth - 5`` plus 3 for the fusion module
        (110 for the default).

    Notes
    -----
    Default config measured by :func:`napari_microrestore.models._flops.gflops_per_megapixel`
    on a ``(1, 4, 64, 64)`` input: 3.93 M parameters, 219 GFLOP per megapixel.
    """

    task = "sstem"
    scale = 1

    def __init__(self, base: int = 16, depth: int = 4, fusion_channels: int = 16,
                 norm: str = "batch", mask_prior: float = 4.0) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise InputError(f"norm must be one of {', '.join(_NORMS)}; got {norm!r}")
        if min(base, depth, fusion_channels) < 1:
            raise InputError("base, depth and fusion_channels must be >= 1; got "
                             f"{base}, {depth}, {fusion_channels}")
        self.depth = depth
        self.multiple = 2 ** depth
        self.mask_prior = float(mask_prior)
        self.interpolation = _UNet(2, 1, base, depth, norm)
        self.correction = _UNet(2, 1, base, depth, norm)
        last = nn.Conv2d(fusion_channels, 1, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.fusion = nn.Sequential(
            nn.Conv2d(3, fusion_channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(fusion_channels, fusion_channels, 3, padding=1), nn.ReLU(inplace=True),
            last,
        )

    @property
    def receptive_radius(self) -> int:
        span = self.interpolation.span(Span())  # both UNets have the same structure
        return span.conv().conv().conv().radius  # the fusion module's three 3x3 convs

    def forward(self, x: torch.Tensor, return_branches: bool = False
                ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Restore the current section.

        Parameters
        ----------
        x
            ``(N, 4, H, W)``: previous, current, next section and the artefact mask.
        return_branches
            Also return a dict of the branch outputs for branch losses: ``"interpolation"``
            and ``"correction"`` (``(N, 1, H, W)`` sections) and ``"weight"`` (the fusion
            weight of the interpolation, in (0, 1)).

        Returns
        -------
        torch.Tensor or (torch.Tensor, dict)
            The restored ``(N, 1, H, W)`` section (and the branches).
        """
        check_input(x, ndim=4, channels=4, multiple=self.multiple,
                    name="SectionRestorer [previous, current, next, mask]")
        prev, cur, nxt, mask = x.split(1, dim=1)
        if bool((mask < 0).any() or (mask > 1).any()):
            raise InputError("the artefact mask (channel 3) must lie in [0, 1]; got values "
                             f"from {float(mask.min()):g} to {float(mask.max()):g}")
        interp = 0.5 * (prev + nxt) + self.interpolation(torch.cat([prev, nxt], 1))
        known = cur * (1 - mask)
        corr = known + self.correction(torch.cat([known, mask], 1))
        logit = self.fusion(torch.cat([interp, corr, mask], 1))
        weight = torch.sigmoid(logit + self.mask_prior * (2 * mask - 1))
        out = weight * interp + (1 - weight) * corr
        if return_branches:
            return out, {"interpolation": interp, "correction": corr, "weight": weight}
        return out
