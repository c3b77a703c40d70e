"""Stream widget: choose the burst window of a frame stream for the Register and Restore widgets.

A stream is an Image layer with at least three dimensions whose frames run along one of its
leading axes (axis 0 for a (T, Y, X) stack; any non-spatial axis of a 4-D+ layer, the other
leading axes then held at the viewer's current position). The window is ``size`` consecutive
frames around a centre frame (the registration reference), shifted to stay inside the stream
at its ends exactly as the engine picks a burst's frames; the label says which frames it
uses, e.g. "frames 12-16 (centre 14) of 100".

The chosen window lives in :data:`~napari_microrestore._napari._widgets._common.WINDOWS`
beside its layer (the input layer is not modified); the Register and Restore widgets follow
it, and "To Register" / "To Restore" hand them the layer and its window (opening their dock
widgets if needed). With "follow the frame slider" on, the centre follows the viewer's
slider on the frame axis. Nothing here computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .._geometry import BurstWindow
from ..scheduler import Scheduler, get_scheduler
from ._common import (
    WINDOWS,
    LayerComboBox,
    Settings,
    cancel_jobs_on_quit,
    connect_while_alive,
    current_indices,
    frame_axes,
    is_plain_image,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Layer

DEFAULT_SIZE = 5


def is_stream(layer: Layer) -> bool:
    """A plain Image layer with at least one axis besides Y and X."""
    return is_plain_image(layer) and layer.ndim >= 3


class StreamWidget(QWidget):
    """Stream layer, frame axis, centre frame (optionally following the slider), number of
    frames; the frames used; buttons that send the window to the Register / Restore widgets.

    ``scheduler`` is the one whose jobs are cancelled when the viewer closes (the widget
    itself runs none).
    """

    def __init__(self, napari_viewer: napari.Viewer, scheduler: Optional[Scheduler] = None,
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.settings = Settings("stream")
        self.layer_combo = LayerComboBox(napari_viewer, accept=is_stream)
        self.layer_combo.setToolTip("An image stack whose frames run along one of its axes")
        self.axis_combo = QComboBox()
        self.axis_combo.setToolTip("The axis of the layer along which the frames run")
        self.centre_spin = QSpinBox()
        self.centre_spin.setToolTip("The burst's centre frame: the registration reference and "
                                    "the frame whose restoration you get")
        self.follow_check = QCheckBox("follow the frame slider")
        self.follow_check.setChecked(self.settings.get("follow", True))
        self.size_spin = QSpinBox()
        self.size_spin.setMinimum(1)
        self.size_spin.setMaximum(1)
        self.size_spin.setToolTip("Frames per burst; near the stream's ends the window is "
                                  "shifted to stay inside the stream")
        self.frames_label = QLabel("no stream")
        self.frames_label.setWordWrap(True)
        self.register_button = QPushButton("To Register")
        self.restore_button = QPushButton("To Restore")
        for button in (self.register_button, self.restore_button):
            button.setToolTip("Open that widget on this stream with this window")

        form = QFormLayout()
        form.addRow("stream", self.layer_combo)
        form.addRow("frame axis", self.axis_combo)
        form.addRow("centre frame", self.centre_spin)
        form.addRow(self.follow_check)
        form.addRow("frames", self.size_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.register_button)
        buttons.addWidget(self.restore_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.frames_label)
        layout.addLayout(buttons)
        layout.addStretch(1)

        self.layer_combo.currentIndexChanged.connect(self._layer_changed)
        self.axis_combo.currentIndexChanged.connect(self._axis_changed)
        self.centre_spin.valueChanged.connect(self._update)
        self.size_spin.valueChanged.connect(self._size_changed)
        self.follow_check.toggled.connect(self._follow_toggled)
        connect_while_alive(self, self.viewer.dims.events.current_step, self._on_step)
        self.register_button.clicked.connect(lambda: self.send("register"))
        self.restore_button.clicked.connect(lambda: self.send("restore"))
        cancel_jobs_on_quit(scheduler or get_scheduler())
        self._layer_changed()

    # ---- the window ----------------------------------------------------------------------
    def layer(self) -> Optional[Layer]:
        return self.layer_combo.layer()

    def axis(self) -> int:
        return int(self.axis_combo.currentData() or 0)

    def window(self) -> Optional[BurstWindow]:
        """The window the widget shows, or ``None`` without a stream layer."""
        layer = self.layer()
        if layer is None:
            return None
        n = int(layer.data.shape[self.axis()])
        return BurstWindow(n, min(self.centre_spin.value(), n - 1),
                           min(self.size_spin.value(), n), self.axis())

    def send(self, target: str) -> None:
        """Hand the stream and its window to the ``"register"`` or ``"restore"`` widget."""
        layer = self.layer()
        if layer is not None:
            WINDOWS.send(self.viewer, layer, target)

    # ---- reactions -----------------------------------------------------------------------
    def _layer_changed(self, _index: int = 0) -> None:
        layer = self.layer()
        self.axis_combo.blockSignals(True)
        self.axis_combo.clear()
        if layer is not None:
            labels = list(layer.axis_labels)
            for axis in frame_axes(layer):
                self.axis_combo.addItem(f"{axis} ({labels[axis]})", axis)
            known = WINDOWS.get(layer)
            self.axis_combo.setCurrentIndex(known.axis if known is not None else 0)
        self.axis_combo.setEnabled(self.axis_combo.count() > 1)
        self.axis_combo.blockSignals(False)
        for button in (self.register_button, self.restore_button):
            button.setEnabled(layer is not None)
        self._axis_changed()

    def _axis_changed(self, _index: int = 0) -> None:
        layer = self.layer()
        if layer is None:
            self.frames_label.setText("no stream: add an image stack")
            return
        n = int(layer.data.shape[self.axis()])
        known = WINDOWS.get(layer)
        for spin in (self.centre_spin, self.size_spin):
            spin.blockSignals(True)
        self.centre_spin.setMaximum(n - 1)
        self.size_spin.setMaximum(n)
        if known is not None and known.axis == self.axis():
            self.centre_spin.setValue(known.centre)
            self.size_spin.setValue(known.size)
        else:
            self.centre_spin.setValue(self._slider_frame() if self.follow_check.isChecked()
                                      else n // 2)
            self.size_spin.setValue(min(self.settings.get("size", DEFAULT_SIZE), n))
        for spin in (self.centre_spin, self.size_spin):
            spin.blockSignals(False)
        self._update()

    def _size_changed(self, size: int) -> None:
        self.settings.set("size", size)
        self._update()

    def _follow_toggled(self, on: bool) -> None:
        self.settings.set("follow", on)
        if on:
            self._on_step()

    def _slider_frame(self) -> int:
        layer = self.layer()
        return current_indices(self.viewer, layer)[self.axis()] if layer is not None else 0

    def _on_step(self, _event: Any = None) -> None:
        if self.follow_check.isChecked() and self.layer() is not None:
            self.centre_spin.setValue(self._slider_frame())

    def _update(self, _value: int = 0) -> None:
        window = self.window()
        if window is None:
            return
        self.frames_label.setText(f"{window.describe()} of {window.n_frames}")
        WINDOWS.set(self.layer(), window)
