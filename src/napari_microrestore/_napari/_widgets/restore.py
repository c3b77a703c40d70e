"""Restore widget: run any model of the zoo on a layer, on the device of the user's choice.

The widget builds an :func:`napari_microrestore.engine.restore.restore` call (model card,
device, reference frame, register) and hands it to the scheduler; it never imports torch (the
device list comes from :func:`~napari_microrestore._napari.scheduler.available_devices`, run
in the scheduler too). The result is a new Image layer ``"<name> restored (<model id>)"`` with
the input's pixel size and units (divided by the model's scale for 2x super-resolution) and
the engine's provenance (model, weights sha256, parameters, device, version, registration) in
``metadata["provenance"]``; the input layer is never modified.

"Side by side" moves the output layer right by the input's width (plus a 5 % gap) and back
when clicked again, rather than switching the viewer to grid mode: grid mode would tile every
layer of the viewer (coverage masks, other results) into its own cell, while the translation
puts exactly the two images next to each other on one canvas with one camera. The shift is
recorded in ``metadata["side_by_side_offset"]`` while it is on, since it changes the layer's
world coordinates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ...engine import restore as engine
from ...models.zoo import ModelCard, list_cards
from ..scheduler import Scheduler, Task, available_devices, get_scheduler
from ._common import FrameSpinBox, JobPanel, LayerComboBox, spatial_kwargs

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image


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


class RestoreWidget(QWidget):
    """Model picker (with each card's task, training data and metrics), device, input layer,
    reference frame; Run / Cancel with a progress bar; "side by side"."""

    def __init__(self, napari_viewer: napari.Viewer, scheduler: Optional[Scheduler] = None,
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.scheduler = scheduler or get_scheduler()
        self.model_combo = QComboBox()
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("List the models again (e.g. one you just fine-tuned)")
        self.refresh_button.clicked.connect(self.refresh_models)
        self.card_view = QTextBrowser()
        self.card_view.setMaximumHeight(160)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu"])
        self.device_combo.setToolTip("auto: CUDA if present, else Apple MPS, else CPU")
        self.layer_combo = LayerComboBox(napari_viewer)
        self.reference_spin = FrameSpinBox()
        self.register_check = QCheckBox("register frames first")
        self.register_check.setChecked(True)
        self.panel = JobPanel(self.scheduler, "Restore")
        self.panel.run_button.clicked.connect(self.run)
        self.device_label = QLabel("ran on: -")
        self.side_button = QPushButton("Side by side")
        self.side_button.setCheckable(True)
        self.side_button.setEnabled(False)
        self.side_button.toggled.connect(self._side_by_side)
        self._pair: Optional[tuple[Image, Image]] = None

        models = QHBoxLayout()
        models.addWidget(self.model_combo, 1)
        models.addWidget(self.refresh_button)
        form = QFormLayout()
        form.addRow("model", models)
        form.addRow(self.card_view)
        form.addRow("device", self.device_combo)
        form.addRow("input", self.layer_combo)
        form.addRow("reference frame", self.reference_spin)
        form.addRow(self.register_check)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.panel)
        layout.addWidget(self.device_label)
        layout.addWidget(self.side_button)
        layout.addStretch(1)

        self.model_combo.currentIndexChanged.connect(self._model_changed)
        self.layer_combo.currentIndexChanged.connect(self._layer_changed)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self.refresh_models()
        self._layer_changed()
        self.device_job = self.scheduler.submit(Task("List devices", available_devices),
                                                on_result=self.panel.guard(self._set_devices))

    # ---- choices -------------------------------------------------------------------------
    def card(self) -> Optional[ModelCard]:
        return self.model_combo.currentData()

    def refresh_models(self) -> None:
        """List the zoo's and the user's model cards (keeping the chosen model if it is
        still there)."""
        current = self.card()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for card in list_cards():
            self.model_combo.addItem(f"{card.id}  [{card.task}]", card)
            self.model_combo.setItemData(self.model_combo.count() - 1, card_text(card),
                                         Qt.ItemDataRole.ToolTipRole)
        ids = [self.model_combo.itemData(i).id for i in range(self.model_combo.count())]
        self.model_combo.setCurrentIndex(ids.index(current.id) if current and current.id in ids
                                         else 0)
        self.model_combo.blockSignals(False)
        self._model_changed()

    def set_model(self, model_id: str) -> None:
        """Choose the model with this id."""
        for i in range(self.model_combo.count()):
            if self.model_combo.itemData(i).id == model_id:
                self.model_combo.setCurrentIndex(i)
                return
        raise ValueError(f"model {model_id!r} is not listed")

    def _set_devices(self, devices: list[str]) -> None:
        current = self.device_combo.currentText()
        self.device_combo.clear()
        self.device_combo.addItems(devices)
        self.device_combo.setCurrentText(current if current in devices else "auto")

    def _model_changed(self, _index: int = 0) -> None:
        card = self.card()
        self.card_view.setPlainText(card_text(card) if card else "no models found")
        burst = bool(card and card.is_burst)
        self.reference_spin.setEnabled(burst)
        self.register_check.setEnabled(burst)
        if card is not None:
            self.register_check.setChecked(bool(card.input.get("register", True)))
        self._update_runnable()

    def _layer_changed(self, _index: int = 0) -> None:
        layer = self.layer_combo.layer()
        if layer is not None:
            self.reference_spin.set_frames(layer.data.shape[0] if layer.ndim == 3 else 1)
        self._update_runnable()

    def _update_runnable(self) -> None:
        self.panel.set_runnable(self.card() is not None and self.layer_combo.layer() is not None)

    # ---- run -----------------------------------------------------------------------------
    def run(self) -> None:
        """Restore the chosen layer with the chosen model, in the scheduler."""
        card, layer = self.card(), self.layer_combo.layer()
        if card is None or layer is None:
            return
        kwargs: dict[str, Any] = {"data": layer.data, "model": card,
                                  "device": self.device_combo.currentText()}
        if card.is_burst:
            kwargs.update(reference=self.reference_spin.reference(),
                          register=self.register_check.isChecked())
        task = Task(f"Restore {layer.name} with {card.id}", engine.restore, kwargs)
        self.panel.submit(task, lambda res: self._show(layer, card, res))

    def _show(self, source: Image, card: ModelCard, res: engine.RestoreResult) -> None:
        if self.side_button.isChecked():
            self.side_button.setChecked(False)
        prov = res.provenance
        out = self.viewer.add_image(
            res.image, name=f"{source.name} restored ({card.id})",
            colormap=source.colormap.name,
            metadata={"provenance": prov, "source_layer": source.name},
            **spatial_kwargs(source, res.image.ndim, card.scale))
        self.device_label.setText(f"ran on: {prov['device']} ({prov['seconds']:.2f} s)")
        self._pair = (source, out)
        self.side_button.setEnabled(True)

    # ---- side by side --------------------------------------------------------------------
    def _side_by_side(self, on: bool) -> None:
        if self._pair is None:
            return
        source, out = self._pair
        translate = list(out.translate)
        if on:
            offset = 1.05 * source.data.shape[-1] * float(source.scale[-1])
            out.metadata["side_by_side_offset"] = offset
        else:
            offset = -out.metadata.pop("side_by_side_offset", 0.0)
        translate[-1] += offset
        out.translate = translate

    def _layer_removed(self, event: Any) -> None:
        if self._pair is not None and any(layer is event.value for layer in self._pair):
            self.side_button.blockSignals(True)
            self.side_button.setChecked(False)
            self.side_button.blockSignals(False)
            self.side_button.setEnabled(False)
            self._pair = None
