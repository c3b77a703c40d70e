"""Register widget: align the frames of a burst to a reference frame (phase correlation + ECC).

The widget runs :func:`napari_microrestore.core.registration.register_burst` through the
scheduler and adds two layers, leaving the input untouched:

* ``"<name> registered"``: the aligned (T, Y, X) float32 stack, with the input's scale,
  translate and units; its ``metadata`` holds ``registration`` (``RegistrationResult.to_dict()``:
  per-frame 2x3 transforms, shifts, ECC scores, converged flags, messages) and ``provenance``
  (function, parameters, version, source layer, and the equivalent ``microrestore register``
  command);
* ``"<name> registered coverage"``: a 2-D Labels layer drawn as a contour around the pixels
  that every frame covers after warping (outside it, aligned frames repeat their edge pixels).
  A Labels layer (rather than Shapes) because the covered region of euclidean or affine motion
  is a polygon intersection that the mask gives exactly.

With "only the Stream window" (on when the Stream widget sends its window here), only the
window's frames are read and registered to its centre frame; the registered layer then starts
at the window's first frame on the frame axis (so it lines up with the stream) and its
provenance records the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QLabel, QVBoxLayout, QWidget

from ... import __version__
from ...core import registration
from ...core.errors import CancelToken, ProgressCallback
from .._geometry import BurstWindow
from ..scheduler import Scheduler, Task, get_scheduler
from ._common import (
    WINDOWS,
    FrameSpinBox,
    JobPanel,
    LayerComboBox,
    WindowRequest,
    cancel_jobs_on_quit,
    connect_while_alive,
    layer_stream,
    source_info,
    spatial_kwargs,
    unwrap,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image


def register_frames(data: Any, start: int, stop: int, reference: int, motion: str, *,
                    progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None) -> registration.RegistrationResult:
    """Register frames ``[start, stop)`` of a (T, Y, X) stream (reading only those) to their
    frame ``reference`` (counted from ``start``). Runs in the worker."""
    return registration.register_burst(data[start:stop], reference=reference, motion=motion,
                                       progress=progress, cancel=cancel)


class RegisterWidget(QWidget):
    """Pick a burst layer (frames along axis 0, or the Stream widget's window), a motion model
    and a reference frame; Run."""

    def __init__(self, napari_viewer: napari.Viewer, scheduler: Optional[Scheduler] = None,
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.layer_combo = LayerComboBox(napari_viewer)
        self.layer_combo.setToolTip("A (T, Y, X) burst: frames along the first axis")
        self.motion_combo = QComboBox()
        self.motion_combo.addItems(registration.MOTIONS)
        self.motion_combo.setToolTip("translation: shifts only; euclidean: + rotation; "
                                     "affine: + scaling and shear")
        self.reference_spin = FrameSpinBox()
        self.window_check = QCheckBox("only the Stream window")
        self.window_check.setToolTip("Register only the frames of the window chosen in the "
                                     "Stream widget, to its centre frame")
        self.window_label = QLabel("")
        self.panel = JobPanel(scheduler or get_scheduler(), "Register")
        self.panel.run_button.clicked.connect(self.run)

        form = QFormLayout()
        form.addRow("burst", self.layer_combo)
        form.addRow("motion", self.motion_combo)
        form.addRow("reference frame", self.reference_spin)
        form.addRow(self.window_check, self.window_label)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.panel)
        layout.addStretch(1)

        self.layer_combo.currentIndexChanged.connect(self._layer_changed)
        self.window_check.toggled.connect(self._window_changed)
        connect_while_alive(self, WINDOWS.changed, self._on_window_changed)
        connect_while_alive(self, WINDOWS.sent, self._on_window_sent)
        cancel_jobs_on_quit(self.panel.scheduler)
        self._layer_changed()

    def window(self) -> Optional[BurstWindow]:
        """The Stream widget's window of the chosen layer, when "only the Stream window" is on
        (else ``None``: every frame along axis 0)."""
        if not self.window_check.isChecked():
            return None
        return WINDOWS.get(self.layer_combo.layer())

    def _layer_changed(self, _index: int = 0) -> None:
        layer = self.layer_combo.layer()
        self.panel.set_runnable(layer is not None)
        if layer is not None:
            self.reference_spin.set_frames(layer.data.shape[0] if layer.ndim == 3 else 1)
        self._window_changed()

    def _window_changed(self, _on: bool = False) -> None:
        known = WINDOWS.get(self.layer_combo.layer())
        self.window_check.setEnabled(known is not None)
        self.window_label.setText(known.describe() if known is not None else "no window")
        self.reference_spin.setEnabled(self.window() is None)

    def _on_window_changed(self, layer: Any) -> None:
        if layer is unwrap(self.layer_combo.layer()):
            self._window_changed()

    def _on_window_sent(self, request: WindowRequest) -> None:
        if request.target != "register" or request.viewer is not unwrap(self.viewer):
            return
        request.accepted = True
        self.layer_combo.set_layer(request.layer)
        self.window_check.setChecked(True)
        self._window_changed()

    def run(self) -> None:
        """Register the chosen layer in the scheduler; the result arrives in new layers."""
        layer = self.layer_combo.layer()
        if layer is None:
            return
        motion = self.motion_combo.currentText()
        window = self.window()
        if window is None:
            reference = self.reference_spin.reference()
            task = Task(f"Register {layer.name}", registration.register_burst,
                        {"frames": layer.data, "reference": reference, "motion": motion})
            parameters: dict[str, Any] = {"reference": reference, "motion": motion}
        else:
            reference = window.local_reference
            task = Task(f"Register {layer.name} {window.describe()}", register_frames,
                        {"data": layer_stream(self.viewer, layer, window.axis),
                         "start": window.start, "stop": window.stop, "reference": reference,
                         "motion": motion})
            parameters = {"reference": reference, "motion": motion,
                          "window": {**window.to_dict(), "frames": window.frames}}
        command = f"microrestore register IN -o OUT --motion {motion}"
        if reference is not None:
            command += f" --reference {reference}"
        provenance = {
            "operation": "register",
            "function": "napari_microrestore.core.registration.register_burst",
            "parameters": parameters,
            "command": command,
            "version": __version__,
            "source": source_info(layer),
        }
        self.panel.submit(task, lambda reg: self._show(layer, reg, provenance, window))

    def _show(self, source: Image, reg: registration.RegistrationResult,
              provenance: dict[str, Any], window: Optional[BurstWindow]) -> None:
        provenance = {**provenance, "seconds": round(self.panel.job.seconds, 3)}
        name = f"{source.name} registered"
        axes = [0 if window is None else window.axis, source.ndim - 2, source.ndim - 1]
        placed = spatial_kwargs(source, 3, axes=axes)
        if window is not None:   # the window's first frame sits where it is in the stream
            placed["translate"][0] += window.start * placed["scale"][0]
        self.viewer.add_image(
            reg.aligned, name=name, colormap=source.colormap.name,
            metadata={"registration": reg.to_dict(), "provenance": provenance}, **placed)
        coverage = self.viewer.add_labels(
            reg.coverage.astype(np.uint8), name=f"{name} coverage",
            metadata={"provenance": provenance}, **spatial_kwargs(source, 2))
        coverage.contour = 2
