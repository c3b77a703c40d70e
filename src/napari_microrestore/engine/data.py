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
    """The project's training data: ``$MICRORESTORE_SHARED_DATA``, else the first existing of
    ``./shared/data``, ``../shared/data`` (beside a checkout, run from its root) and the folder
    beside this source tree's checkout."""
    env = os.environ.get("MICRORESTORE_SHARED_DATA")
    if env:
        return Path(env)
    candidates = [Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[3].parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[1]


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
    # fraction of bursts whose stage moves in any direction and that are then rotated as
    # restore() rotates them (core.orient: motion along the columns, bicubic on a canvas), so
    # that the net learns the interpolated noise it sees at inference; the direction that sets
    # the rotation is the true one plus a N(0, angle_error) degree estimation error
    rotate: float = 0.0
    angle_error: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.rotate) <= 1.0:
            raise InputError(f"burst.rotate is a fraction of bursts in [0, 1]; got "
                             f"{self.rotate!r}")
        if not float(self.angle_error) >= 0.0:
            raise InputError(f"burst.angle_error must be >= 0 degrees; got {self.angle_error!r}")


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


def _turn_for_net(aligned: np.ndarray, gt: np.ndarray, mask: np.ndarray, angle: float,
                  spec: "BurstSpec", rng: np.random.Generator):
    """Burst, ground truth and coverage turned as restore() turns a burst whose stage moved
    along ``angle`` (read with a ``spec.angle_error`` degree error), cut to the central
    ``spec.patch`` square (inside the frame for any rotation)."""
    from ..core.orient import Rotation, net_rotation

    est = angle + float(rng.normal(scale=spec.angle_error)) if spec.angle_error else angle
    turn = Rotation(aligned.shape, net_rotation(est))
    x, y = turn.forward(aligned), turn.forward(gt)
    m = turn.valid(mask)
    h, w = x.shape[-2:]
    p = spec.patch
    y0, x0 = (h - p) // 2, (w - p) // 2
    cut = (Ellipsis, slice(y0, y0 + p), slice(x0, x0 + p))
    return x[cut], y[cut], m[cut]


def make_burst_sample(sections: Sequence[np.ndarray], spec: BurstSpec,
                      rng: np.random.Generator, n_frames: Optional[int] = None) -> dict:
    """One normalised training sample: ``x`` (T, P, P), ``y`` (P, P), ``mask`` (P, P)."""
    from ..core.registration import register_burst

    img = sections[int(rng.integers(len(sections)))]
    t = int(n_frames or rng.integers(spec.frames[0], spec.frames[1] + 1))
    rotated = spec.rotate > 0 and rng.random() < spec.rotate
    # a rotated burst is simulated larger (a P x P crop of it turned by up to 45 degrees
    # stays inside it; same parity, so the crop is centred on whole pixels)
    p = spec.patch + 2 * int(np.ceil(spec.patch * (np.sqrt(2.0) - 1.0) / 2.0) + 1) \
        if rotated else spec.patch
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
    angle = float(rng.uniform(0.0, 180.0)) if rotated else spec.blur_angle
    b = degrade.simulate_burst(region + 1.0, t, shape=(p, p), blur_length=tuple(spec.blur_length),
                               dose=tuple(spec.dose), blur_angle=angle,
                               angle_jitter=spec.angle_jitter, rng=rng)
    if spec.align == "ecc":
        reg = register_burst(b.frames, reference=b.reference)
        aligned, mask = reg.aligned, reg.coverage
    else:
        aligned, mask = _oracle_align(b.frames, np.asarray(b.shifts), spec.oracle_jitter, rng)
    gt = b.ground_truth
    if rotated:
        aligned, gt, mask = _turn_for_net(aligned, gt, mask, angle, spec, rng)
    vals = aligned[:, mask] if mask.any() else aligned
    mean, std = float(vals.mean()), float(vals.std()) or 1.0
    return {
        "x": ((aligned - mean) / std).astype(np.float32),
        "y": ((gt - mean) / std).astype(np.float32),
        "mask": mask.astype(np.float32),
        "mean": mean, "std": std, "params": b.params,
    }


# --------------------------------------------------------------------------------------------
# samplers for every task: sample(rng) -> {"x": input, "y": (1, P*s, P*s) target,
# "mask": (1, P*s, P*s) where the loss counts, "base": (P*s, P*s) the classical answer}
# all in the normalised space of the input (its mean / std)
# --------------------------------------------------------------------------------------------
def _norm_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    mean, std = float(x.mean()), float(x.std()) or 1.0
    return ((x - mean) / std).astype(np.float32), ((y - mean) / std).astype(np.float32), mean, std


def _crop(img: np.ndarray, size_y: int, size_x: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[-2:]
    if h < size_y or w < size_x:
        raise InputError(f"image {img.shape} is smaller than the {size_y}x{size_x} crop")
    y0 = int(rng.integers(0, h - size_y + 1))
    x0 = int(rng.integers(0, w - size_x + 1))
    return img[..., y0:y0 + size_y, x0:x0 + size_x]


def _augment(stack: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Same random flip / rot90 on the last two axes of every array in ``stack``."""
    k = int(rng.integers(4))
    out = np.rot90(stack, k, axes=(-2, -1))
    if rng.random() < 0.5:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


class BurstSampler:
    """Simulated TEM-stream bursts (see :func:`make_burst_sample`). With ``channels_in`` the
    frames are stacked as channels of a single-image net (the DeblurGAN-v2 baseline)."""

    burst = True

    def __init__(self, data_cfg: dict, split: str, *, channels_in: bool = False):
        self.spec = BurstSpec(**dict(data_cfg.get("burst", {})))
        self.sections = load_sections(data_cfg["sources"], split=split,
                                      val_fraction=data_cfg.get("val_fraction", 0.2))
        self.channels_in = channels_in
        self.burst = not channels_in
        self.n_frames = None

    def sample(self, rng: np.random.Generator) -> dict:
        s = make_burst_sample(self.sections, self.spec, rng, n_frames=self.n_frames)
        return {"x": s["x"], "y": s["y"][None], "mask": s["mask"][None], "base": s["x"].mean(0)}


class SR2xSampler:
    """Joint denoising + 2x super-resolution pairs made from real sections.

    A clean crop (the target, ``2P x 2P``) is optionally blurred by a small Gaussian PSF, 2x2
    binned (:func:`core.degrade.downsample2x`, ``"area"``: a detector with pixels twice as
    large) and recorded with Poisson noise at a mean dose drawn log-uniformly from ``dose``
    (counts per input pixel), plus Gaussian read noise drawn from ``read_noise`` (counts).
    The target is the crop in the same units (counts) as the noisy input, and both are
    normalised by the input's mean / std. Base: bicubic up-sampling of the input, the
    baseline the model card compares with.

    Pixel grid: input pixel ``i`` covers target pixels ``2i`` and ``2i + 1``, so it is centred
    at target coordinate ``2i + 0.5``: the convention of ``cv2.resize`` and of
    ``F.interpolate(..., align_corners=False)`` (the net's residual path), so no half-pixel
    shift between input, base, net and target.

    Config (``data``): ``sources``, ``val_fraction``, ``patch`` (input px), ``dose``
    ``[lo, hi]``, ``read_noise`` ``[lo, hi]`` (default none), ``blur`` ``[lo, hi]`` (PSF sigma
    in target px, default none) applied with probability ``blur_p``. Each sample picks a
    source first, then a section, so a stack of many small sections does not outweigh one of
    a few large ones. Wider noise and blur ranges than the validation protocol's are meant to
    make the model generalise to real data whose degradation is not known exactly.
    """

    burst = False

    def __init__(self, data_cfg: dict, split: str):
        frac = data_cfg.get("val_fraction", 0.2)
        self.stacks = [load_sections([src], split=split, val_fraction=frac)
                       for src in data_cfg["sources"]]
        self.patch = int(data_cfg.get("patch", 48))
        self.dose = _range(data_cfg.get("dose", (20.0, 200.0)), "dose", positive=True)
        self.read_noise = _range(data_cfg.get("read_noise", (0.0, 0.0)), "read_noise")
        self.blur = _range(data_cfg.get("blur", (0.0, 0.0)), "blur")
        self.blur_p = float(data_cfg.get("blur_p", 0.0))

    def sample(self, rng: np.random.Generator) -> dict:
        import cv2

        p = self.patch
        sections = self.stacks[int(rng.integers(len(self.stacks)))]
        img = sections[int(rng.integers(len(sections)))]
        hr = _augment(_crop(img, 2 * p, 2 * p, rng), rng).astype(np.float32) + 1.0
        seen = hr
        if self.blur[1] > 0 and rng.random() < self.blur_p:
            seen = cv2.GaussianBlur(hr, (0, 0), float(rng.uniform(*self.blur)),
                                    borderType=cv2.BORDER_REFLECT)
        clean_lr = degrade.downsample2x(seen)
        dose = float(np.exp(rng.uniform(np.log(self.dose[0]), np.log(self.dose[1]))))
        lr = degrade.poisson_gaussian_noise(clean_lr, dose, rng=rng,
                                            read_noise=float(rng.uniform(*self.read_noise)))
        # the target in the same units (counts) as the noisy input
        x, y, _, _ = _norm_pair(lr, hr * (dose / float(clean_lr.mean())))
        base = cv2.resize(x, (2 * p, 2 * p), interpolation=cv2.INTER_CUBIC)
        return {"x": x[None], "y": y[None], "mask": np.ones((1, 2 * p, 2 * p), np.float32),
                "base": base}


def _range(value, name: str, positive: bool = False) -> tuple[float, float]:
    """A ``[lo, hi]`` config range as two floats (a single number is ``[v, v]``)."""
    lo, hi = (value, value) if np.isscalar(value) else tuple(value)
    lo, hi = float(lo), float(hi)
    if not (0 <= lo <= hi) or (positive and lo <= 0):
        raise InputError(f"data.{name} must be [lo, hi] with {'0 <' if positive else '0 <='} "
                         f"lo <= hi; got {value!r}")
    return lo, hi


def align_to(image: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """``reference`` shifted onto the pixel grid of ``image`` (sub-pixel translation by ECC,
    applied as a Fourier shift so the reference is not smoothed); returns it and the (dy, dx)
    shift removed.

    The DFNN single-shot pairs move sideways with the defocus (-5.5 px at -0.7 um, +4 px at
    +0.7 um: the galvo that sets the defocus also displaces the image), which no restoration
    can undo from one image; comparing unaligned pairs would score the shift, not the focus."""
    from scipy import ndimage

    from ..core.registration import register_burst

    r = register_burst(np.stack([image, reference]).astype(np.float32), reference=0)
    dx, dy = float(r.transforms[1][0, 2]), float(r.transforms[1][1, 2])
    shifted = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(reference), (-dy, -dx))).real
    return shifted.astype(np.float32), (dy, dx)


def load_defocus_pairs(root: Optional[Path] = None, *, align: bool = True
                       ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Real (defocused, in-focus, defocus in um) pairs of the DFNN microtubule data.

    The single-shot pairs use the in-focus image the data's ReadMe assigns to each defocus;
    the z-stack gives pairs of every plane with the in-focus plane (stack index 15, 0.05 um
    steps). With ``align`` (default) every in-focus image is shifted onto its defocused
    image's grid (:func:`align_to`)."""
    from ..core import io

    root = Path(root) if root is not None else shared_data_dir()
    d = root / "defocus" / "dfnn_microtubules"
    single = d / "single"
    if not single.is_dir():
        raise InputError(f"defocus data not found in {d} (set MICRORESTORE_SHARED_DATA)")
    on = io.read_array(single / "cell11G3Dz0p5umON.tif").astype(np.float32)
    on1 = io.read_array(single / "cell11G3Dz0p5umON_1.tif").astype(np.float32)
    first_ref = {"M0p1um", "P0p1um", "M0p3um"}
    pairs = []
    for f in sorted(single.glob("cell11G3Dz0p5umOff*.tif")):
        tag = f.stem.split("Off")[1]
        amount = float(tag[1:].replace("p", ".").replace("um", "")) * (-1 if tag[0] == "M" else 1)
        pairs.append((io.read_array(f).astype(np.float32), on if tag in first_ref else on1, amount))
    stack = io.read_array(d / "stack_z0036-0066_infocus0051.tif").astype(np.float32)
    for i in range(len(stack)):
        if i != 15:
            pairs.append((stack[i], stack[15], (i - 15) * 0.05))
    if align:
        pairs = [(b, align_to(b, s)[0], a) for b, s, a in pairs]
    return pairs


class DefocusSampler:
    """Real defocus pairs, split by image rows: rows < ``split_row`` train, rows >=
    ``split_row`` + 32 validate (never trained on). Each real pair is used with probability
    1 - ``simulated``; otherwise the in-focus image is defocused by core.degrade (Gaussian or
    diffraction PSF, random amount) for variety."""

    burst = False

    def __init__(self, data_cfg: dict, split: str):
        self.pairs = load_defocus_pairs()
        self.patch = int(data_cfg.get("patch", 128))
        self.split_row = int(data_cfg.get("split_row", 560))
        self.simulated = float(data_cfg.get("simulated", 0.3))
        self.split = split

    def _rows(self, a: np.ndarray) -> np.ndarray:
        return a[: self.split_row] if self.split == "train" else a[self.split_row + 32:]

    def sample(self, rng: np.random.Generator) -> dict:
        p = self.patch
        blurred, sharp, _ = self.pairs[int(rng.integers(len(self.pairs)))]
        both = np.stack([self._rows(blurred), self._rows(sharp)])
        both = _augment(_crop(both, p, p, rng), rng)
        inp, tgt = both[0], both[1]
        if rng.random() < self.simulated:
            inp = degrade.defocus(tgt, float(rng.uniform(1.0, 6.0)),
                                  psf="gaussian" if rng.random() < 0.5 else "diffraction")
            inp = inp + rng.normal(scale=0.02 * float(tgt.std()) + 1e-3, size=inp.shape)
        x, y, _, _ = _norm_pair(inp.astype(np.float32), tgt.astype(np.float32))
        return {"x": x[None], "y": y[None], "mask": np.ones((1, p, p), np.float32), "base": x}

    def validation_pairs(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Every real pair, restricted to the validation rows."""
        return [(self._rows(b), self._rows(s), a) for b, s, a in self.pairs]


class SectionSampler:
    """ssTEM restoration: a section with its two neighbours. With probability ``missing`` the
    section is lost (mask all ones, current channel zero), else damaged by a support-film fold
    or stain precipitates (core.degrade; mask = artefact). Target: the real section. Base: the
    mean of the neighbours where the mask is set, the section elsewhere."""

    burst = False

    def __init__(self, data_cfg: dict, split: str):
        from ..core import io

        self.stacks = []
        frac = data_cfg.get("val_fraction", 0.2)
        for src in data_cfg["sources"]:
            p = Path(src) if Path(src).is_absolute() else shared_data_dir() / src
            arr = np.asarray(io.read(p, lazy=False).data, np.float32)
            n_val = max(3, int(round(len(arr) * frac)))
            self.stacks.append(arr[-n_val:] if split == "val" else arr[:-n_val])
        self.patch = int(data_cfg.get("patch", 128))
        self.missing = float(data_cfg.get("missing", 0.5))

    def sample(self, rng: np.random.Generator) -> dict:
        p = self.patch
        st = self.stacks[int(rng.integers(len(self.stacks)))]
        z = int(rng.integers(1, len(st) - 1))
        trio = _augment(_crop(st[z - 1:z + 2], p, p, rng), rng)
        if rng.random() < 0.5:
            trio = trio[::-1].copy()  # the net should not care which neighbour is which
        prev, cur, nxt = trio
        if rng.random() < self.missing:
            mask = np.ones((p, p), np.float32)
            damaged = np.zeros_like(cur)
        else:
            damaged, m = (degrade.fold if rng.random() < 0.5 else degrade.precipitates)(cur, rng=rng)
            mask = m.astype(np.float32)
        ref = np.stack([prev, nxt])
        mean, std = float(ref.mean()), float(ref.std()) or 1.0
        n = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
        cur_in = np.zeros_like(cur) if mask.all() else n(damaged)
        x = np.stack([n(prev), cur_in, n(nxt), mask])
        avg = 0.5 * (n(prev) + n(nxt))
        base = np.where(mask > 0, avg, cur_in)
        return {"x": x, "y": n(cur)[None], "mask": np.ones((1, p, p), np.float32), "base": base}


SAMPLERS = {
    "burst-deblur": lambda d, s: BurstSampler(d, s),
    "single-deblur": lambda d, s: BurstSampler(d, s, channels_in=True),
    "sr2x": SR2xSampler,
    "defocus": DefocusSampler,
    "sstem": SectionSampler,
}


def make_sampler(task: str, data_cfg: dict, split: str):
    if task not in SAMPLERS:
        raise InputError(f"no training data pipeline for task {task!r}")
    return SAMPLERS[task](data_cfg, split)


def make_batch(sampler, rng: np.random.Generator, batch: int) -> dict:
    """Stack ``batch`` samples: burst inputs get a channel axis, (B, T, 1, P, P)."""
    if getattr(sampler, "spec", None) is not None and sampler.burst:
        sampler.n_frames = int(rng.integers(sampler.spec.frames[0], sampler.spec.frames[1] + 1))
    samples = [sampler.sample(rng) for _ in range(batch)]
    x = np.stack([s["x"] for s in samples])
    if sampler.burst:
        x = x[:, :, None]
    return {"x": x, "y": np.stack([s["y"] for s in samples]),
            "mask": np.stack([s["mask"] for s in samples])}
