"""Live restoration of a TEM stream on one device: register + restore each sliding window.

:class:`LivePipeline` takes frames one at a time (``push``) or from an iterable (``run``); once
``window`` frames have arrived, every new frame yields the restored CENTRE frame of the last
``window`` frames (:class:`LiveFrame`), in that frame's coordinates, as
:func:`~napari_microrestore.engine.restore.restore` would restore that window with the same
burst model (registration to the centre frame, mean / std normalisation over the pixels every
frame covers, the network, back to input units).

Built for speed on a GPU:

* each frame goes to the device once (through a pinned staging buffer on CUDA) and stays in a
  ring of ``window`` slots; its registration features (pre-filtered pyramid, gradients,
  whitened spectrum) are computed once, on arrival
  (:class:`~napari_microrestore.core.registration_torch.StreamRegistrar`);
* a window is a fixed sequence of device operations with no host synchronisation (batched
  torch registration, normalisation, the net), so on CUDA it is captured once in a CUDA graph
  and replayed for every later frame (``cuda_graphs``; eager fallback with a warning if the
  capture fails);
* the net runs under fp16 (or bf16) autocast with channels_last weights and cuDNN benchmark on
  CUDA; ``compile=True`` additionally wraps it in ``torch.compile`` (eager fallback);
* the only host synchronisation is the final copy of the restored frame (none with
  ``keep_on_device=True``).

:func:`restore_burst_device` restores one large burst on the device with tiles batched on the
device (used for the 4096 x 4096 benchmark of the quality model).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..core.errors import CancelToken, InputError, check_cancel
from ..core.orient import Rotation
from ..core.registration import prefilter_sigma
from ..core.tiling import plan_tiles, tile_weights
from ..models.zoo import ModelCard, get_card
from .restore import _load_net, burst_orientation, resolve_device


def _translation_transforms(translations: np.ndarray) -> np.ndarray:
    """(T, 2, 3) core transforms of (T, 2) ``(dx, dy)`` translations."""
    tr = np.zeros((len(translations), 2, 3))
    tr[:, 0, 0] = tr[:, 1, 1] = 1.0
    tr[:, :, 2] = translations
    return tr


def stream_orientation(card: ModelCard, frames: np.ndarray,
                       motion_angle: Optional[float] = None) -> dict:
    """:func:`~napari_microrestore.engine.restore.burst_orientation` for a stream, from its
    first window ``frames`` (T, Y, X): the stage's direction from the phase correlation of the
    first and last frame, else from the frames' motion blur (the stage moves the same way
    through a stream, so it is decided once).
    """
    from ..core.registration import phase_correlation

    transforms = None
    if motion_angle is None and card.motion_axis is not None:
        dy, dx = phase_correlation(frames[0], frames[-1])[:2]
        transforms = _translation_transforms(np.array([[0.0, 0.0], [dx, dy]]))
    return burst_orientation(card, frames.shape, transforms, motion_angle, frames=frames)


@dataclass(frozen=True)
class LiveFrame:
    """One restored frame of a live stream.

    Attributes
    ----------
    index
        Stream index (0-based, in push order) of the restored centre frame.
    image
        (Y, X) float32 restored frame in input units: a numpy array, or a device tensor with
        ``keep_on_device=True``.
    shifts
        (window, 2) ``(dy, dx)`` per window frame relative to the centre frame (core's
        convention); numpy, or a device tensor with ``keep_on_device``. In the input's
        orientation even when the pipeline transposes the stream for the net.
    ecc
        (window,) ECC correlation of each registered frame with the centre frame.
    converged
        (window,) bool, False for frames the registration flagged (kept, never dropped).
    seconds
        Wall time of this ``push`` (with ``keep_on_device`` the device may still be working).
    """

    index: int
    image: Any
    shifts: Any
    ecc: Any
    converged: Any
    seconds: float


def _burst_card(model: str | ModelCard) -> ModelCard:
    card = model if isinstance(model, ModelCard) else get_card(model)
    if card.task != "burst-deblur" or card.is_classical:
        raise InputError(f"live restoration needs a burst network (task burst-deblur); "
                         f"model {card.id} is {card.task}"
                         + (" (classical)" if card.is_classical else ""))
    return card


def _pad_to(x: Any, multiple: int) -> Any:
    """Pad ``(..., H, W)`` at the bottom / right to multiples of ``multiple`` as
    :func:`~napari_microrestore.core.tiling.apply_tiled` does (reflect, else edge)."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    mode = "reflect" if min(h, w) > max(ph, pw) else "replicate"
    lead = x.shape[:-2]
    y = F.pad(x.reshape(-1, 1, h, w), (0, pw, 0, ph), mode=mode)
    return y.reshape(*lead, h + ph, w + pw)


def normalise_device(aligned: Any, coverage: Any) -> tuple[Any, Any, Any]:
    """engine.restore's normalisation on the device: ``(x - mean) / std`` with the mean and
    (population) standard deviation of every frame over the covered pixels (all pixels if none
    is covered; std 1 if it is 0). Returns ``x``, ``mean`` and ``std`` as 0-d tensors."""
    import torch

    use = coverage.float()
    use = torch.where(use.sum() > 0, use, torch.ones_like(use))
    total = use.sum(dtype=torch.float64) * aligned.shape[0]
    mean = (aligned * use).sum(dtype=torch.float64) / total
    var = (((aligned - mean.float()) ** 2) * use).sum(dtype=torch.float64) / total
    std = torch.sqrt(var)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (aligned - mean.float()) / std.float(), mean, std


class LivePipeline:
    """Register + restore a stream window by window on one device.

    Parameters
    ----------
    model
        A burst model of the zoo (id, card path or :class:`ModelCard`); default
        ``tem-burst-fast``.
    device
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    window
        Frames per burst (within the model card's range); the restored frame is the window's
        centre frame ``window // 2`` (its reference).
    sigma
        Registration pre-filter (px); default core's ``prefilter_sigma`` of the first frame,
        then fixed for the stream so that every frame's features are computed once.
    amp
        ``"fp16"`` (default, as engine.restore), ``"bf16"`` or ``None``: autocast of the net on
        CUDA (ignored elsewhere).
    cuda_graphs
        Capture a whole window step in a CUDA graph and replay it (CUDA only).
    compile
        Wrap the net in ``torch.compile`` (CUDA only; eager fallback on failure).
    keep_on_device
        Return device tensors and never synchronise with the host.
    levels, iterations
        Registration pyramid levels and ECC iterations per level (see
        :class:`~napari_microrestore.core.registration_torch.TorchRegistrar`).
    motion_angle
        Direction the stage moves (degrees from +x towards +y). By default it is measured on
        the first window (:func:`stream_orientation`), whose frames are kept on the host until
        it is full (no frame is restored before that anyway). Frames are registered as they
        come; the registered window is rotated on the device until the motion runs along the
        columns, as the net learned, and the answer rotated back (``orientation`` says what
        was decided; the sampling grids are made once per stream).
    """

    def __init__(self, model: str | ModelCard = "tem-burst-fast", device: str = "auto",
                 window: int = 5, *, sigma: Optional[float] = None, amp: Optional[str] = "fp16",
                 cuda_graphs: bool = True, compile: bool = False, keep_on_device: bool = False,
                 levels: Optional[int] = None, iterations: Optional[int] = None,
                 motion_angle: Optional[float] = None) -> None:
        import torch

        self.card = _burst_card(model)
        fr = self.card.frames
        if isinstance(window, bool) or int(window) != window or not (
                max(2, fr["min"]) <= window <= fr["max"]):
            raise InputError(f"window must be an integer number of frames in "
                             f"[{max(2, fr['min'])}, {fr['max']}] for model {self.card.id}; "
                             f"got {window!r}")
        if amp not in (None, "fp16", "bf16"):
            raise InputError(f"amp must be 'fp16', 'bf16' or None; got {amp!r}")
        if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
            raise InputError(f"sigma must be a finite number >= 0 (pixels); got {sigma!r}")
        self.device = resolve_device(device)
        self.window = int(window)
        self.sigma = sigma
        self.cuda = self.device.startswith("cuda")
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}[amp]
        self.keep_on_device = keep_on_device
        self.use_graphs = cuda_graphs and self.cuda
        self._reg_kwargs = {k: v for k, v in (("levels", levels), ("iterations", iterations))
                            if v is not None}
        net = _load_net(self.card, self.device)
        self.net = net
        self.multiple = int(getattr(net, "multiple", 1))
        self._forward = net
        if compile and self.cuda:
            try:
                self._forward = torch.compile(net, mode="max-autotune-no-cudagraphs")
            except Exception as exc:  # noqa: BLE001 - stay eager
                warnings.warn(f"torch.compile unavailable ({exc}); running the net eagerly",
                              stacklevel=2)
        self.stream = None  # StreamRegistrar, made once the first window has arrived
        self.count = 0
        self.motion_angle = motion_angle
        self.orientation: Optional[dict] = None  # stream_orientation's, at the first window
        self._rotation: Optional[Rotation] = None  # the net's view, from the first window
        self._pending: list[np.ndarray] = []     # the first window's frames until then
        self._shape: Optional[tuple] = None
        self._graph = None
        self._out = None
        self._staging = None
        self._staged = None

    # ------------------------------------------------------------------ device work
    def _net(self, x: Any) -> Any:
        """The net on ``(1, T, 1, H, W)`` normalised frames (autocast on CUDA)."""
        import torch

        enabled = self.cuda and self.amp_dtype is not None
        with torch.autocast(device_type="cuda", dtype=self.amp_dtype or torch.float16,
                            enabled=enabled, cache_enabled=False):
            try:
                return self._forward(x)
            except Exception as exc:
                if self._forward is self.net:
                    raise
                warnings.warn(f"torch.compile failed ({exc}); running the net eagerly",
                              stacklevel=2)
                self._forward = self.net
                return self.net(x)

    def restore_aligned(self, aligned: Any, coverage: Any) -> Any:
        """Restore ``(T, Y, X)`` registered frames (device tensors) into a ``(Y, X)`` float32
        tensor in input units, as engine.restore does for one tile (turned as the stream's
        first window decided; as recorded before that)."""
        x, mean, std = normalise_device(aligned, coverage)
        turn = self._rotation or Rotation(x.shape, 0.0)
        x = turn.forward(x)
        h, w = x.shape[-2:]
        x = _pad_to(x, self.multiple)[None, :, None]
        y = turn.inverse(self._net(x)[0, 0, :h, :w].float())
        return (y * std.float() + mean.float()).float()

    def _step(self) -> dict:
        """One window: store the staged frame, register the window, restore its centre frame.
        Reads and writes device buffers only (idempotent for a given frame), so it can be
        captured in a CUDA graph."""
        import torch

        with torch.no_grad():
            self.stream.ingest(self._frame_in)
            reg = self.stream.register_window()
            image = self.restore_aligned(reg.aligned, reg.coverage)
        return {"image": image, "translations": reg.translations, "ecc": reg.ecc,
                "failure": reg.failure}

    def _capture(self) -> None:
        """Warm up and capture :meth:`_step` in a CUDA graph; eager from now on if it fails."""
        import torch

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._out = self._step()
            self._graph = graph
        except Exception as exc:  # noqa: BLE001 - run eagerly
            torch.cuda.synchronize()
            self._graph = None
            self.use_graphs = False
            warnings.warn(f"CUDA graph capture failed ({exc}); running windows eagerly",
                          stacklevel=3)

    # ------------------------------------------------------------------------ API
    def _check_frame(self, frame: Any) -> np.ndarray:
        arr = np.asarray(frame)
        if arr.ndim != 2:
            raise InputError(f"a stream frame must be a 2-D image (Y, X); got shape {arr.shape}")
        if arr.dtype.kind not in "biuf":
            raise InputError(f"frames must hold integer or float pixels; got dtype {arr.dtype}")
        if self._shape is not None and arr.shape != self._shape:
            raise InputError(f"frame {self.count} has shape {arr.shape}; the stream's frames are "
                             f"{self._shape}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise InputError(f"frame {self.count} contains NaN or infinite values")
        return arr

    def _upload(self, arr: np.ndarray) -> None:
        """Copy a host frame into the device buffer ``_frame_in`` (pinned and asynchronous on
        CUDA; waits only for the previous upload before reusing the staging buffer)."""
        import torch

        src = torch.from_numpy(arr)
        if not self.cuda:
            self._frame_in.copy_(src)
            return
        if self._staging is None:
            self._staging = torch.empty(arr.shape, dtype=torch.float32, pin_memory=True)
            self._staged = torch.cuda.Event()
        else:
            self._staged.synchronize()
        self._staging.copy_(src)
        self._frame_in.copy_(self._staging, non_blocking=True)
        self._staged.record()

    def push(self, frame: Any) -> Optional[LiveFrame]:
        """Add the next frame; returns the restored centre frame of the last ``window`` frames
        once there are that many, else None."""
        t0 = time.perf_counter()
        arr = self._check_frame(frame)
        if self.stream is None:
            if min(arr.shape) < 16:
                raise InputError(f"frames must be at least 16x16 pixels; got {arr.shape}")
            self._shape = arr.shape
            self._pending.append(arr.copy())  # the caller may reuse its buffer
            self.count += 1
            if self.count < self.window:
                return None
            self._start()
        else:
            self._upload(arr)
            self.count += 1
            self.stream.count = self.count
            self.stream.set_phase(self.count)
        if self._graph is not None:
            self._graph.replay()
        elif self.use_graphs:
            self._capture()
            if self._graph is not None:
                self._graph.replay()
            else:
                self._out = self._step()
        else:
            self._out = self._step()
        return self._result(self.count - 1 - (self.window - 1 - self.window // 2), t0)

    def _start(self) -> None:
        """The first window has arrived: decide the orientation, make the registrar, ingest
        the first ``window - 1`` frames and upload the last one (its window step follows)."""
        import torch

        from ..core.registration_torch import StreamRegistrar

        first = np.stack(self._pending)
        self._pending = []
        self.orientation = stream_orientation(self.card, first, self.motion_angle)
        self._rotation = Rotation(first.shape[1:], self.orientation["rotation_deg"],
                                  self.device)
        sigma = prefilter_sigma(first[0]) if self.sigma is None else self.sigma
        self.sigma = sigma
        self.stream = StreamRegistrar(self.window, first.shape[1:], sigma=sigma,
                                      device=self.device, **self._reg_kwargs)
        self._frame_in = torch.zeros(first.shape[1:], dtype=torch.float32, device=self.device)
        for k, arr in enumerate(first, start=1):
            self._upload(arr)
            self.stream.count = k
            self.stream.set_phase(k)
            if k < self.window:
                with torch.no_grad():
                    self.stream.ingest(self._frame_in)

    def _result(self, index: int, t0: float) -> LiveFrame:
        """Copy the step's outputs out of the (possibly static) buffers."""
        out = self._out
        image, shifts = out["image"], out["translations"].flip(1)
        if self.keep_on_device:
            return LiveFrame(index, image.contiguous(), shifts.clone(), out["ecc"].clone(),
                             out["failure"] == 0, time.perf_counter() - t0)
        image = np.ascontiguousarray(image.cpu().numpy())
        return LiveFrame(index, image, shifts.cpu().numpy(), out["ecc"].cpu().numpy(),
                         out["failure"].cpu().numpy() == 0, time.perf_counter() - t0)

    def run(self, stream: Iterable[Any],
            cancel: Optional[CancelToken] = None) -> Iterator[LiveFrame]:
        """Push every frame of ``stream`` (an iterable of (Y, X) frames, e.g. a (T, Y, X)
        array) and yield each restored frame as soon as it is ready."""
        for frame in stream:
            check_cancel(cancel)
            out = self.push(frame)
            if out is not None:
                yield out


def restore_burst_device(frames: Any, model: str | ModelCard = "tem-burst", *,
                         device: str = "auto", reference: Optional[int] = None,
                         tile: int = 2048, batch: int = 4, amp: Optional[str] = "fp16",
                         motion_angle: Optional[float] = None) -> Any:
    """Restore one ``(T, Y, X)`` burst entirely on the device: torch registration, device-side
    normalisation, and tiled inference with tiles batched on the device and blended as
    :mod:`~napari_microrestore.core.tiling` does. Returns the ``(Y, X)`` float32 tensor.

    Equals :func:`engine.restore.restore` of the burst up to the registration backend and
    float rounding (tested on CPU); meant for large bursts on a GPU. ``motion_angle``: as in
    :func:`engine.restore.restore`.
    """
    import torch

    from ..core.registration_torch import register_burst_torch

    card = _burst_card(model)
    dev = resolve_device(device)
    net = _load_net(card, dev)
    reg = register_burst_torch(frames, reference, device=dev)
    x, mean, std = normalise_device(reg.aligned, reg.coverage)
    orientation = burst_orientation(card, tuple(reg.aligned.shape),
                                    _translation_transforms(reg.translations.cpu().numpy()),
                                    motion_angle, frames=frames)
    turn = Rotation(x.shape, orientation["rotation_deg"], dev)  # as engine.restore does
    x = turn.forward(x)
    h, w = x.shape[-2:]
    multiple = int(getattr(net, "multiple", 1))
    halo = int(min(math.ceil(net.receptive_radius), 256))
    blend = max(8, multiple)
    x = _pad_to(x, multiple)
    tiles = plan_tiles(x.shape[-2:], tile, halo=halo, blend=blend, multiple=multiple)
    acc = torch.zeros(x.shape[-2:], dtype=torch.float32, device=dev)
    wsum = torch.zeros_like(acc)
    cuda = dev.startswith("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp or "", torch.float16)
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=dtype,
                                         enabled=cuda and amp is not None):
        for i in range(0, len(tiles), batch):
            group = tiles[i:i + batch]
            inp = torch.stack([x[:, t.y, t.x] for t in group])[:, :, None]
            out = net(inp)[:, 0].float()
            for t, o in zip(group, out, strict=True):
                wt = torch.from_numpy(tile_weights(t, halo=halo, blend=blend)).to(dev)
                acc[t.y, t.x] += o * wt
                wsum[t.y, t.x] += wt
    return turn.inverse((acc / wsum)[:h, :w]) * std.float() + mean.float()
