"""Pieces the widgets share: a layer picker, a Run / Cancel / progress panel, layer geometry,
the burst windows that the Stream widget chooses, persisted choices, and the viewer-close hook.

Nothing here computes: the panel hands :class:`~napari_microrestore._napari.scheduler.Task` s
to the scheduler and shows what comes back.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

from napari.layers import Image, Layer
from psygnal import Signal
from qtpy.QtCore import QSettings, Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...models.zoo import ModelCard, list_cards
from .._geometry import BurstWindow, nearest_index, stream_view
from ..scheduler import Job, Progress, Scheduler, Task

if TYPE_CHECKING:  # pragma: no cover
    import napari

# the layer-list events after which a picker must list the layers again
_LAYER_LIST_EVENTS = ("inserted", "removed", "moved", "reordered", "renamed")


def unwrap(obj: Any) -> Any:
    """The object behind napari's ``PublicOnlyProxy`` (plugin widgets made by napari get a
    proxied viewer, whose layers come back as new proxies on every access), so that layers
    and viewers can be compared with ``is`` and used as keys."""
    return getattr(obj, "__wrapped__", obj)


def is_plain_image(layer: Layer) -> bool:
    """An Image layer the compute side takes as is: not RGB, not multiscale."""
    return isinstance(layer, Image) and not layer.rgb and not layer.multiscale


def connect_layer_list(viewer: napari.Viewer, callback: Callable[[Any], None]) -> None:
    """Call ``callback(event)`` whenever layers are added, removed, moved or renamed."""
    for name in _LAYER_LIST_EVENTS:
        getattr(viewer.layers.events, name).connect(callback)


class LayerComboBox(QComboBox):
    """The viewer's layers that pass ``accept``, kept in sync with the layer list.

    ``none_text`` adds a first entry meaning "no layer" (``layer()`` is then ``None``).
    The chosen layer stays chosen across renames and other layers coming and going.
    """

    def __init__(self, viewer: napari.Viewer, *,
                 accept: Callable[[Layer], bool] = is_plain_image,
                 none_text: Optional[str] = None, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self._accept = accept
        self._none_text = none_text
        connect_layer_list(viewer, self.refresh)
        self.refresh()

    def layer(self) -> Optional[Layer]:
        return self.currentData()

    def set_layer(self, layer: Optional[Layer]) -> None:
        """Choose ``layer`` (or the "no layer" entry for ``None``)."""
        for i in range(self.count()):
            if unwrap(self.itemData(i)) is unwrap(layer):
                self.setCurrentIndex(i)
                return
        raise ValueError(f"layer {getattr(layer, 'name', layer)!r} is not offered here")

    def refresh(self, _event: Any = None) -> None:
        current = self.layer()
        self.blockSignals(True)
        self.clear()
        if self._none_text is not None:
            self.addItem(self._none_text, None)
        for layer in self._viewer.layers:
            if self._accept(layer):
                self.addItem(layer.name, layer)
        index = next((i for i in range(self.count()) if self.itemData(i) is current), -1)
        self.blockSignals(False)
        # newly added layers are usually what the user wants next: default to the last one
        self.setCurrentIndex(index if index >= 0 else self.count() - 1)
        if index < 0:
            self.currentIndexChanged.emit(self.currentIndex())


def card_text(card: ModelCard) -> str:
    """Plain-text description of a model card: task, inputs, training data, metrics."""
    row = card.summary()
    lines = [card.title or card.id,
             f"id: {card.id} ({'shipped' if card.source == 'zoo' else 'your model'})",
             f"task: {card.task}", f"inputs: {row['inputs']}, scale {row['scale']}x",
             f"training data: {row['training data']}"]
    licence = card.training.get("licence")
    if licence:
        lines.append(f"licence: {licence}")
    lines.append(f"metrics: {row['metrics']}")
    if isinstance(card.metrics, dict) and card.metrics.get("command"):
        lines.append(f"measured with: {card.metrics['command']}")
    if card.description:
        lines.append("")
        lines.append(" ".join(card.description.split()))
    return "\n".join(lines)


class ModelComboBox(QComboBox):
    """The model cards of the zoo and the user's folder that pass ``accept``, each with its
    card text (task, training data, metrics) as tooltip."""

    def __init__(self, accept: Callable[[ModelCard], bool] = lambda card: True, *,
                 prefer: Optional[str] = None, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self._accept = accept
        self._prefer = prefer

    def card(self) -> Optional[ModelCard]:
        return self.currentData()

    def refresh(self) -> None:
        """List the cards again, keeping the chosen model if it is still there (else the
        preferred one, else the first). No signal is emitted: callers update themselves."""
        current = self.card()
        self.blockSignals(True)
        self.clear()
        for card in list_cards():
            if self._accept(card):
                self.addItem(f"{card.id}  [{card.task}]", card)
                self.setItemData(self.count() - 1, card_text(card), Qt.ItemDataRole.ToolTipRole)
        ids = [self.itemData(i).id for i in range(self.count())]
        for wanted in (current.id if current else None, self._prefer):
            if wanted in ids:
                self.setCurrentIndex(ids.index(wanted))
                break
        else:
            self.setCurrentIndex(0 if ids else -1)
        self.blockSignals(False)

    def set_model(self, model_id: str) -> None:
        """Choose the model with this id."""
        for i in range(self.count()):
            if self.itemData(i).id == model_id:
                self.setCurrentIndex(i)
                return
        raise ValueError(f"model {model_id!r} is not listed")


class DeviceComboBox(QComboBox):
    """``auto`` and ``cpu`` until :meth:`set_devices` gets the full list, which
    :func:`~napari_microrestore._napari.scheduler.available_devices` makes in the scheduler
    (it imports torch, which the GUI thread never does)."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.addItems(["auto", "cpu"])
        self.setToolTip("auto: CUDA if present, else Apple MPS, else CPU")

    def set_devices(self, devices: list[str], wanted: Optional[str] = None) -> None:
        """Offer ``devices``, choosing ``wanted`` if listed, else the current choice if
        listed, else ``auto`` (without emitting signals)."""
        current = self.currentText()
        choice = next((d for d in (wanted, current) if d in devices), "auto")
        self.blockSignals(True)
        self.clear()
        self.addItems(devices)
        self.setCurrentText(choice)
        self.blockSignals(False)


class FrameSpinBox(QSpinBox):
    """A frame index in ``[0, T - 1]``, or "middle" (``value() == -1``) for ``T // 2``."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setMinimum(-1)
        self.setSpecialValueText("middle")
        self.setValue(-1)
        self.setToolTip("Reference frame index; 'middle' is T // 2")

    def reference(self) -> Optional[int]:
        """The chosen frame, or ``None`` for the middle one (the engine's default)."""
        return None if self.value() < 0 else self.value()

    def set_frames(self, n_frames: int) -> None:
        """Limit the choice to the frames of a stack of ``n_frames``."""
        self.setMaximum(max(n_frames - 1, 0))


class _Lifetime:
    """Whether a panel's Qt widget still exists, and its job, which is cancelled when the
    widget goes. It holds no reference to the widget, so connecting it to the widget's
    ``destroyed`` signal keeps nothing alive."""

    def __init__(self) -> None:
        self.alive = True
        self.job: Optional[Job] = None

    def end(self, *_: Any) -> None:
        self.alive = False
        if self.job is not None:
            self.job.cancel(quiet=True)


class JobPanel(QWidget):
    """A Run button, a Cancel button, a progress bar and a status line for one widget.

    :meth:`submit` runs a task through the scheduler; while it runs, Run (and the buttons of
    :meth:`add_button`) are disabled and Cancel enabled, the bar follows the task's progress
    reports and the status line shows their messages; at the end, the status line says how
    it ended. Progress is drawn at most every :attr:`PROGRESS_INTERVAL` seconds (the latest
    report wins; the end is drawn at once): a repaint of napari's window is composed through
    OpenGL, which on a software renderer (llvmpipe: Xvfb, remote desktops, VMs) takes CPU
    from the computation (measured on 2 cores: 7 progress repaints added ~0.13 s to a 1.2 s
    restore). When the panel is destroyed (its dock widget deleted, the viewer closed), its
    job is cancelled and no callback touches the widgets any more.
    """

    #: seconds between two drawn progress reports
    PROGRESS_INTERVAL = 0.25

    def __init__(self, scheduler: Scheduler, run_text: str,
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.scheduler = scheduler
        self._life = _Lifetime()
        self.destroyed.connect(self._life.end)
        self._buttons = QHBoxLayout()
        self._runnable: dict[QPushButton, bool] = {}
        self.run_button = self.add_button(run_text)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self._pending: Optional[Progress] = None
        self._drawn_at = -math.inf
        self._progress_timer = QTimer(self)
        self._progress_timer.setSingleShot(True)
        self._progress_timer.timeout.connect(self._draw_pending)
        row = QHBoxLayout()
        row.addLayout(self._buttons)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)

    @property
    def job(self) -> Optional[Job]:
        """The last job submitted here."""
        return self._life.job

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.done

    def add_button(self, text: str) -> QPushButton:
        """Another button that starts jobs, beside Run (disabled while a job runs)."""
        button = QPushButton(text)
        self._buttons.addWidget(button)
        self._runnable[button] = True
        return button

    def set_runnable(self, runnable: bool, button: Optional[QPushButton] = None) -> None:
        """Whether ``button`` (default: Run) may be clicked when no job runs, e.g. False
        while the widget lacks an input layer."""
        self._runnable[button or self.run_button] = runnable
        self._sync_buttons()

    def _sync_buttons(self) -> None:
        for button, runnable in self._runnable.items():
            button.setEnabled(runnable and not self.running)

    def submit(self, task: Task, on_result: Callable[[Any], None], *,
               group: Optional[str] = None,
               on_update: Optional[Callable[[Any], None]] = None,
               on_done: Optional[Callable[[Job], None]] = None) -> Job:
        """Run ``task``; ``on_result(value)`` gets what it returned, ``on_update(obj)`` every
        typed update it sent that is not a :class:`Progress` (those drive the bar), and
        ``on_done(job)`` runs last whatever the outcome (after the panel reset itself)."""
        self._drop_pending()
        self.progress_bar.setValue(0)
        self.status.setText(f"{task.name}...")
        self._drawn_at = time.monotonic()
        self.cancel_button.setEnabled(True)
        self._life.job = self.scheduler.submit(
            task, on_update=self.guard(partial(self._on_update, on_update)),
            on_result=self.guard(on_result),
            on_done=self.guard(partial(self._on_done, on_done)), group=group)
        self._sync_buttons()
        return self._life.job

    def guard(self, callback: Callable[..., None]) -> Callable[..., None]:
        """``callback`` made to do nothing once this panel's widget is destroyed (for
        scheduler callbacks that touch widgets)."""
        life = self._life

        def call(*args: Any) -> None:
            if life.alive:
                callback(*args)

        return call

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()
            self._drop_pending()  # a report still waiting to be drawn is stale now
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling...")

    def _on_update(self, typed: Optional[Callable[[Any], None]], update: Any) -> None:
        if not isinstance(update, Progress):
            if typed is not None:
                typed(update)
            return
        self._pending = update
        wait = self._drawn_at + self.PROGRESS_INTERVAL - time.monotonic()
        if wait <= 0:
            self._draw_pending()
        elif not self._progress_timer.isActive():
            self._progress_timer.start(max(1, math.ceil(1000 * wait)))

    def _draw_pending(self) -> None:
        update, self._pending = self._pending, None
        if update is None or not self.running:
            return
        self._drawn_at = time.monotonic()
        self.progress_bar.setValue(round(1000 * update.fraction))
        if update.message:
            self.status.setText(update.message)

    def _drop_pending(self) -> None:
        self._pending = None
        self._progress_timer.stop()
        self._drawn_at = -math.inf

    def _on_done(self, then: Optional[Callable[[Job], None]], job: Job) -> None:
        if job is self.job:
            self._drop_pending()
            self.cancel_button.setEnabled(False)
            self._sync_buttons()
            if job.state == "done":
                self.progress_bar.setValue(1000)
                self.status.setText(f"done in {job.seconds:.1f} s")
            else:
                self.progress_bar.setValue(0)
                self.status.setText(job.state)
        if then is not None:
            then(job)


def spatial_kwargs(layer: Layer, ndim: int, zoom: int = 1,
                   axes: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """``scale``, ``translate``, ``units`` and ``axis_labels`` for a new layer whose ``ndim``
    axes are the last ``ndim`` axes of ``layer`` (or its ``axes``, e.g. a stream's frame axis
    then Y and X), with ``zoom`` times more pixels in Y and X (pixel size divided by ``zoom``;
    the grid shifted so the new pixels tile the old ones).
    """
    axes = list(range(layer.ndim))[-ndim:] if axes is None else [int(a) for a in axes]
    scale = [float(layer.scale[a]) for a in axes]
    translate = [float(layer.translate[a]) for a in axes]
    for ax in (-2, -1):
        # input pixel centres sit on integers; its first output pixel's centre is at
        # -1/2 + 1/(2 zoom) input pixels
        translate[ax] += (-0.5 + 0.5 / zoom) * scale[ax]
        scale[ax] /= zoom
    return {"scale": scale, "translate": translate,
            "units": tuple(layer.units[a] for a in axes),
            "axis_labels": tuple(layer.axis_labels[a] for a in axes)}


def source_info(layer: Layer) -> dict[str, Any]:
    """JSON-safe description of an input layer for the provenance of what is made from it."""
    return {"layer": layer.name, "shape": [int(n) for n in layer.data.shape],
            "dtype": str(layer.data.dtype),
            "source_path": layer.metadata.get("source_path")}


# --------------------------------------------------------------------------------------------
# positions and streams
# --------------------------------------------------------------------------------------------
def current_indices(viewer: napari.Viewer, layer: Layer) -> list[int]:
    """The data index of ``layer`` on every axis at the viewer's current dims position."""
    position = layer.world_to_data(viewer.dims.point)
    return [nearest_index(p, n) for p, n in zip(position, layer.data.shape)]


def frame_axes(layer: Layer) -> list[int]:
    """The axes of ``layer`` that can hold a stream's frames: all but Y and X."""
    return list(range(max(layer.ndim - 2, 0)))


def layer_stream(viewer: napari.Viewer, layer: Layer, axis: int = 0) -> Any:
    """``layer.data`` as (T, Y, X) frames along ``axis``, every other leading axis at the
    viewer's current position: the data itself for a 3-D stream along axis 0, else a lazy view
    (nothing is read or copied here)."""
    return stream_view(layer.data, axis, current_indices(viewer, layer)[:-2])


# --------------------------------------------------------------------------------------------
# burst windows shared by the Stream, Register and Restore widgets
# --------------------------------------------------------------------------------------------
@dataclass
class WindowRequest:
    """The Stream widget asks the ``target`` widget ("register" or "restore") of ``viewer`` to
    work on ``layer`` with its burst window; a widget that takes it sets ``accepted``.
    ``viewer`` and ``layer`` are never proxies (see :func:`unwrap`)."""

    viewer: Any
    layer: Layer
    target: str
    accepted: bool = False


class WindowHub:
    """Where the Stream widget keeps the burst window of each stream layer, and tells the
    other widgets about it (psygnal signals, emitted on the GUI thread).

    Windows are kept beside the layers (weakly, so a removed layer takes its window with it)
    rather than in ``layer.metadata``, so that choosing a window never modifies an input layer.
    """

    changed = Signal(object)   # the layer (never a proxy) whose window changed
    sent = Signal(object)      # a WindowRequest

    def __init__(self) -> None:
        self._windows: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, layer: Optional[Layer]) -> Optional[BurstWindow]:
        """The window chosen for ``layer``, or ``None`` (none chosen, or the layer's shape
        changed since)."""
        window = self._windows.get(unwrap(layer)) if layer is not None else None
        if window is None:
            return None
        shape = layer.data.shape
        if not (window.axis < len(shape) - 2 and shape[window.axis] == window.n_frames):
            return None
        return window

    def set(self, layer: Layer, window: Optional[BurstWindow]) -> None:
        """Choose ``window`` for ``layer`` (``None`` forgets it) and say so."""
        layer = unwrap(layer)
        if window is None:
            self._windows.pop(layer, None)
        else:
            self._windows[layer] = window
        self.changed.emit(layer)

    def send(self, viewer: napari.Viewer, layer: Layer, target: str) -> None:
        """Ask the ``target`` widget of ``viewer`` to take ``layer`` and its window, opening
        that dock widget first if it is not open."""
        request = WindowRequest(unwrap(viewer), unwrap(layer), target)
        self.sent.emit(request)
        if not request.accepted:
            viewer.window.add_plugin_dock_widget("napari-microrestore", target.capitalize())
            self.sent.emit(request)


WINDOWS = WindowHub()


def connect_while_alive(widget: QWidget, signal: Any, callback: Callable[..., Any]) -> None:
    """Connect ``signal`` of a longer-lived object (a psygnal signal, or a napari event such
    as ``viewer.dims.events.current_step``) to ``callback`` until ``widget`` is destroyed, so
    that a closed widget is never called."""
    signal.connect(callback)
    widget.destroyed.connect(partial(_disconnect, signal, callback))


def _disconnect(signal: Any, callback: Callable[..., Any], *_: Any) -> None:
    signal.disconnect(callback)   # both kinds ignore a callback that is not connected


# --------------------------------------------------------------------------------------------
# persisted choices
# --------------------------------------------------------------------------------------------
class Settings:
    """A widget's choices kept between sessions (an INI file in the user's configuration
    folder, via ``QSettings("napari-microrestore", name)``).

    Reading tolerates stale or foreign values: a value that does not convert to the default's
    type comes back as the default.
    """

    def __init__(self, name: str) -> None:
        self._q = QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope,
                            "napari-microrestore", name)

    def get(self, key: str, default: Any) -> Any:
        value = self._q.value(key)
        if value is None:
            return default
        try:
            if isinstance(default, bool):
                text = str(value).strip().lower()
                if text not in ("true", "false", "1", "0"):
                    return default
                return text in ("true", "1")
            return type(default)(value)
        except (TypeError, ValueError):
            return default

    def set(self, key: str, value: Any) -> None:
        self._q.setValue(key, value)


# --------------------------------------------------------------------------------------------
# closing
# --------------------------------------------------------------------------------------------
def cancel_jobs_on_quit(scheduler: Scheduler) -> None:
    """Cancel ``scheduler``'s jobs when the application quits (connected once).

    Closing a viewer destroys its dock widgets, and each widget cancels the jobs it started
    when it is destroyed (:class:`JobPanel`; the Restore widget's live job): no private
    napari window attribute is needed for that.
    """
    app = QApplication.instance()
    if app is None or app.property(_QUIT_KEY.format(id(scheduler))):
        return
    app.setProperty(_QUIT_KEY.format(id(scheduler)), True)
    app.aboutToQuit.connect(scheduler.cancel_all)


_QUIT_KEY = "microrestore_cancel_{:x}"
