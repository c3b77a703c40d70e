"""adapt_bn(): re-estimate BatchNorm statistics on the user's data (no weight update).

Wieslander et al. 2021 ("Exploring network behaviour") found that a burst net trained on one
kind of data improved on another when only its BatchNorm running statistics were recomputed on
the new data. ``adapt_bn`` does that: ~20 forward passes over crops of the user's data with the
BatchNorm layers in training mode (cumulative averages, momentum None), everything else in
eval mode (dropout off), no gradients, on a copy of the network.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import numpy as np

from ..core.errors import CancelToken, InputError, ProgressCallback, check_cancel, report


def _bn_layers(net):
    import torch

    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def adapt_bn(net, batches: Iterable, *, progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None):
    """A copy of ``net`` whose BatchNorm running statistics are the averages over ``batches``
    (an iterable of input tensors). Raises InputError when ``net`` has no BatchNorm."""
    import torch

    adapted = copy.deepcopy(net).eval()
    bns = _bn_layers(adapted)
    if not bns:
        raise InputError("this network has no BatchNorm layers: nothing to adapt")
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all passes
        m.train()
    batches = list(batches)
    with torch.no_grad():
        for i, x in enumerate(batches):
            check_cancel(cancel)
            adapted(x)
            report(progress, (i + 1) / len(batches), f"BN pass {i + 1}/{len(batches)}")
    for m, mom in saved:
        m.momentum = mom
    return adapted.eval()


def burst_batches(aligned: np.ndarray, *, passes: int = 20, batch: int = 4, patch: int = 128,
                  multiple: int = 16, seed: int = 0) -> list:
    """Random normalised crops of a registered burst, as (B, T, 1, P, P) tensors."""
    import torch

    a = np.asarray(aligned, np.float32)
    if a.ndim != 3:
        raise InputError(f"BN adaptation needs a registered (T, Y, X) burst; got {a.shape}")
    a = (a - a.mean()) / (a.std() or 1.0)
    p = min(patch, a.shape[1], a.shape[2]) // multiple * multiple
    if p < multiple:
        raise InputError(f"frames of {a.shape[1:]} are too small to adapt on")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(passes):
        crops = []
        for _ in range(batch):
            y0 = int(rng.integers(0, a.shape[1] - p + 1))
            x0 = int(rng.integers(0, a.shape[2] - p + 1))
            crops.append(a[:, y0:y0 + p, x0:x0 + p])
        out.append(torch.from_numpy(np.stack(crops))[:, :, None])
    return out
