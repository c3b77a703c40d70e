"""Batch restoration of long streams and large stacks / mosaics, block by block, into OME-Zarr.

One input is cut into *blocks*, each restored on its own and written into its own chunks of an
OME-Zarr array, so blocks can run anywhere: in this process, on the workers of an embedded
Dask ``LocalCluster``, or on an existing Dask cluster (dask-jobqueue on SLURM, dask-cuda).

* **stream** (burst models): a ``(T, Y, X)`` stream gives one restored frame per burst window
  centre, ``(T, Y, X)`` out. The window of frame ``c`` is ``window`` frames centred on ``c`` and
  shifted to stay inside ``[0, T)`` at the ends (as engine.stream does); its reference is ``c``.
  A block is ``block`` consecutive output frames; it reads the union of their windows.
* **stack** (single-image models): a ``(Y, X)`` mosaic or a ``(Z, Y, X)`` stack is cut into
  ``(Y, X)`` blocks of ``block`` input pixels, each read with a halo (the net's receptive
  radius) that is cropped from its result. Intensities are normalised with one mean and
  standard deviation for the whole input (from a strided sample) so that blocks agree.

Every block covers whole output chunks (chunks are ``(1, block * scale, block * scale)`` for
stacks and one frame, or a 2048 px tile of it, for streams), so no two tasks write one chunk.
After a block's data, its *completion record* ``OUT.zarr/.microrestore/blocks/NNNNNNN.json``
(sha256 of the block) is written atomically; a crash between the two leaves no record, and a
re-run simply restores that block again. A re-run without ``overwrite`` resumes: it checks that
the output was made with the same settings and skips every recorded block, so its result
equals an uninterrupted run.

:func:`restore_block` is pure (no Dask, no writing): it reads its input window from the source
path (workers open the files themselves; arrays are never shipped) and returns the block.
In this process (``workers=0``, as napari runs it) the input may also be an in-memory or lazily
indexed array, given as an :class:`~napari_microrestore.core.io.ImageData` (a napari layer
without a file): its blocks are read from the array, and a digest of its pixels stands for
the paths in the output's fingerprint, so a re-run resumes only on the same pixels.
:func:`process_block` restores and writes one block and is what the workers run.
:func:`run_batch` plans, prepares the output, submits the blocks with retries, follows them
with ``as_completed`` and returns a :class:`BatchSummary`. Dask and zarr are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import __version__
from ..core import io
from ..core.errors import (Cancelled, CancelToken, InputError, ProgressCallback, check_cancel,
                           report)
from ..core.io import BATCH_EXTRA_COMMAND
from ..models.zoo import ModelCard, get_card

OME_ZARR_VERSION = "0.4"
RECORDS = ".microrestore"          # folder inside OUT.zarr with the completion records
_UDUNITS = {"nm": "nanometer", "um": "micrometer"}
_STREAM_BLOCK_BYTES = 256 * 2**20  # default stream block: at most this much output
_STACK_BLOCK = 1024                # default stack block edge, input pixels
_CHUNK_EDGE = 2048                 # stream chunks: one frame, or tiles of this edge


# --------------------------------------------------------------------------------------------
# optional dependencies
# --------------------------------------------------------------------------------------------
def _need(module: str):
    """Import ``module`` (zarr, distributed) or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(f"batch processing needs {module.split('.')[0]} (Dask distributed and "
                         f"zarr); install them with: {BATCH_EXTRA_COMMAND}") from exc


# --------------------------------------------------------------------------------------------
# the source: paths, opened by whoever reads
# --------------------------------------------------------------------------------------------
_SOURCES: dict[tuple, io.ImageData] = {}
_SOURCES_LOCK = threading.Lock()


@dataclass(frozen=True)
class Source:
    """What to read: one file (TIFF stack, MRC, ...) or several single-frame TIFFs (a stream).

    Only paths travel to the workers; each process opens the file lazily (memmap / LazyStack)
    once and reads the regions its blocks need.
    """

    paths: tuple[str, ...]

    @property
    def frames(self) -> bool:
        """Several single-frame files, read as one stream."""
        return len(self.paths) > 1

    def open(self) -> io.ImageData:
        """The lazily opened file of a one-file source (cached per process)."""
        key = (self.paths[0], os.stat(self.paths[0]).st_mtime_ns)
        with _SOURCES_LOCK:
            img = _SOURCES.get(key)
            if img is None:
                img = io.read(self.paths[0])
                _SOURCES.clear()  # one source at a time per process
                _SOURCES[key] = img
        return img

    def read(self, region: Sequence[tuple[int, int]]) -> np.ndarray:
        """Pixels of ``region`` ((start, stop) per axis) as float32, read without the rest."""
        sl = tuple(slice(a, b) for a, b in region)
        if self.frames:  # the leading axis selects files: open only those
            data = io.read_frames(self.paths[sl[0]]).data[(slice(None),) + sl[1:]]
        else:
            data = self.open().data[sl]
        return _finite_float32(data, region)


def _finite_float32(data: Any, region: Sequence[tuple[int, int]]) -> np.ndarray:
    """``data`` (the pixels of ``region``) as float32; NaN or infinite values are bad input."""
    arr = np.asarray(data, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"input region {list(region)} contains NaN or infinite values")
    return arr


@dataclass(frozen=True, eq=False)
class ArraySource:
    """An array given instead of paths (numpy, memmap, zarr, a lazy view of a napari layer).

    It cannot travel to other processes, so only a run in this process (``workers=0``) reads
    it; blocks index it for their regions only, so a lazy array is never loaded whole.
    """

    data: Any
    name: str = "in-memory array"
    paths: tuple[str, ...] = ()
    frames: bool = False

    def read(self, region: Sequence[tuple[int, int]]) -> np.ndarray:
        """Pixels of ``region`` ((start, stop) per axis) as a float32 copy (the caller's
        array is never written through)."""
        sl = tuple(slice(a, b) for a, b in region)
        return _finite_float32(np.array(self.data[sl], dtype=np.float32), region)

    def digest(self) -> str:
        """sha256 of the shape, dtype and pixels, read one leading-axis slice at a time: what
        tells a resumable output made from these pixels from one made from others."""
        h = hashlib.sha256(f"{tuple(self.data.shape)} {self.data.dtype}".encode())
        for k in range(self.data.shape[0]) if len(self.data.shape) > 2 else [Ellipsis]:
            h.update(np.ascontiguousarray(np.asarray(self.data[k])).tobytes())
        return h.hexdigest()


def open_source(inputs: Sequence[str | os.PathLike] | io.ImageData
                ) -> tuple[Source | ArraySource, io.ImageData]:
    """Check the inputs and open them lazily: a file, a folder of frames, or several frames;
    an :class:`~napari_microrestore.core.io.ImageData` is taken as is (its ``data`` read in
    place, see :class:`ArraySource`)."""
    if isinstance(inputs, io.ImageData):
        return ArraySource(inputs.data, inputs.path or "in-memory array"), inputs
    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("give at least one input file or folder")
    if len(paths) == 1 and paths[0].is_dir() and not io.is_zarr(paths[0]):
        paths = io.find_tiff_frames(paths[0])
        if not paths:
            raise InputError(f"folder {inputs[0]} contains no TIFF frames (*.tif, *.tiff)")
        if len(paths) == 1:
            raise InputError(f"folder {inputs[0]} holds one TIFF; give the file itself")
    if len(paths) == 1:
        img = io.read(paths[0])
        return Source((str(paths[0].resolve()),)), img
    img = io.read_frames(paths)  # checks every frame's shape and type up front
    return Source(tuple(str(p.resolve()) for p in paths)), img


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One unit of work: the output region it writes and the input region it reads."""

    index: int
    out: tuple[tuple[int, int], ...]    # (start, stop) per output axis
    read: tuple[tuple[int, int], ...]   # (start, stop) per input axis (window / halo included)

    @property
    def out_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.out)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.out)


def window_bounds(centre: int, n: int, window: int) -> tuple[int, int]:
    """Frames ``[start, stop)`` of the burst window of ``centre`` in a stream of ``n`` frames:
    ``window`` frames centred on it, shifted to stay inside ``[0, n)``."""
    window = min(window, n)
    start = min(max(0, centre - window // 2), n - window)
    return start, start + window


def plan_stream(n_frames: int, frame_shape: tuple[int, int], window: int,
                block: int) -> list[Block]:
    """Blocks of ``block`` consecutive output frames; each reads the union of its windows."""
    blocks = []
    full = tuple((0, int(s)) for s in frame_shape)
    for i, c0 in enumerate(range(0, n_frames, block)):
        c1 = min(c0 + block, n_frames)
        f0 = window_bounds(c0, n_frames, window)[0]
        f1 = window_bounds(c1 - 1, n_frames, window)[1]
        blocks.append(Block(i, ((c0, c1),) + full, ((f0, f1),) + full))
    return blocks


def plan_stack(shape: tuple[int, ...], block: int, halo: int, scale: int = 1) -> list[Block]:
    """``(Y, X)`` blocks of ``block`` input pixels (per slice of a stack) read with ``halo``.

    Output regions are ``scale`` times the input block and so start on chunk boundaries of
    ``(1, block * scale, block * scale)`` chunks.
    """
    *lead, h, w = (int(s) for s in shape)
    slices = range(lead[0]) if lead else [None]
    blocks = []
    for z in slices:
        for y0 in range(0, h, block):
            for x0 in range(0, w, block):
                y1, x1 = min(y0 + block, h), min(x0 + block, w)
                out = ((y0 * scale, y1 * scale), (x0 * scale, x1 * scale))
                read = ((max(0, y0 - halo), min(h, y1 + halo)),
                        (max(0, x0 - halo), min(w, x1 + halo)))
                if z is not None:
                    out, read = ((z, z + 1),) + out, ((z, z + 1),) + read
                blocks.append(Block(len(blocks), out, read))
    return blocks


def _round_up(v: int, m: int) -> int:
    return -(-int(v) // m) * m


def _net_geometry(card: ModelCard) -> tuple[int, bool]:
    """(halo, tile_safe) of the card's network: receptive radius rounded up to its multiple."""
    from ..models import build

    net = build(card.architecture, card.kwargs)
    rr = getattr(net, "receptive_radius", 16)
    halo = min(int(math.ceil(rr() if callable(rr) else rr)), 256)
    return _round_up(halo, max(1, card.multiple)), bool(getattr(net, "tile_safe", True))


def _sample_stats(data: Any, max_slices: int = 8, max_side: int = 512) -> tuple[float, float]:
    """Mean and standard deviation of a strided sample (a few slices, every k-th pixel).

    One pair for the whole input keeps neighbouring blocks consistent; a sample keeps planning
    cheap for inputs far larger than memory.
    """
    *lead, h, w = data.shape
    step = max(1, math.ceil(max(h, w) / max_side))
    picks = np.unique(np.linspace(0, lead[0] - 1, min(lead[0], max_slices)).round().astype(int)
                      ) if lead else [None]
    vals = []
    for z in picks:
        sl = data[z] if z is not None else data
        vals.append(np.asarray(sl[::step, ::step], dtype=np.float64).ravel())
    v = np.concatenate(vals)
    if not np.isfinite(v).all():
        raise InputError("the input contains NaN or infinite values")
    std = float(v.std())
    return float(v.mean()), std if std > 0 else 1.0


# --------------------------------------------------------------------------------------------
# the job every block task gets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchJob:
    """Everything a worker needs to restore and write any block (small; paths, no arrays)."""

    source: Source | ArraySource         # ArraySource: only in this process (workers=0)
    output: str                          # the OUT.zarr folder
    card: ModelCard
    mode: str                            # "stream" | "stack"
    device: str = "auto"
    n_frames: int = 0                    # stream length (stream mode)
    window: int = 0                      # frames per burst (stream mode)
    register: bool = True
    motion: str = "translation"
    tile: Optional[int] = None
    ensemble: str = "none"               # self-ensemble (engine.restore.ENSEMBLES)
    norm: tuple[float, float] = (0.0, 1.0)   # stack mode: global mean, std
    threads: Optional[int] = None        # torch threads in the worker (None: leave as is)
    fingerprint: str = ""
    # called on the worker before each block (fault injection in tests, custom logging)
    before_block: Optional[Callable[[Block], None]] = None


@dataclass(frozen=True)
class BlockDone:
    """Typed update: one block restored and written (sent through ``on_update``)."""

    index: int
    seconds: float
    worker: str          # host:pid of the process that wrote it
    net_id: Optional[int]  # id() of the resident network in that process (one per worker)
    done: int = 0        # blocks finished in this run so far
    total: int = 0       # blocks to do in this run


@dataclass(frozen=True)
class BlockFailure:
    index: int
    region: tuple[tuple[int, int], ...]
    reason: str


@dataclass
class BatchSummary:
    """What a run did: blocks written, skipped (already done), failed (after retries)."""

    output: str
    mode: str
    blocks_total: int
    blocks_skipped: int = 0
    blocks_done: int = 0
    failures: list[BlockFailure] = field(default_factory=list)
    seconds: float = 0.0             # the whole call: planning, cluster start, blocks
    run_seconds: float = 0.0         # from the first block submitted to the last one finished
    workers: int = 0
    interrupted: bool = False
    pixels_done: int = 0             # output pixels written in this run
    done: list[BlockDone] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.blocks_skipped + self.blocks_done == self.blocks_total

    @property
    def blocks_per_second(self) -> float:
        """Throughput of the blocks themselves (cluster start-up and planning excluded)."""
        return self.blocks_done / self.run_seconds if self.run_seconds > 0 else 0.0

    def text(self) -> str:
        """A few lines for the terminal: counts, throughput, failures with their reason."""
        mp = self.pixels_done / 1e6
        lines = [
            f"{self.output}: {self.blocks_done} blocks restored, {self.blocks_skipped} already "
            f"done (skipped), {len(self.failures)} failed, of {self.blocks_total} "
            f"({self.mode}, {self.workers} worker{'s' if self.workers != 1 else ''})",
            f"{self.seconds:.1f} s in all, {self.run_seconds:.1f} s on blocks: "
            f"{self.blocks_per_second:.3g} blocks/s, "
            f"{mp / self.run_seconds if self.run_seconds > 0 else 0:.3g} output MP/s",
        ]
        for f in self.failures:
            lines.append(f"  block {f.index} {list(map(list, f.region))} failed: {f.reason}")
        if self.interrupted:
            lines.append("interrupted: run the same command again to resume")
        elif not self.complete:
            lines.append(f"incomplete: {self.blocks_total - self.blocks_skipped - self.blocks_done}"
                         " blocks missing; run the same command again to retry them")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# one block
# --------------------------------------------------------------------------------------------
_NET_LOCK = threading.Lock()


def _resident_net(card: ModelCard, device: str) -> Any:
    """The process's one cached network (engine.restore keeps one model per process)."""
    from .restore import _load_net

    with _NET_LOCK:  # several task threads in one worker load it once
        return _load_net(card, device)


def restore_block(job: BatchJob, block: Block,
                  cancel: Optional[CancelToken] = None) -> np.ndarray:
    """Read ``block``'s input window from the source, restore it, return the output block.

    Pure: no Dask, nothing written. float32 in the input's units, shape ``block.out_shape``.
    """
    from .restore import resolve_device, restore, run_net

    card = job.card
    dev = "cpu" if card.is_classical else resolve_device(job.device)
    if not card.is_classical:
        _resident_net(card, dev)
    if job.mode == "stream":
        (c0, c1), (f0, _f1) = block.out[0], block.read[0]
        frames = job.source.read(block.read)
        out = np.empty(block.out_shape, np.float32)
        for k, c in enumerate(range(c0, c1)):
            check_cancel(cancel)
            s, e = window_bounds(c, job.n_frames, job.window)
            res = restore(frames[s - f0:e - f0], card, device=dev, reference=c - s,
                          register=job.register, motion=job.motion, tile=job.tile,
                          ensemble=job.ensemble, cancel=cancel)
            out[k] = res.image
        return out
    # stack: one (Y, X) region of one slice, with its halo
    x = job.source.read(block.read)
    x = x.reshape(x.shape[-2:])
    mean, std = job.norm
    x = (x - mean) / std
    in_ch = int(card.input.get("channels", 1))
    xin = np.repeat(x[None], in_ch, 0) if in_ch > 1 else x[None]
    y, _ = run_net(_resident_net(card, dev), xin, burst=False, device=dev, tile=job.tile,
                   cancel=cancel, ensemble=job.ensemble)
    s = card.scale
    (ry0, _), (rx0, _) = block.read[-2:]
    (oy0, oy1), (ox0, ox1) = block.out[-2:]
    crop = y[0, oy0 - ry0 * s:oy1 - ry0 * s, ox0 - rx0 * s:ox1 - rx0 * s]
    return (crop * std + mean).astype(np.float32).reshape(block.out_shape)


def _record_path(output: str | Path, index: int) -> Path:
    return Path(output) / RECORDS / "blocks" / f"{index:07d}.json"


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, np.float32).tobytes()).hexdigest()


def write_block(job: BatchJob, block: Block, data: np.ndarray, seconds: float = 0.0) -> Path:
    """Write ``data`` into the block's own chunks, then its completion record (atomically).

    A task left over from an earlier run (cancelled, but still running on a cluster) must not
    write into an output that was since replaced with other settings: the output's
    fingerprint is checked first.
    """
    zarr = _need("zarr")
    stored = _stored_batch(Path(job.output))
    if stored is None or stored.get("fingerprint") != job.fingerprint:
        raise RuntimeError(f"{job.output} was replaced by another run; block {block.index} "
                           "not written")
    arr = zarr.open_array(store=str(Path(job.output) / "0"), mode="r+")
    arr[block.out_slices] = data
    record = {"block": block.index, "out": block.out, "read": block.read,
              "sha256": _digest(data), "fingerprint": job.fingerprint,
              "seconds": round(seconds, 3), "worker": _worker_name(),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return io.write_json(_record_path(job.output, block.index), record)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _set_threads(n: int, *, torch_too: bool) -> None:
    """OpenCV (registration) and torch threads of this process; classical models skip torch."""
    import cv2

    cv2.setNumThreads(n)
    if torch_too:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _get_threads(*, torch_too: bool) -> tuple[int, Optional[int]]:
    import cv2

    if not torch_too:
        return cv2.getNumThreads(), None
    import torch

    return cv2.getNumThreads(), torch.get_num_threads()


def process_block(block: Block, job: BatchJob,
                  cancel: Optional[CancelToken] = None) -> BlockDone:
    """Restore one block and write it with its completion record: what a worker runs."""
    if job.threads:
        _set_threads(job.threads, torch_too=not job.card.is_classical)
    if job.before_block is not None:
        job.before_block(block)
    t0 = time.perf_counter()
    data = restore_block(job, block, cancel)
    seconds = time.perf_counter() - t0
    write_block(job, block, data, seconds)
    from .restore import _MODEL_CACHE

    net_id = id(next(iter(_MODEL_CACHE.values()))) if _MODEL_CACHE else None
    return BlockDone(block.index, seconds, _worker_name(), net_id)


# --------------------------------------------------------------------------------------------
# the output: OME-Zarr with the batch settings in its attributes
# --------------------------------------------------------------------------------------------
def ome_attrs(axes: str, scale: Sequence[float], unit: Optional[str], name: str,
              translation: Optional[Sequence[float]] = None) -> dict:
    """OME-NGFF 0.4 ``multiscales`` for one resolution level ``"0"``."""
    kinds = {"T": "time", "Z": "space", "Y": "space", "X": "space", "C": "channel"}
    ax = []
    for a in axes:
        entry: dict[str, Any] = {"name": a.lower(), "type": kinds[a]}
        if kinds[a] == "space" and unit in _UDUNITS:
            entry["unit"] = _UDUNITS[unit]
        ax.append(entry)
    transforms: list[dict] = [{"type": "scale", "scale": [float(s) for s in scale]}]
    if translation is not None and any(translation):
        transforms.append({"type": "translation", "translation": [float(t) for t in translation]})
    return {"multiscales": [{"version": OME_ZARR_VERSION, "name": name, "axes": ax,
                             "datasets": [{"path": "0", "coordinateTransformations": transforms}]}]}


def _stored_batch(output: Path) -> Optional[dict]:
    """The ``microrestore`` attributes of an existing output, or None if it is not ours."""
    try:
        attrs = json.loads((output / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    mr = attrs.get("microrestore")
    return mr if isinstance(mr, dict) and "batch" in mr else None


def _create_output(output: Path, shape: tuple[int, ...], chunks: tuple[int, ...],
                   attrs: dict) -> None:
    """Create the OME-Zarr group and its (NaN-filled) array beside ``output``, then rename it
    into place, so a crash during creation leaves no half-made output."""
    zarr = _need("zarr")
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        group.create_array("0", shape=shape, chunks=chunks, dtype="float32",
                           fill_value=float("nan"),
                           chunk_key_encoding={"name": "v2", "separator": "/"})
        group.attrs.update(attrs)
        (tmp / RECORDS / "blocks").mkdir(parents=True)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _completed(output: Path) -> set[int]:
    """Blocks with a completion record (records are atomic: one that exists is whole)."""
    folder = output / RECORDS / "blocks"
    if not folder.is_dir():
        return set()
    return {int(e.name[:-5]) for e in os.scandir(folder)
            if e.name.endswith(".json") and e.name[:-5].isdigit()}


def _verify(output: Path, block: Block) -> bool:
    """True if the block's stored data still match the sha256 in its record."""
    zarr = _need("zarr")
    try:
        rec = json.loads(_record_path(output, block.index).read_text(encoding="utf-8"))
        data = zarr.open_array(store=str(output / "0"), mode="r")[block.out_slices]
    except Exception:
        return False
    return rec.get("sha256") == _digest(data)


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """Blocks, output geometry and the job, before anything is written."""

    job: BatchJob
    blocks: list[Block]
    out_shape: tuple[int, ...]
    chunks: tuple[int, ...]
    attrs: dict


def plan_batch(inputs: Sequence[str | os.PathLike] | io.ImageData, output: str | os.PathLike,
               model: str | ModelCard, *, device: str = "auto", block: Optional[int] = None,
               window: Optional[int] = None, register: bool = True,
               motion: str = "translation", tile: Optional[int] = None,
               threads: Optional[int] = None, ensemble: Optional[str] = None,
               before_block: Optional[Callable[[Block], None]] = None) -> BatchPlan:
    """Check the inputs and settings and plan the blocks (reads only a small sample)."""
    from .restore import card_ensemble

    card = model if isinstance(model, ModelCard) else get_card(model)
    ensemble = card_ensemble(card, ensemble)
    out = Path(output).resolve()
    if out.suffix.lower() != ".zarr":
        raise InputError(f"output {output} must be a folder name ending in .zarr")
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    if block is not None and block < 1:
        raise InputError(f"--block must be at least 1; got {block}")
    source, img = open_source(inputs)
    shape = tuple(int(s) for s in img.data.shape)
    yx = img.yx_pixel_size
    unit = img.unit if yx else None
    params: dict[str, Any] = {"register": register, "motion": motion, "tile": tile}
    if ensemble != "none":   # (absent otherwise: earlier outputs keep their fingerprint)
        params["ensemble"] = ensemble
    if card.task == "sstem":
        raise InputError(f"model {card.id} restores ssTEM section stacks, which batch does not "
                         "split into blocks; use 'microrestore restore'")
    if card.is_burst:
        if img.axes not in ("TYX", "ZYX"):
            raise InputError(f"model {card.id} restores a stream of (T, Y, X) frames; the input "
                             f"has shape {shape} (axes {img.axes})")
        n = shape[0]
        fr = card.frames
        w = int(window or fr["default"])
        if not fr["min"] <= w <= fr["max"]:
            raise InputError(f"--window {w} is outside the {fr['min']}..{fr['max']} frames "
                             f"model {card.id} takes")
        w = min(w, n)
        if w < max(2, fr["min"]):
            raise InputError(f"the stream has {n} frames; model {card.id} needs at least "
                             f"{max(2, fr['min'])}")
        frame_bytes = 4 * shape[1] * shape[2]
        b = int(block or max(1, min(16, _STREAM_BLOCK_BYTES // frame_bytes)))
        blocks = plan_stream(n, shape[1:], w, b)
        out_shape = shape
        chunks = (1, min(shape[1], _CHUNK_EDGE), min(shape[2], _CHUNK_EDGE))
        axes, mode = "TYX", "stream"
        scale = (1.0,) + (yx or (1.0, 1.0))
        translation = None
        job_kw: dict[str, Any] = {"n_frames": n, "window": w}
        params.update(window=w, block=b)
    else:
        if img.axes[-2:] != "YX" or len(shape) not in (2, 3):
            raise InputError(f"model {card.id} restores a (Y, X) image or a (Z, Y, X) stack; the "
                             f"input has shape {shape} (axes {img.axes})")
        s = card.scale
        halo, tile_safe = _net_geometry(card)
        m = max(1, card.multiple)
        # nets that are not tile-safe (e.g. InstanceNorm) see whole slices
        b = max(shape[-2:]) if not tile_safe else _round_up(block or _STACK_BLOCK, m)
        blocks = plan_stack(shape, b, halo, s)
        out_shape = shape[:-2] + (shape[-2] * s, shape[-1] * s)
        chunks = (1,) * (len(shape) - 2) + (min(b * s, out_shape[-2]), min(b * s, out_shape[-1]))
        axes, mode = img.axes, "stack"
        py, px = yx or (1.0, 1.0)
        lead = tuple(img.pixel_size[:-2]) if img.pixel_size else (1.0,) * (len(shape) - 2)
        scale = lead + (py / s, px / s)
        # output pixel centres of a zoomed grid: the first sits at -1/2 + 1/(2 s) input pixels
        translation = (0.0,) * len(lead) + ((-0.5 + 0.5 / s) * py, (-0.5 + 0.5 / s) * px)
        job_kw = {"norm": _sample_stats(img.data)}
        params.update(block=b, halo=halo, normalisation=list(job_kw["norm"]))
    if isinstance(source, ArraySource):  # the pixels themselves identify an array
        inputs_list, inputs_sha256 = [f"<{source.name}>"], source.digest()
    else:
        inputs_list = (list(source.paths) if len(source.paths) <= 64 else
                       [source.paths[0], f"... {len(source.paths)} files", source.paths[-1]])
        inputs_sha256 = hashlib.sha256("\n".join(source.paths).encode()).hexdigest()
    spec = {"inputs": inputs_list, "inputs_sha256": inputs_sha256,
            "input_shape": list(shape), "input_dtype": str(img.data.dtype),
            "model": card.id, "weights_sha256": (card.weights or {}).get("sha256"),
            "mode": mode, "out_shape": list(out_shape), "chunks": list(chunks),
            "blocks": len(blocks), "parameters": params}
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    provenance = {"model": card.id, "task": card.task, "architecture": card.architecture,
                  "weights_sha256": spec["weights_sha256"], "device": device,
                  "version": __version__, "parameters": params, "source": spec["inputs"]}
    attrs = ome_attrs(axes, scale, unit, out.stem, translation)
    attrs["microrestore"] = {"batch": spec, "fingerprint": fingerprint,
                             "provenance": provenance}
    job = BatchJob(source=source, output=str(out), card=card, mode=mode, device=device,
                   register=register, motion=motion, tile=tile, ensemble=ensemble,
                   threads=threads, fingerprint=fingerprint, before_block=before_block,
                   **job_kw)
    return BatchPlan(job, blocks, tuple(out_shape), tuple(chunks), attrs)


def prepare_output(plan: BatchPlan, *, overwrite: bool = False, verify: bool = False) -> set[int]:
    """Create the output, or check an existing one for resuming; return the blocks done.

    An existing output made with other settings is an error (``overwrite`` replaces it); a
    folder that is not a microrestore batch output is never deleted.
    """
    out = Path(plan.job.output)
    if out.exists():
        stored = _stored_batch(out)
        empty = out.is_dir() and not any(out.iterdir())
        if stored is None and not empty:
            raise InputError(f"{out} exists and is not a microrestore batch output; "
                             "choose another output")
        if overwrite or empty:
            shutil.rmtree(out)
        elif stored.get("fingerprint") != plan.job.fingerprint:
            raise InputError(f"{out} was made with other inputs or settings; replace it "
                             "(--overwrite) or choose another output")
    if not out.exists():
        _need("zarr")
        _create_output(out, plan.out_shape, plan.chunks, plan.attrs)
        return set()
    done = _completed(out) & {b.index for b in plan.blocks}
    if verify:
        done = {b.index for b in plan.blocks if b.index in done and _verify(out, b)}
    return done


def _default_workers_threads(workers: Optional[int], threads: Optional[int],
                             gpu: bool) -> tuple[int, int]:
    """Local processes and torch threads each: all cores used, one process per GPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    if workers is None:
        workers = 1 if gpu else max(1, cores // 4)
    if threads is None:
        threads = max(1, cores // max(1, workers))
    return workers, threads


def run_batch(inputs: Sequence[str | os.PathLike] | io.ImageData, output: str | os.PathLike,
              model: str | ModelCard, *, device: str = "auto", workers: Optional[int] = None,
              threads: Optional[int] = None, scheduler: Optional[str] = None,
              block: Optional[int] = None, window: Optional[int] = None, register: bool = True,
              motion: str = "translation", tile: Optional[int] = None, overwrite: bool = False,
              verify: bool = False, retries: int = 2, max_blocks: Optional[int] = None,
              ensemble: Optional[str] = None,
              before_block: Optional[Callable[[Block], None]] = None,
              progress: Optional[ProgressCallback] = None,
              on_update: Optional[Callable[[BlockDone], None]] = None,
              cancel: Optional[CancelToken] = None) -> BatchSummary:
    """Restore ``inputs`` into the OME-Zarr ``output`` block by block; resume by default.

    Parameters
    ----------
    inputs
        Paths (a file, a folder of frames, several frames), or an
        :class:`~napari_microrestore.core.io.ImageData` whose array is read in this process
        (``workers`` 0 or left out; see :class:`ArraySource`).
    workers
        Local worker processes of an embedded ``LocalCluster`` (default: cores // 4, 1 with a
        GPU; 0 for an array input); ``0`` runs the blocks in this process without Dask.
    threads
        torch threads per worker (default: cores // workers locally; left to the cluster's
        workers with ``scheduler``).
    scheduler
        Address of an existing Dask scheduler (``tcp://host:port``): its workers must see the
        input and output paths. With a CUDA device, tasks ask for ``resources={'GPU': 1}``,
        so start GPU workers with ``--resources GPU=1``.
    block
        Output frames per block (streams) or block edge in input pixels (stacks).
    ensemble
        Self-ensemble of every restore (see :func:`~napari_microrestore.engine.restore.restore`;
        default: the card's); part of the settings a resumed run must share.
    retries
        Extra attempts for a failing block before it is reported (a worker that dies is
        replaced by Dask and its block rescheduled).
    max_blocks
        Do at most this many blocks in this run (the rest on a later, resuming run).
    on_update
        Gets a :class:`BlockDone` per finished block, in completion order.
    cancel
        Stops submitting / cancels pending blocks; the summary says ``interrupted``.
    """
    t0 = time.perf_counter()
    plan = plan_batch(inputs, output, model, device=device, block=block, window=window,
                      register=register, motion=motion, tile=tile, threads=threads,
                      ensemble=ensemble, before_block=before_block)
    job = plan.job
    if workers is not None and workers < 0:
        raise InputError(f"--workers must be 0 (in this process) or more; got {workers}")
    if isinstance(job.source, ArraySource):
        if scheduler is not None or workers:
            raise InputError("an in-memory array can only be restored in this process (0 "
                             "workers): Dask workers read their inputs from files")
        workers = 0
    if scheduler is not None or (workers or 0) > 0:  # say what is missing before writing
        _need("distributed")
    if retries < 0:
        raise InputError(f"retries must be 0 or more; got {retries}")
    # local runs resolve the device here; a cluster's GPUs are found from its workers
    gpu = False
    if not job.card.is_classical and scheduler is None:
        from .restore import resolve_device

        gpu = resolve_device(device).startswith("cuda")
    if scheduler is None:
        workers, thr = _default_workers_threads(workers, threads, gpu)
        job = replace(job, threads=thr if workers else threads)
    done_before = prepare_output(plan, overwrite=overwrite, verify=verify)
    todo = [b for b in plan.blocks if b.index not in done_before]
    if max_blocks is not None:
        todo = todo[:max(0, int(max_blocks))]
    summary = BatchSummary(output=job.output, mode=job.mode, blocks_total=len(plan.blocks),
                           blocks_skipped=len(done_before),
                           workers=1 if scheduler is None and workers == 0 else workers or 0)
    try:
        if not todo:
            pass
        elif scheduler is None and workers == 0:
            _run_here(job, todo, retries, summary, progress, on_update, cancel)
        else:
            _run_dask(job, todo, retries, summary, progress, on_update, cancel,
                      scheduler=scheduler, workers=workers, gpu=gpu)
    except (KeyboardInterrupt, Cancelled):  # blocks written so far stay recorded
        summary.interrupted = True
    summary.seconds = time.perf_counter() - t0
    return summary


def _finish(summary: BatchSummary, block: Block, done: BlockDone, total: int,
            progress: Optional[ProgressCallback],
            on_update: Optional[Callable[[BlockDone], None]]) -> None:
    summary.blocks_done += 1
    summary.pixels_done += math.prod(block.out_shape)
    n = summary.blocks_done + len(summary.failures)
    done = replace(done, done=n, total=total)
    summary.done.append(done)
    report(progress, n / total, f"block {block.index} done ({n}/{total})")
    if on_update is not None:
        on_update(done)


def _fail(summary: BatchSummary, block: Block, exc: BaseException, total: int,
          progress: Optional[ProgressCallback]) -> None:
    summary.failures.append(BlockFailure(block.index, block.out, _reason(exc)))
    n = summary.blocks_done + len(summary.failures)
    report(progress, n / total, f"block {block.index} failed ({n}/{total})")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text}"[:200] if text else name


def _run_here(job: BatchJob, todo: list[Block], retries: int, summary: BatchSummary,
              progress, on_update, cancel) -> None:
    """Blocks one after another in this process (the single-process reference, napari)."""
    before = _get_threads(torch_too=not job.card.is_classical) if job.threads else None
    t0 = time.perf_counter()
    try:
        _run_blocks_here(job, todo, retries, summary, progress, on_update, cancel)
    finally:
        summary.run_seconds = time.perf_counter() - t0
        if before is not None:  # process_block set the thread counts: give them back
            cv2_n, torch_n = before
            _set_threads(cv2_n, torch_too=False)
            if torch_n is not None:
                import torch

                torch.set_num_threads(torch_n)


def _run_blocks_here(job: BatchJob, todo: list[Block], retries: int, summary: BatchSummary,
                     progress, on_update, cancel) -> None:
    for block in todo:
        if cancel is not None and cancel.cancelled:
            summary.interrupted = True
            return
        for attempt in range(retries + 1):
            try:
                done = process_block(block, job, cancel)
            except (Cancelled, KeyboardInterrupt):
                raise
            except Exception as exc:  # retried, then reported: never silently missing
                if attempt == retries:
                    _fail(summary, block, exc, len(todo), progress)
                continue
            _finish(summary, block, done, len(todo), progress, on_update)
            break


def _worker_resources(dask_scheduler: Any) -> dict[str, dict]:
    """Run on the scheduler: the resources every worker offers (e.g. ``{'GPU': 1}``)."""
    return {addr: dict(ws.resources) for addr, ws in dask_scheduler.workers.items()}


def _run_dask(job: BatchJob, todo: list[Block], retries: int, summary: BatchSummary,
              progress, on_update, cancel, *, scheduler: Optional[str], workers: int,
              gpu: bool) -> None:
    """Submit every block to a Dask cluster and follow them with ``as_completed``."""
    distributed = _need("distributed")
    cluster = None
    if scheduler is None:
        import dask

        # tasks run in a worker thread, whose own glibc arena would mmap (and page-fault)
        # every large activation tensor afresh: one arena per worker process (see
        # benchmarks/bench_worker.py). glibc reads it at start-up, so it must be set before
        # the nanny spawns the worker, not in its `env`
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": 1}):
            cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, silence_logs=logging.ERROR,
                resources={"GPU": 1} if gpu else None)
        client = distributed.Client(cluster)
    else:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except OSError as exc:
            raise InputError(f"cannot reach the Dask scheduler {scheduler} ({exc})") from exc
    futures: list = []
    try:
        resources = client.run_on_scheduler(_worker_resources)
        summary.workers = len(resources)
        if scheduler is not None and not job.card.is_classical:
            has_gpu = any(r.get("GPU") for r in resources.values())
            dev = job.device.strip().lower()
            gpu = dev.startswith("cuda") or (dev == "auto" and has_gpu)
            if gpu and not has_gpu:
                raise InputError(f"device {job.device!r} needs GPU workers, but no worker of "
                                 f"{scheduler} offers the resource GPU; start them with "
                                 "--resources GPU=1")
        job_future = client.scatter(job, broadcast=True, hash=False)
        t0 = time.perf_counter()
        run_id = uuid.uuid4().hex[:8]
        futures = client.map(process_block, todo, job=job_future, retries=retries, pure=False,
                             resources={"GPU": 1} if gpu else None,
                             key=[f"microrestore-block-{b.index}-{run_id}" for b in todo])
        by_key = {f.key: b for f, b in zip(futures, todo)}
        for fut in distributed.as_completed(futures):
            block = by_key[fut.key]
            if fut.status == "finished":
                _finish(summary, block, fut.result(), len(todo), progress, on_update)
            else:
                _fail(summary, block, fut.exception() or RuntimeError(fut.status), len(todo),
                      progress)
            summary.run_seconds = time.perf_counter() - t0
            if cancel is not None and cancel.cancelled:
                summary.interrupted = True
                break
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)
        client.close()
        if cluster is not None:
            cluster.close()
