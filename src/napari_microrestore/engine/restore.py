"""restore(): one entry point for every model of the zoo, used by the CLI and the widgets.

* burst models: ``(T, Y, X)`` raw frames in acquisition order -> registered to the reference
  frame (default ``T // 2``) -> restored -> one ``(Y, X)`` image in the reference frame's
  coordinates;
* single-image models: ``(Y, X)`` or a stack restored slice by slice; the output has the
  input's shape (times ``scale`` in Y and X);
* ssTEM models: a ``(Z, Y, X)`` section stack; the sections named by ``sections`` (or detected
  as missing) are restored from their neighbours and the full stack is returned.

Outputs are float32 in the input's units. Learned models see inputs normalised by the mean and
standard deviation of the data and their outputs are mapped back. Inference runs tile by tile
(halo = the net's receptive radius, blended seams), with a tile size chosen for the device and
halved on out-of-memory; the progress callback and the cancel token are served per tile.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .. import __version__
from ..core.errors import (CancelToken, InputError, ProgressCallback, check_cancel, finite_number,
                           report)
from ..core.orient import Rotation, net_rotation
from ..core.tiling import apply_tiled
from ..models.zoo import ModelCard, get_card


@dataclass
class RestoreResult:
    image: np.ndarray                       # float32, the input's units
    provenance: dict                        # JSON-safe: model, weights sha256, params, device
    registration: Any = None                # RegistrationResult for burst models
    extras: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# device
# --------------------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` if available, else ``mps``, else ``cpu``; validates explicit ones."""
    device = (device or "auto").strip().lower()
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but this torch has no CUDA device")
        if ":" in device:
            idx = device.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise InputError(f"device {device!r} does not exist; "
                                 f"{torch.cuda.device_count()} CUDA device(s) here")
        return device
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("device 'mps' asked for, but Apple MPS is not available")
        return "mps"
    raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


_MODEL_CACHE: dict[tuple, Any] = {}


def _load_net(card: ModelCard, device: str):
    from ..models.zoo import load_model

    key = (str(card.path), str(card.weights.get("sha256")), device)
    net = _MODEL_CACHE.get(key)
    if net is None:
        net = load_model(card, device=device)
        if device.startswith("cuda"):
            import torch

            torch.backends.cudnn.benchmark = True
            net = net.to(memory_format=torch.channels_last)
        _MODEL_CACHE.clear()  # keep one model resident
        _MODEL_CACHE[key] = net
    return net


def default_tile(device: str, n_channels: int) -> int:
    """A tile edge that fits the device: ~1 MP of input on CPU, larger with free GPU memory."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        # ~4 KB of activations per input pixel and channel is a safe envelope for our nets
        side = int(math.sqrt(free * 0.5 / (4096 * max(n_channels, 1))))
        return int(max(256, min(4096, side)) // 64 * 64)
    return 1024


# --------------------------------------------------------------------------------------------
# CPU set-up: threads and the heap
# --------------------------------------------------------------------------------------------
def cpu_threads() -> int:
    """CPU cores this process may use: its CPU affinity (``os.sched_getaffinity``, which
    containers and ``taskset`` restrict) and a cgroup CPU quota (``/sys/fs/cgroup/cpu.max``),
    else ``os.cpu_count()``."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


_THREADS_SET = False


def _configure_cpu_threads() -> int:
    """Give torch's intra-op pool one thread per usable core, once per process.

    torch's default is the machine's physical cores, which a container or ``taskset`` may not
    grant: more threads than cores makes every parallel region wait for descheduled threads.
    The default is only lowered (never raised past the physical cores, since SMT siblings slow
    convolutions down), and an explicit ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` by the
    user is left alone. The pool size is process-wide in torch, so worker threads (napari's)
    use the same count as the main thread.
    """
    global _THREADS_SET
    import torch

    if not _THREADS_SET:
        _THREADS_SET = True
        if "OMP_NUM_THREADS" not in os.environ and "MKL_NUM_THREADS" not in os.environ:
            n = min(torch.get_num_threads(), cpu_threads())
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
    return torch.get_num_threads()


# glibc mallopt parameters, the largest mmap threshold glibc accepts on 64-bit systems, the
# size of a non-main arena's heap and glibc's default top pad
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_MMAP_THRESHOLD_MAX = 32 << 20
_HEAP_MAX = 64 << 20
_TOP_PAD_DEFAULT = 128 << 10
_HEAP_LOCK = threading.Lock()
_HEAP_USERS = 0


def _glibc() -> Any:
    if not hasattr(_glibc, "lib"):
        lib = None
        name = ctypes.util.find_library("c")
        if name and os.name == "posix":
            try:
                cand = ctypes.CDLL(name)
                if hasattr(cand, "mallopt") and hasattr(cand, "malloc_trim"):
                    lib = cand
            except OSError:
                pass
        _glibc.lib = lib
    return _glibc.lib


@contextlib.contextmanager
def cpu_heap():
    """Keep freed memory in the process heap while CPU inference runs (glibc only).

    glibc serves every allocation above 32 MB with a fresh ``mmap`` and gives it back to the
    kernel on free, so each activation tensor of a large tile (hundreds of MB) is page-faulted
    and zeroed by the kernel again in every layer: measured on a 5 x 1024^2 burst with
    tem-burst-fast, 1.1 M page faults and ~45 % of the CPU time in the kernel per forward.
    Inside this context large blocks come from the heap and are reused (no faults after the
    first tile); on leaving the outermost one, large blocks are mmap'd again and the free
    memory is returned to the OS (``malloc_trim``).

    In any thread but the main one (napari's worker, a dask task) allocations come from an
    arena of 64 MB heaps: a block above that is always mmap'd (hence the frame-by-frame
    forward of the burst nets), and glibc deletes a heap as soon as the previous heap has a
    page free at its top, whatever the trim threshold, so a forward creates, page-faults and
    unmaps dozens of heaps. A top pad of one heap size keeps them (measured: run_net in a
    ``threading.Thread`` 1.15-1.29 s -> 1.00-1.02 s, main thread 0.96-0.99 s, tem-burst-fast
    on a 5 x 1024^2 burst).

    Any ``mallopt`` call freezes glibc's dynamic thresholds, so they are left where glibc's
    own heuristic takes them in a process that frees large arrays (mmap above 32 MB, trim
    above 64 MB) rather than at the start-up defaults, which would page-fault every few-MB
    numpy temporary (e.g. in registration). Nested and thread-safe; a no-op elsewhere.
    """
    global _HEAP_USERS
    lib = _glibc()
    if lib is None:
        yield
        return
    with _HEAP_LOCK:
        _HEAP_USERS += 1
        if _HEAP_USERS == 1:
            lib.mallopt(_M_MMAP_MAX, 0)
            lib.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
            lib.mallopt(_M_TOP_PAD, _HEAP_MAX)
    try:
        yield
    finally:
        with _HEAP_LOCK:
            _HEAP_USERS -= 1
            if _HEAP_USERS == 0:
                lib.mallopt(_M_TOP_PAD, _TOP_PAD_DEFAULT)
                lib.mallopt(_M_MMAP_MAX, 65536)
                lib.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                lib.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
                lib.malloc_trim(0)


# --------------------------------------------------------------------------------------------
# tiled network inference
# --------------------------------------------------------------------------------------------
# self-ensembles (geometric test-time augmentation, as in EDSR+ / RCAN+): each entry is
# (transpose Y and X, flip Y, flip X), undone in reverse order on the output. "flips" keeps
# every axis where it is (a burst turned so that its stage motion runs along the columns keeps
# it there); "dihedral" adds the transposes, for nets whose degradation has no direction.
ENSEMBLES: dict[str, tuple[tuple[bool, bool, bool], ...]] = {
    "none": ((False, False, False),),
    "flips": ((False, False, False), (False, True, False), (False, False, True),
              (False, True, True)),
    "dihedral": tuple((t, fy, fx) for t in (False, True) for fy in (False, True)
                      for fx in (False, True)),
}


def _ensemble_name(name: Optional[str]) -> str:
    name = "none" if name is None else str(name)
    if name not in ENSEMBLES:
        raise InputError(f"unknown self-ensemble {name!r}; use one of {', '.join(ENSEMBLES)}")
    return name


def card_ensemble(card: ModelCard, ensemble: Optional[str] = None) -> str:
    """The self-ensemble ``card``'s model runs with: ``ensemble``, else the card's
    ``input.ensemble``; InputError for one the model cannot take (any but "none" for a
    classical method, "dihedral" for a burst net that expects motion along the columns)."""
    name = _ensemble_name(card.ensemble if ensemble is None else ensemble)
    if name != "none" and card.is_classical:
        raise InputError(f"{card.id} is a classical method; a self-ensemble is for learned "
                         "models")
    if name == "dihedral" and card.motion_axis is not None:
        raise InputError(f"{card.id} expects stage motion along the columns; the 'dihedral' "
                         "self-ensemble would transpose it across them (use 'flips')")
    return name


def _geom(a, transpose: bool, flip_y: bool, flip_x: bool, *, inverse: bool = False):
    """Apply (or undo) one ensemble member on the last two axes of a torch tensor."""
    dims = [d for d, on in ((-2, flip_y), (-1, flip_x)) if on]
    if inverse:
        if transpose:
            a = a.transpose(-1, -2)
        return a.flip(dims) if dims else a
    if dims:
        a = a.flip(dims)
    return a.transpose(-1, -2) if transpose else a


def run_net(net, x: np.ndarray, *, burst: bool, device: str, tile: Optional[int] = None,
            progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None,
            ensemble: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """Apply ``net`` to normalised ``x`` ((T, Y, X) for burst nets, (C, Y, X) otherwise).

    ``ensemble`` (a key of :data:`ENSEMBLES`, default "none"): average the net's answers over
    flipped (and transposed) copies of every tile, each mapped back; it costs one forward per
    member (4 or 8) and removes part of the net's variance, not its bias.

    Returns the (C_out, Y * scale, X * scale) output and the tiling actually used.
    """
    import torch

    multiple = int(getattr(net, "multiple", 1))
    scale = int(getattr(net, "scale", 1))
    rr = getattr(net, "receptive_radius", 16)
    halo = int(math.ceil(rr() if callable(rr) else rr))
    halo = min(halo, 256)
    blend = max(8, multiple)
    use_amp = device.startswith("cuda")
    on_cpu = device == "cpu"
    if on_cpu:
        _configure_cpu_threads()
    if not getattr(net, "tile_safe", True):
        # e.g. InstanceNorm: tiles would disagree in brightness, so run the whole slice
        tile = max(x.shape[-2:])
    elif tile is None:
        tile = default_tile(device, x.shape[0])

    ensemble = _ensemble_name(ensemble)
    members = ENSEMBLES[ensemble]

    def fn(t: np.ndarray) -> np.ndarray:
        inp = torch.from_numpy(np.ascontiguousarray(t, np.float32)).to(device)
        inp = inp[None, :, None] if burst else inp[None]
        acc = None
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16,
                                                    enabled=use_amp):
            for k, m in enumerate(members):
                if k:   # a member of a large tile can take seconds: cancel between them
                    check_cancel(cancel)
                out = _geom(net(_geom(inp, *m).contiguous()).float(), *m, inverse=True)
                acc = out if acc is None else acc.add_(out)
            if len(members) > 1:
                acc /= len(members)
        return acc[0].cpu().numpy()

    while True:
        try:
            with cpu_heap() if on_cpu else contextlib.nullcontext():
                out = apply_tiled(fn, x, tile=tile, halo=halo, blend=blend, multiple=multiple,
                                  scale=scale, progress=progress, cancel=cancel)
            info = {"tile": int(tile), "halo": halo, "blend": blend}
            if len(members) > 1:
                info["ensemble"] = {"name": ensemble, "members": len(members)}
            return out, info
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            smallest = 2 * halo + blend + multiple
            if tile // 2 <= smallest:
                raise
            tile //= 2


def _normalise(x: np.ndarray,
               region: Optional[np.ndarray] = None) -> tuple[np.ndarray, float, float]:
    """``(x - mean) / std`` (a new array; statistics over ``region`` if given), mean, std."""
    vals = x[..., region] if region is not None else x
    mean = float(vals.mean())
    std = float(vals.std())
    if not std > 0:
        std = 1.0
    out = np.subtract(x, mean, dtype=np.result_type(x.dtype, np.float32))
    out /= std
    return out, mean, std


# --------------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------------
def _as_float_stack(data, ndim: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim not in ndim:
        dims = " or ".join(f"{d}-D" for d in ndim)
        raise InputError(f"{what} must be {dims}; got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{what} is empty (shape {arr.shape})")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite values")
    return arr


def _select_frames(n: int, reference: int, max_frames: int) -> list[int]:
    """The ``max_frames`` frames nearest the reference (a centred window, clipped at ends)."""
    if n <= max_frames:
        return list(range(n))
    start = min(max(0, reference - max_frames // 2), n - max_frames)
    return list(range(start, start + max_frames))


def restore(data, model: str | ModelCard, *, device: str = "auto",
            reference: Optional[int] = None, register: bool = True,
            motion: str = "translation", sections: Optional[list[int]] = None,
            tile: Optional[int] = None, masks: Optional[np.ndarray] = None,
            motion_angle: Optional[float] = None, motion_prior: Optional[float] = None,
            ensemble: Optional[str] = None,
            progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None) -> RestoreResult:
    """Restore ``data`` with ``model`` (a zoo id, a card path or a :class:`ModelCard`).

    ``masks`` (ssTEM models): (Z, Y, X) artefact masks (True = damaged, e.g. a folds /
    precipitates Labels layer); a section to restore without a mask is re-made whole from its
    neighbours, and blank sections are detected as missing.

    ``motion_angle`` (learned burst models): the direction the stage moved, in degrees from +x
    towards +y (90 = along the columns); by default it is read from the registration (see
    :func:`burst_orientation`). The zoo's nets learned motion along the columns, so the
    registered burst is rotated for the net until its motion runs along them, and the answer
    rotated back (:mod:`~napari_microrestore.core.orient`). ``motion_prior``: the direction
    a stream's previous window was turned by, kept while this burst reads within
    ``HOLD_DEG`` of it (see :func:`burst_orientation`'s ``prior``).

    ``ensemble`` (learned models): "none", "flips" or "dihedral" (see :data:`ENSEMBLES`);
    None takes the card's ``input.ensemble`` (its metrics were measured with it), else "none".
    """
    card = model if isinstance(model, ModelCard) else get_card(model)
    t0 = time.perf_counter()
    dev = "cpu" if card.is_classical else resolve_device(device)
    ensemble = card_ensemble(card, ensemble)
    prov: dict = {
        "model": card.id, "task": card.task, "architecture": card.architecture,
        "weights_sha256": (card.weights or {}).get("sha256"), "device": dev,
        "version": __version__, "parameters": {"reference": reference, "register": register,
                                               "motion": motion, "sections": sections,
                                               "tile": tile, "motion_angle": motion_angle,
                                               "motion_prior": motion_prior,
                                               "ensemble": ensemble},
    }
    if card.is_burst:
        res = _restore_burst(data, card, dev, reference, register, motion, tile, progress,
                             cancel, prov, motion_angle, motion_prior, ensemble)
    elif card.task == "sstem":
        res = _restore_sstem(data, card, dev, sections, tile, progress, cancel, prov, masks,
                             ensemble)
    else:
        res = _restore_single(data, card, dev, tile, progress, cancel, prov, ensemble)
    prov["seconds"] = round(time.perf_counter() - t0, 3)
    report(progress, 1.0, "done")
    return res


# a stream keeps its previous window's direction while a window's own reading stays this
# close to it (degrees): readings from the registration wander by ~1 degree, a stage that
# turns moves by far more, and the nets take directions within ~10 degrees of the columns
HOLD_DEG = 5.0
# the motion blur read from the frames decides the orientation only when it is at least this
# long (px): shorter blur hardly tells a direction, and matters little to the net
MIN_BLUR_FOR_DIRECTION = 3.0
# the blur is read on the central crop of a few frames (more when they are small)
_BLUR_CROP, _BLUR_FRAMES, _BLUR_PIXELS = 512, 3, 3 * 512 * 512


def burst_orientation(card: ModelCard, shape: tuple, transforms: Optional[np.ndarray] = None,
                      motion_angle: Optional[float] = None, frames=None,
                      prior: Optional[float] = None) -> dict:
    """How a learned burst net sees a burst of frames of ``shape`` (``(..., Y, X)``): the
    stage-motion direction and the rotation that turns it along the columns for the net.

    The zoo's burst nets were trained on stage motion along the columns, within ~10 degrees
    (``card.motion_axis == "vertical"``); a burst moving along ``angle`` is rotated by
    ``core.orient.net_rotation(angle)`` (``angle - 90`` in [-90, 90)) for the net and back
    (:class:`~napari_microrestore.core.orient.Rotation`). The direction is, in this order:

    1. ``motion_angle`` if given (source "given");
    2. the principal axis of the offsets of the registration's ``transforms`` ((T, 2, 3),
       core's convention) when they spread over >= 2 px
       (:func:`~napari_microrestore.core.registration.motion_direction`; source
       "registration");
    3. the direction of the motion blur in ``frames`` (if given: frames as recorded, not
       warped, whose interpolation smooths the noise and misleads the estimate),
       measured by :func:`~napari_microrestore.core.probes.estimate_degradation` on the
       central 512 x 512 px of 3 frames (more if smaller; about 0.4 s), when it finds at least
       ``MIN_BLUR_FOR_DIRECTION`` px of blur (source "blur"): for frames registered
       beforehand or that barely moved between exposures. Strongly oriented scenes (a
       grating) can read as blur there; ``motion_angle`` overrides.

    Otherwise the direction is unknown and the burst is left as it is.

    ``prior`` (a stream's previous window; not with ``motion_angle``): the direction used
    before. It is kept when this burst's own reading (2.) lies within ``HOLD_DEG`` of it,
    so that the windows of a straight stage run are all turned alike (a reading wanders by a
    degree or so from window to window), and replaced when the stage has turned; a burst whose
    registration tells no direction takes it (source "previous window") instead of reading
    the blur (3.).

    Returns
    -------
    dict
        ``angle_deg`` (float or None, rounded to 0.01 degree), ``source`` ("given",
        "registration", "blur", "previous window", "unknown", or "not needed" for nets that
        take any direction and classical methods) and ``rotation_deg`` (what the frames are
        rotated by for the net, from the rounded angle: passing ``angle_deg`` back as
        ``motion_angle`` gives the same rotation). With a ``prior``, ``read_deg``: this
        burst's own reading from its registration (None if it tells none).
    """
    from ..core.registration import motion_direction

    if card.motion_axis is None:
        return {"angle_deg": None, "source": "not needed", "rotation_deg": 0.0}
    angle, source = None, "unknown"
    if motion_angle is not None:
        angle, source = finite_number(motion_angle, "motion_angle") % 180.0, "given"
    elif transforms is not None:
        angle = motion_direction(transforms, tuple(shape)[-2:])
        source = "registration"
    held: dict = {}
    if prior is not None and motion_angle is None:
        prior = round(finite_number(prior, "motion_prior"), 2) % 180.0
        held["read_deg"] = None if angle is None else round(angle, 2) % 180.0
        if angle is None or _angle_apart(angle, prior) <= HOLD_DEG:
            angle, source = prior, "previous window"
    if angle is None and frames is not None:
        angle = blur_direction(frames)
        source = "blur"
    if angle is None:
        source = "unknown"
    angle = None if angle is None else round(angle, 2) % 180.0
    return {"angle_deg": angle, "source": source,
            "rotation_deg": round(net_rotation(angle), 2), **held}


def _angle_apart(a: float, b: float) -> float:
    """Degrees between two directions (of axes: modulo 180)."""
    d = (float(a) - float(b)) % 180.0
    return min(d, 180.0 - d)


def blur_direction(frames) -> Optional[float]:
    """Direction (degrees in [0, 180), ``blur_angle``'s convention) of the motion blur in a
    burst ``(T, Y, X)``, or None when less than ``MIN_BLUR_FOR_DIRECTION`` px of blur is
    found (see :func:`burst_orientation`)."""
    from ..core import probes

    arr = frames if hasattr(frames, "detach") else np.asarray(frames)  # a torch tensor too
    arr = arr[None] if arr.ndim == 2 else arr
    t, ny, nx = arr.shape[-3:]
    if min(ny, nx) < 32:
        return None
    per_frame = min(ny, _BLUR_CROP) * min(nx, _BLUR_CROP)
    n_use = min(t, max(_BLUR_FRAMES, _BLUR_PIXELS // per_frame))
    keep = sorted({int(round(v)) for v in np.linspace(0, t - 1, n_use)})
    y0, x0 = max(0, (ny - _BLUR_CROP) // 2), max(0, (nx - _BLUR_CROP) // 2)
    crop = arr[keep, y0:y0 + _BLUR_CROP, x0:x0 + _BLUR_CROP]
    if hasattr(crop, "detach"):
        crop = crop.detach().float().cpu().numpy()
    try:
        est = probes.estimate_degradation(crop)
    except InputError:   # constant frames: no blur to read
        return None
    return est.blur_angle if est.blur_length >= MIN_BLUR_FOR_DIRECTION else None


def _restore_burst(data, card, dev, reference, register, motion, tile, progress, cancel, prov,
                   motion_angle=None, motion_prior=None, ensemble="none"):
    from ..core.registration import register_burst

    frames = _as_float_stack(data, (3,), "a burst")
    n = frames.shape[0]
    fr = card.frames
    if n < max(2, fr["min"]):
        raise InputError(f"model {card.id} needs a burst of at least {max(2, fr['min'])} frames; "
                         f"got {n}")
    ref = n // 2 if reference is None else int(reference)
    if not 0 <= ref < n:
        raise InputError(f"reference frame {reference} is outside the burst's 0..{n - 1}")
    used = _select_frames(n, ref, fr["max"])
    frames = frames[used]
    ref_local = used.index(ref)
    prov["frames_used"] = used
    prov["reference"] = ref

    def sub(lo, hi):
        if progress is None:
            return None
        return lambda f, m: progress(lo + (hi - lo) * f, m)

    reg = None
    if register:
        reg = register_burst(frames, reference=ref_local, motion=motion,
                             progress=sub(0.0, 0.3), cancel=cancel)
        aligned, coverage = reg.aligned, reg.coverage
        prov["registration"] = reg.to_dict()
    else:
        aligned, coverage = frames, np.ones(frames.shape[1:], bool)
    check_cancel(cancel)
    # the blur is read on frames as recorded (a warp's interpolation smooths the noise and
    # misleads the estimate): the input when this call registers, else the reference frame
    # (the one a registration leaves as it is)
    recorded = frames if reg is not None else frames[ref_local:ref_local + 1]

    if card.is_classical:
        from ..models.classical import restore_classical

        out, info = restore_classical(card.architecture.split(":", 1)[1], aligned,
                                      recorded=recorded, progress=sub(0.3, 1.0), cancel=cancel)
        prov["method"] = info
        return RestoreResult(out, prov, reg)

    net = _load_net(card, dev)
    x, mean, std = _normalise(aligned, coverage if coverage.any() else None)
    # single-deblur nets take a fixed number of registered frames as channels
    channels_in = card.task == "single-deblur"
    if channels_in and len(x) != fr["max"]:
        raise InputError(f"model {card.id} takes exactly {fr['max']} frames; got {len(x)}")
    orientation = burst_orientation(card, aligned.shape, None if reg is None else reg.transforms,
                                    motion_angle, frames=recorded, prior=motion_prior)
    prov["motion_direction"] = orientation
    turn = Rotation(x.shape, orientation["rotation_deg"])
    y, tiling = run_net(net, turn.forward(x), burst=not channels_in, device=dev, tile=tile,
                        progress=sub(0.3, 1.0), cancel=cancel, ensemble=ensemble)
    y = turn.inverse(y)
    prov["tiling"] = tiling
    prov["normalisation"] = {"mean": mean, "std": std}
    out = y[0]  # float32, a fresh array: back to input units in place
    out *= std
    out += mean
    return RestoreResult(np.ascontiguousarray(out), prov, reg)


def _restore_single(data, card, dev, tile, progress, cancel, prov, ensemble="none"):
    arr = _as_float_stack(data, (2, 3), "an image")
    stack = arr[None] if arr.ndim == 2 else arr
    net = _load_net(card, dev)
    in_ch = int(card.input.get("channels", 1))
    outs = []
    for i, sl in enumerate(stack):
        check_cancel(cancel)
        x, mean, std = _normalise(sl)
        xin = np.repeat(x[None], in_ch, 0) if in_ch > 1 else x[None]

        def sub(f, m, i=i):
            if progress is not None:
                progress((i + f) / len(stack), f"slice {i + 1}/{len(stack)}: {m}")

        y, tiling = run_net(net, xin, burst=False, device=dev, tile=tile, progress=sub,
                            cancel=cancel, ensemble=ensemble)
        outs.append(y[0] * std + mean)
        prov["tiling"] = tiling
    out = np.stack(outs).astype(np.float32)
    return RestoreResult(out[0] if arr.ndim == 2 else out, prov)


def missing_sections(stack: np.ndarray, *, rel_std: float = 0.02) -> list[int]:
    """Sections whose contrast is near zero compared with the stack's (blank = missing)."""
    stds = stack.reshape(stack.shape[0], -1).std(1)
    ref = float(np.median(stds))
    return [int(i) for i in np.flatnonzero(stds <= rel_std * max(ref, 1e-12))]


def _restore_sstem(data, card, dev, sections, tile, progress, cancel, prov, masks=None,
                   ensemble="none"):
    stack = _as_float_stack(data, (3,), "a section stack")
    z = stack.shape[0]
    if z < 3:
        raise InputError(f"an ssTEM stack needs at least 3 sections; got {z}")
    if masks is not None:
        masks = np.asarray(masks, bool)
        if masks.shape != stack.shape:
            raise InputError(f"artefact masks must have the stack's shape {stack.shape}; "
                             f"got {masks.shape}")
    missing = set(missing_sections(stack))
    if sections is None:
        todo = set(missing)
        if masks is not None:
            todo |= {int(i) for i in np.flatnonzero(masks.reshape(z, -1).any(1))}
    else:
        todo = set(sections)
    todo = sorted(todo)
    bad = [s for s in todo if not 0 <= s < z]
    if bad:
        raise InputError(f"sections {bad} are outside the stack's 0..{z - 1}")
    prov["sections"] = todo
    out = stack.copy()
    if not todo:
        return RestoreResult(out, prov)
    net = _load_net(card, dev)
    lost = missing
    prov["missing"] = sorted(lost & set(todo))
    prov["mask_source"] = {}
    for k, s in enumerate(todo):
        check_cancel(cancel)
        # nearest sections that are not missing (or the one existing neighbour twice)
        prev = next((j for j in range(s - 1, -1, -1) if j not in lost), None)
        nxt = next((j for j in range(s + 1, z) if j not in lost), None)
        if prev is None and nxt is None:
            raise InputError("every section is missing; nothing to restore from")
        prev = nxt if prev is None else prev
        nxt = prev if nxt is None else nxt
        ref = np.stack([stack[prev], stack[nxt]])
        _, mean, std = _normalise(ref)
        if s in lost:
            mask, src = np.ones(stack.shape[1:], bool), "missing"
        elif masks is not None and masks[s].any():
            mask, src = masks[s], "given"
        else:
            # no artefact mask: the whole section is re-made from its neighbours
            mask, src = np.ones(stack.shape[1:], bool), "whole section"
        prov["mask_source"][str(s)] = src
        maskf = mask.astype(np.float32)
        cur = np.zeros_like(maskf) if mask.all() else (stack[s] - mean) / std
        x = np.stack([(stack[prev] - mean) / std, cur, (stack[nxt] - mean) / std, maskf])
        y, tiling = run_net(net, x, burst=False, device=dev, tile=tile, cancel=cancel,
                            ensemble=ensemble)
        out[s] = y[0] * std + mean
        prov["tiling"] = tiling
        report(progress, (k + 1) / len(todo), f"section {s} ({k + 1}/{len(todo)})")
    return RestoreResult(out, prov)
