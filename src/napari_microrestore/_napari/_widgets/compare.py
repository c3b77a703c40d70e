"""Compare widget: score layers against a reference, or without one, and show differences.

* With a reference layer: PSNR (dB), SSIM and PCC of every checked layer against it
  (:func:`napari_microrestore.core.metrics.compare`), optionally after the least-squares
  gain + offset fit that the zoo's evaluation uses (then the table also shows gain and
  offset); the data range is the reference's, in its units.
* Without one: the no-reference readouts of :func:`~napari_microrestore.core.metrics.
  no_reference`: noise std (image units), sharpness (1/px) and SNR.

Layers with more than two dimensions are scored on the plane the viewer shows (the current
position of the dims sliders). The metrics run in the scheduler (seconds on large images), as
does "Difference layer", which adds ``"<name> - <reference>"`` = image - reference (float32,
reference units, a diverging colormap centred on 0) for every checked layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QListWidget,
    QListWidgetItem,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...core import metrics
from ...core.errors import CancelToken, InputError, ProgressCallback, check_cancel, report
from ..scheduler import Scheduler, Task, get_scheduler
from ._common import JobPanel, LayerComboBox, connect_layer_list, is_plain_image

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image

# column headers and number formats of the metric keys
_COLUMNS = {"psnr": ("PSNR (dB)", "{:.2f}"), "ssim": ("SSIM", "{:.4f}"),
            "pcc": ("PCC", "{:.4f}"), "gain": ("gain", "{:.4g}"), "offset": ("offset", "{:.4g}"),
            "noise": ("noise (std)", "{:.4g}"), "sharpness": ("sharpness (1/px)", "{:.4g}"),
            "snr": ("SNR", "{:.3g}")}


# --------------------------------------------------------------------------------------------
# what the worker runs (pure functions over core.metrics; no Qt)
# --------------------------------------------------------------------------------------------
def score_images(images: Mapping[str, Any], reference: Any = None, *, fit: bool = True,
                 progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> dict[str, dict[str, float]]:
    """Metrics of each named 2-D image: :func:`metrics.compare` against ``reference`` (with
    the gain + offset fit if ``fit``) or :func:`metrics.no_reference` when it is ``None``."""
    scores: dict[str, dict[str, float]] = {}
    for i, (name, image) in enumerate(images.items()):
        check_cancel(cancel)
        if reference is None:
            scores[name] = metrics.no_reference(image)
        else:
            scores[name] = metrics.compare(image, reference, fit=fit)
        report(progress, (i + 1) / len(images), f"scored {name}")
    return scores


def differences(images: Mapping[str, Any], reference: Any, *,
                cancel: Optional[CancelToken] = None) -> dict[str, tuple[np.ndarray, float]]:
    """``image - reference`` (float32, reference units) of each named image, with the largest
    absolute difference (for symmetric contrast limits)."""
    ref = np.asarray(reference, np.float32)
    out: dict[str, tuple[np.ndarray, float]] = {}
    for name, image in images.items():
        check_cancel(cancel)
        img = np.asarray(image, np.float32)
        if img.shape != ref.shape:
            raise InputError(f"layer {name!r} has shape {img.shape} but the reference has "
                             f"{ref.shape}; a difference needs the same shape")
        diff = img - ref
        out[name] = (diff, float(np.abs(diff).max()))
    return out


# --------------------------------------------------------------------------------------------
# the widget
# --------------------------------------------------------------------------------------------
class CompareWidget(QWidget):
    """Reference layer (optional), layers to score, a metrics table and difference layers."""

    def __init__(self, napari_viewer: napari.Viewer, scheduler: Optional[Scheduler] = None,
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.scores: dict[str, dict[str, float]] = {}
        self.reference_combo = LayerComboBox(napari_viewer,
                                             none_text="(none: no-reference metrics)")
        self.layer_list = QListWidget()
        self.layer_list.setToolTip("Check the layers to score")
        self.fit_check = QCheckBox("fit gain + offset to the reference first")
        self.fit_check.setChecked(True)
        self.panel = JobPanel(scheduler or get_scheduler(), "Compute")
        self.panel.run_button.clicked.connect(self.run)
        self.diff_button = self.panel.add_button("Difference layer")
        self.diff_button.setToolTip("New layer(s): checked layer - reference")
        self.diff_button.clicked.connect(self.difference)
        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)

        form = QFormLayout()
        form.addRow("reference", self.reference_combo)
        form.addRow("layers", self.layer_list)
        form.addRow(self.fit_check)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.panel)
        layout.addWidget(self.table)

        connect_layer_list(napari_viewer, self._refresh_layers)
        self.reference_combo.currentIndexChanged.connect(self._update_buttons)
        self.layer_list.itemChanged.connect(self._update_buttons)
        self._refresh_layers()

    # ---- choices -------------------------------------------------------------------------
    def reference(self) -> Optional[Image]:
        return self.reference_combo.layer()

    def checked_layers(self) -> list[Image]:
        items = (self.layer_list.item(i) for i in range(self.layer_list.count()))
        return [it.data(Qt.ItemDataRole.UserRole) for it in items
                if it.checkState() == Qt.CheckState.Checked]

    def set_checked(self, layers: list[Image]) -> None:
        """Check exactly ``layers`` in the list."""
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            chosen = any(item.data(Qt.ItemDataRole.UserRole) is layer for layer in layers)
            item.setCheckState(Qt.CheckState.Checked if chosen else Qt.CheckState.Unchecked)

    def _refresh_layers(self, _event: Any = None) -> None:
        checked = self.checked_layers()
        self.layer_list.blockSignals(True)
        self.layer_list.clear()
        for layer in self.viewer.layers:
            if not is_plain_image(layer):
                continue
            item = QListWidgetItem(layer.name)
            item.setData(Qt.ItemDataRole.UserRole, layer)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            on = any(layer is c for c in checked)
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.layer_list.addItem(item)
        self.layer_list.blockSignals(False)
        self._update_buttons()

    def _update_buttons(self, *_: Any) -> None:
        targets = self._targets()
        self.panel.set_runnable(bool(targets))
        self.panel.set_runnable(bool(targets) and self.reference() is not None, self.diff_button)

    def _targets(self) -> list[Image]:
        """The checked layers other than the reference."""
        return [la for la in self.checked_layers() if la is not self.reference()]

    def _plane(self, layer: Image) -> Any:
        """The 2-D plane of ``layer`` that the viewer shows (lazy data stays lazy)."""
        if layer.ndim <= 2:
            return layer.data
        coords = layer.world_to_data(self.viewer.dims.point[-layer.ndim:])
        index = tuple(int(np.clip(round(float(c)), 0, n - 1))
                      for c, n in zip(coords[:-2], layer.data.shape[:-2]))
        return layer.data[index]

    # ---- actions -------------------------------------------------------------------------
    def run(self) -> None:
        """Score the checked layers in the scheduler and fill the table."""
        targets, ref = self._targets(), self.reference()
        if not targets:
            return
        kwargs = {"images": {la.name: self._plane(la) for la in targets},
                  "reference": None if ref is None else self._plane(ref),
                  "fit": self.fit_check.isChecked()}
        what = f"against {ref.name}" if ref is not None else "without a reference"
        self.panel.submit(Task(f"Score {len(targets)} layer(s) {what}", score_images, kwargs),
                          self._show_scores)

    def _show_scores(self, scores: dict[str, dict[str, float]]) -> None:
        self.scores = scores
        keys = [k for k in _COLUMNS if any(k in s for s in scores.values())]
        self.table.clear()
        self.table.setRowCount(len(scores))
        self.table.setColumnCount(len(keys))
        self.table.setHorizontalHeaderLabels([_COLUMNS[k][0] for k in keys])
        self.table.setVerticalHeaderLabels(list(scores))
        for row, values in enumerate(scores.values()):
            for col, key in enumerate(keys):
                text = _COLUMNS[key][1].format(values[key]) if key in values else "-"
                self.table.setItem(row, col, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    def difference(self) -> None:
        """Add ``image - reference`` layers for the checked layers (in the scheduler)."""
        targets, ref = self._targets(), self.reference()
        if not targets or ref is None:
            return
        kwargs = {"images": {la.name: la.data for la in targets}, "reference": ref.data}
        self.panel.submit(Task(f"Difference to {ref.name}", differences, kwargs),
                          lambda diffs: self._show_differences(diffs, ref))

    def _show_differences(self, diffs: dict[str, tuple[np.ndarray, float]],
                          ref: Image) -> None:
        for name, (diff, limit) in diffs.items():
            limit = limit or 1.0
            self.viewer.add_image(
                diff, name=f"{name} - {ref.name}", colormap="PiYG",
                contrast_limits=(-limit, limit), scale=ref.scale, translate=ref.translate,
                units=ref.units, axis_labels=ref.axis_labels,
                metadata={"provenance": {"operation": "difference", "image": name,
                                         "reference": ref.name}})
