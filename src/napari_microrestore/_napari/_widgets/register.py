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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from qtpy.QtWidgets import QComboBox, QFormLayout, QVBoxLayout, QWidget

from ... import __version__
from ...core import registration
from ..scheduler import Scheduler, Task, get_scheduler
from ._common import FrameSpinBox, JobPanel, LayerComboBox, source_info, spatial_kwargs

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image


class RegisterWidget(QWidget):
    """Pick a burst layer (frames along axis 0), a motion model and a reference frame; Run."""

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
        self.panel = JobPanel(scheduler or get_scheduler(), "Register")
        self.panel.run_button.clicked.connect(self.run)

        form = QFormLayout()
        form.addRow("burst", self.layer_combo)
        form.addRow("motion", self.motion_combo)
        form.addRow("reference frame", self.reference_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.panel)
        layout.addStretch(1)

        self.layer_combo.currentIndexChanged.connect(self._layer_changed)
        self._layer_changed()

    def _layer_changed(self, _index: int = 0) -> None:
        layer = self.layer_combo.layer()
        self.panel.set_runnable(layer is not None)
        if layer is not None:
            self.reference_spin.set_frames(layer.data.shape[0] if layer.ndim == 3 else 1)

    def run(self) -> None:
        """Register the chosen layer in the scheduler; the result arrives in new layers."""
        layer = self.layer_combo.layer()
        if layer is None:
            return
        reference = self.reference_spin.reference()
        motion = self.motion_combo.currentText()
        task = Task(f"Register {layer.name}", registration.register_burst,
                    {"frames": layer.data, "reference": reference, "motion": motion})
        command = f"microrestore register IN -o OUT --motion {motion}"
        if reference is not None:
            command += f" --reference {reference}"
        provenance = {
            "operation": "register",
            "function": "napari_microrestore.core.registration.register_burst",
            "parameters": {"reference": reference, "motion": motion},
            "command": command,
            "version": __version__,
            "source": source_info(layer),
        }
        self.panel.submit(task, lambda reg: self._show(layer, reg, provenance))

    def _show(self, source: Image, reg: registration.RegistrationResult,
              provenance: dict[str, Any]) -> None:
        provenance = {**provenance, "seconds": round(self.panel.job.seconds, 3)}
        name = f"{source.name} registered"
        self.viewer.add_image(
            reg.aligned, name=name, colormap=source.colormap.name,
            metadata={"registration": reg.to_dict(), "provenance": provenance},
            **spatial_kwargs(source, 3))
        coverage = self.viewer.add_labels(
            reg.coverage.astype(np.uint8), name=f"{name} coverage",
            metadata={"provenance": provenance}, **spatial_kwargs(source, 2))
        coverage.contour = 2
