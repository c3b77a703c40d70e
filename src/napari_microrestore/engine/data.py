"""Training / validation samples, degraded on the fly with core.degrade.

Burst samples follow the inference path exactly: a clean section is cut, a TEM-stream burst is
simulated from it (core.degrade.simulate_burst: moving stage, motion blur, Poisson noise), the
frames are registered to the reference frame with the same ECC registration the user's data get
(or, for speed, aligned with the simulated shifts plus a registration-error jitter), and
normalised by the burst's mean / std; the target is the clean reference crop, normalised the
same way. The validation split is made of sections never trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core import degrade
from ..core.errors import InputError


def shared_data_dir() -> Path:
    """``$MICRORESTORE_SHARED_DATA`` or ``../shared/data`` beside the repository checkout."""
    env = os.environ.get("MICRORESTORE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def load_sections(sources: Sequence[str], *, split: str, val_fraction: float = 0.2,
                  root: Optional[Path] = None) -> list[np.ndarray]:
    """Sections (2-D float32) of the given stacks, split by position: the last
    ``val_fraction`` of every stack (a contiguous block) is the validation split."""
    from ..core import io

    if split not in ("train", "val"):
        raise InputError(f"split must be 'train' or 'val'; got {split!r}")
    root = Path(root) if root is not None else shared_data_dir()
    out: list[np.ndarray] = []
    for src in sources:
        p = Path(src) if Path(src).is_absolute() else root / src
        if not p.exists():
            raise InputError(f"training data {p} not found (set MICRORESTORE_SHARED_DATA)")
        arr = np.asarray(io.read(p, lazy=False).data, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[None]
        n_val = max(1, int(round(len(arr) * val_fraction)))
        part = arr[-n_val:] if split == "val" else arr[:-n_val]
        out.extend(part)
    if not out:
        raise InputError(f"no {split} sections in {list(sources)}")
    return out


@dataclass
class BurstSpec:
    patch: int = 128
    frames: Sequence[int] = (5, 5)          # (min, max) frames per burst
    blur_length: Sequence[float] = (6.0, 14.0)
    dose: Sequence[float] = (12.0, 80.0)
    blur_angle: float = 90.0
    angle_jitter: float = 10.0
    align: str = "ecc"                      # "ecc" (as at inference) or "oracle"
    oracle_jitter: float = 0.15             # px, registration error emulated by "oracle"


def _oracle_align(frames: np.ndarray, shifts: np.ndarray, jitter: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from ..core.registration import coverage_mask, warp_frames

    t = len(frames)
    transforms = np.zeros((t, 2, 3))
    transforms[:, 0, 0] = transforms[:, 1, 1] = 1.0
    noisy = shifts + rng.normal(scale=jitter, size=shifts.shape)
    transforms[:, 1, 2] = noisy[:, 0]
    transforms[:, 0, 2] = noisy[:, 1]
    aligned = warp_frames(frames, transforms)
    return aligned, coverage_mask(transforms, frames.shape[1:])


def make_burst_sample(sections: Sequence[np.ndarray], spec: BurstSpec,
                      rng: np.random.Generator, n_frames: Optional[int] = None) -> dict:
    """One normalised training sample: ``x`` (T, P, P), ``y`` (P, P), ``mask`` (P, P)."""
    from ..core.registration import register_burst

    img = sections[int(rng.integers(len(sections)))]
    t = int(n_frames or rng.integers(spec.frames[0], spec.frames[1] + 1))
    p = spec.patch
    margin = int(np.ceil(max(spec.blur_length) * (t + 1))) + 8
    h, w = img.shape
    size_y, size_x = min(h, p + 2 * margin), min(w, p + 2 * margin)
    y0 = int(rng.integers(0, h - size_y + 1))
    x0 = int(rng.integers(0, w - size_x + 1))
    region = img[y0:y0 + size_y, x0:x0 + size_x]
    if rng.random() < 0.5:
        region = region[:, ::-1]
    region = np.ascontiguousarray(np.rot90(region, int(rng.integers(4))) if size_y == size_x
                                  else region)
    b = degrade.simulate_burst(region + 1.0, t, shape=(p, p), blur_length=tuple(spec.blur_length),
                               dose=tuple(spec.dose), blur_angle=spec.blur_angle,
                               angle_jitter=spec.angle_jitter, rng=rng)
    if spec.align == "ecc":
        reg = register_burst(b.frames, reference=b.reference)
        aligned, mask = reg.aligned, reg.coverage
    else:
        aligned, mask = _oracle_align(b.frames, np.asarray(b.shifts), spec.oracle_jitter, rng)
    vals = aligned[:, mask] if mask.any() else aligned
    mean, std = float(vals.mean()), float(vals.std()) or 1.0
    return {
        "x": ((aligned - mean) / std).astype(np.float32),
        "y": ((b.ground_truth - mean) / std).astype(np.float32),
        "mask": mask.astype(np.float32),
        "mean": mean, "std": std, "params": b.params,
    }


def make_burst_batch(sections, spec: BurstSpec, rng: np.random.Generator, batch: int) -> dict:
    """A batch of samples with the same frame count: x (B, T, 1, P, P), y and mask (B, 1, P, P)."""
    t = int(rng.integers(spec.frames[0], spec.frames[1] + 1))
    samples = [make_burst_sample(sections, spec, rng, n_frames=t) for _ in range(batch)]
    return {
        "x": np.stack([s["x"] for s in samples])[:, :, None],
        "y": np.stack([s["y"] for s in samples])[:, None],
        "mask": np.stack([s["mask"] for s in samples])[:, None],
    }
