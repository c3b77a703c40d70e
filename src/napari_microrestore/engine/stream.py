"""restore_stream(): restore every frame (or chosen frames) of a stream with a burst model.

A burst window of ``window`` consecutive frames slides along a ``(T, Y, X)`` stream; each
chosen centre frame is the reference of its window, which is registered to it and restored
by :func:`napari_microrestore.engine.restore.restore` (same model card, same device, same
parameters), so every restored frame is in its own frame's coordinates and equals a
per-window ``restore`` call. At the stream ends the window is shifted to stay inside
``[0, T)``, so the centre frame is off-centre there (it stays the reference).

What is shared between windows, since consecutive windows share all frames but one:

* every frame is read (and converted to float32) once, and kept only while a later window
  still needs it, so a lazy or memory-mapped stream is never loaded whole;
* the network is loaded once (``engine.restore._MODEL_CACHE``), and on the CPU the heap is
  kept for the whole stream (:func:`~napari_microrestore.engine.restore.cpu_heap`), so the
  activations of one frame reuse the memory of the previous one.

Registration is done per window, to the window's own centre frame, by ``restore`` itself:
composing neighbour shifts computed once would save only the phase correlation and the
coarse ECC levels (about a third of ``register_burst``'s ~0.1 s on a 5 x 1024^2 window,
i.e. a few per cent of a frame's time on 2 CPU cores) at the price of drift from chained
errors, so every frame keeps exactly the registration (and ECC scores) of a per-window
``restore``.

Stage direction: the burst nets see every window turned until the stage motion runs along
the columns (:func:`~napari_microrestore.engine.restore.burst_orientation`). Each window
reads the direction from its own registration, but keeps the previous window's while its
reading stays within ``HOLD_DEG`` (5 degrees) of it: a straight stage run is then turned by
one angle for every frame (readings wander by a degree or so, and a slightly different
interpolation from frame to frame would flicker), while a stage that turns (the next row of a
scan) is followed; a window whose stage barely moved keeps it too. ``motion_angle`` fixes the
direction for the whole stream.

Typed updates: after each frame a :class:`StreamFrame` is sent through ``on_update`` (the
napari scheduler delivers them on the GUI thread in order), so a widget can fill a movie
layer progressively. ``cancel`` is checked between frames and, through ``restore``, between
registration frames and inference tiles.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..core.errors import CancelToken, InputError, ProgressCallback, check_cancel, report
from ..models.zoo import ModelCard, get_card
from .compute_process import offload
from .restore import cpu_heap, resolve_device, restore


@dataclass(frozen=True)
class StreamFrame:
    """One restored frame, sent through ``on_update`` as soon as it is done."""

    index: int                # the centre (reference) frame's index in the stream
    image: np.ndarray         # (Y, X) float32 restored frame, input units, frame coordinates
    done: int                 # frames finished so far (including this one)
    total: int                # frames to do
    seconds: float            # time spent on this frame


@dataclass
class StreamResult:
    """All restored frames of a :func:`restore_stream` call and their provenance."""

    images: np.ndarray        # (N, Y, X) float32, one per index, in the order of `indices`
    indices: list[int]
    provenance: dict          # restore()'s provenance + window, indices, per-frame registration


def window_frames(centre: int, window: int, n_frames: int) -> list[int]:
    """The ``window`` consecutive frames around ``centre``, shifted to stay in ``[0, T)``.

    Centred for odd windows (one more frame before the centre for even ones), so
    ``window_frames(c, 5, T)`` is ``c-2 .. c+2`` away from the ends, as
    :func:`engine.restore.restore` picks frames around its reference.
    """
    start = min(max(0, centre - window // 2), n_frames - window)
    return list(range(start, start + window))


class _FrameCache:
    """Frames of a (T, Y, X) stream read once as float32, dropped when no window needs them."""

    def __init__(self, data: Any, frame_shape: tuple[int, int]) -> None:
        self._data = data
        self._shape = frame_shape
        self._frames: dict[int, np.ndarray] = {}

    def window(self, frames: Sequence[int]) -> np.ndarray:
        """(len(frames), Y, X) float32 stack of ``frames``. Frames outside this window are
        forgotten: for centre frames in increasing order no later window needs them."""
        for t in [t for t in self._frames if t not in frames]:
            del self._frames[t]
        out = np.empty((len(frames),) + self._shape, np.float32)
        for k, t in enumerate(frames):
            img = self._frames.get(t)
            if img is None:
                img = np.asarray(self._data[t], dtype=np.float32)
                if img.shape != self._shape:
                    raise InputError(f"frame {t} of the stream has shape {img.shape}; expected "
                                     f"{self._shape} like the stream")
                self._frames[t] = img
            out[k] = img
        return out


def _check_indices(indices: Optional[Sequence[int]], n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    try:
        idx = [int(i) for i in indices]
    except (TypeError, ValueError):
        raise InputError(f"indices must be frame numbers; got {indices!r}") from None
    if not idx:
        raise InputError("indices is empty: choose at least one frame to restore")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise InputError(f"frames {bad} are outside the stream's 0..{n - 1}")
    return idx


def restore_stream(data: Any, model: str | ModelCard, *,
                   indices: Optional[Sequence[int]] = None, window: Optional[int] = None,
                   device: str = "auto", register: bool = True, motion: str = "translation",
                   tile: Optional[int] = None, motion_angle: Optional[float] = None,
                   ensemble: Optional[str] = None,
                   progress: Optional[ProgressCallback] = None,
                   on_update: Optional[Callable[[StreamFrame], None]] = None,
                   cancel: Optional[CancelToken] = None) -> StreamResult:
    """Restore the frames ``indices`` of a ``(T, Y, X)`` stream, each from its burst window.

    Parameters
    ----------
    data
        (T, Y, X) stream: a numpy array, a memmap or a lazy stack (e.g.
        :class:`~napari_microrestore.core.io.LazyStack`); frames are read one at a time.
    model
        A burst model of the zoo (id, card path or :class:`ModelCard`): ``burst-deblur`` or
        ``single-deblur``. Single-image models restore a stack frame by frame with
        :func:`~napari_microrestore.engine.restore.restore` instead.
    indices
        Centre frames to restore, in the order wanted (default: every frame).
    window
        Frames per burst; default the card's default burst length (``input.frames.default``,
        5 for the shipped burst nets), and within the card's min..max frames and the stream.
    device, register, motion, tile, ensemble
        As for :func:`~napari_microrestore.engine.restore.restore`.
    motion_angle
        The stage's direction (degrees from +x towards +y) for every window; by default each
        window reads it, holding the previous window's (see the module doc).
    progress, on_update, cancel
        ``progress(fraction, message)`` over the whole stream; ``on_update(StreamFrame)``
        after each frame; ``cancel`` checked between frames and inside each restore.

    Returns
    -------
    StreamResult
        ``images[k]`` is the restored frame ``indices[k]`` in the input's units.
    """
    card = model if isinstance(model, ModelCard) else get_card(model)
    if not card.is_burst:
        raise InputError(f"model {card.id} ({card.task}) is not a burst model; restore a stack "
                         "frame by frame with a single-image model instead of a stream")
    shape = tuple(int(s) for s in getattr(data, "shape", np.shape(data)))
    if len(shape) != 3:
        raise InputError(f"a stream must be a 3-D stack (T, Y, X); got shape {shape}")
    n, h, w = shape
    if n == 0 or h == 0 or w == 0:
        raise InputError(f"the stream is empty (shape {shape})")
    fr = card.frames
    if window is None:
        window = min(max(fr["default"], fr["min"], 2), fr["max"], n)
    if isinstance(window, bool) or int(window) != window:
        raise InputError(f"window must be a whole number of frames; got {window!r}")
    window = int(window)
    lo = max(2, fr["min"])
    if not lo <= window <= fr["max"]:
        raise InputError(f"model {card.id} takes bursts of {lo} to {fr['max']} frames; "
                         f"got a window of {window}")
    if window > n:
        raise InputError(f"the window of {window} frames is longer than the stream ({n} frames)")
    idx = _check_indices(indices, n)
    dev = "cpu" if card.is_classical else resolve_device(device)

    t0 = time.perf_counter()
    cache = _FrameCache(data, (h, w))
    images = np.empty((len(idx), h, w), np.float32)
    per_frame: list[dict] = []
    prov: dict = {}
    prior: Optional[float] = None   # the direction the previous window was turned by
    keep_heap = dev == "cpu" and not card.is_classical
    with cpu_heap() if keep_heap else contextlib.nullcontext():
        for k, centre in enumerate(idx):
            check_cancel(cancel)
            t_frame = time.perf_counter()
            used = window_frames(centre, window, n)
            stack = cache.window(used)

            def sub(f: float, m: str, k: int = k, centre: int = centre) -> None:
                report(progress, (k + f) / len(idx),
                       f"frame {centre} ({k + 1}/{len(idx)}): {m}")

            # off the main thread (napari's worker), on the CPU: in the compute process
            res = offload(restore, data=stack, model=card, device=dev,
                          reference=used.index(centre), register=register, motion=motion,
                          tile=tile, motion_angle=motion_angle, ensemble=ensemble,
                          motion_prior=None if motion_angle is not None else prior,
                          progress=sub if progress else None, cancel=cancel)
            images[k] = res.image
            seconds = time.perf_counter() - t_frame
            prov = res.provenance
            direction = prov.get("motion_direction") or {}
            if direction.get("angle_deg") is not None:
                prior = direction["angle_deg"]
            entry: dict = {"index": centre, "frames_used": used, "seconds": round(seconds, 3)}
            for key in ("normalisation", "method", "motion_direction"):
                if key in prov:
                    entry[key] = prov[key]
            reg = prov.get("registration")
            if reg is not None:
                entry.update({key: reg[key]
                              for key in ("ecc", "shifts", "converged", "transforms")})
                if reg["messages"]:
                    entry["messages"] = reg["messages"]
            per_frame.append(entry)
            if on_update is not None:
                on_update(StreamFrame(index=centre, image=images[k], done=k + 1,
                                      total=len(idx), seconds=seconds))

    out = {key: prov[key] for key in ("model", "task", "architecture", "weights_sha256",
                                      "device", "version") if key in prov}
    out.update({
        "parameters": {"window": window, "register": register, "motion": motion, "tile": tile,
                       "motion_angle": motion_angle,
                       "ensemble": (prov.get("parameters") or {}).get("ensemble")},
        "window": window, "indices": idx, "per_frame": per_frame,
        "seconds": round(time.perf_counter() - t0, 3),
    })
    if "tiling" in prov:
        out["tiling"] = prov["tiling"]
    report(progress, 1.0, "done")
    return StreamResult(images=images, indices=idx, provenance=out)
