"""Fine-tune widget: adapt a burst model to the user's own burst, watch it improve, save it.

The widget builds an :func:`napari_microrestore.engine.finetune.finetune` call (base model,
burst layer, mode, clean reference layer, time budget, patch / batch / learning rate from a
preset, device) and hands it to the scheduler; it never imports torch. While it runs, the
engine's :class:`~napari_microrestore.engine.finetune.FinetuneUpdate` s draw the loss curve
(a small QPainter plot, no plotting dependency) and replace the data of a preview layer
``"<burst> fine-tune preview"``: the holdout crop (kept out of training) restored with the
current weights, placed over that crop in world coordinates.

Cancel keeps the best weights so far: the scheduler delivers no result for a job whose cancel
token is set, so for a fine-tune the Cancel button sets the engine's separate ``stop`` token,
and the run returns its best weights normally. "Save as" writes the result as a new model
(card + safetensors, through the scheduler since it needs torch) into the user's model folder,
where the Restore widget's Refresh lists it at once. "Adapt BN statistics" re-estimates the
BatchNorm statistics of the base model on the burst (:func:`engine.finetune.adapt`); its
result is saved the same way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...core.errors import CancelToken
from ...engine import finetune as engine
from ...models.zoo import ModelCard
from ..scheduler import Scheduler, Task, available_devices, get_scheduler
from ._common import (
    DeviceComboBox,
    FrameSpinBox,
    JobPanel,
    LayerComboBox,
    ModelComboBox,
    is_plain_image,
    spatial_kwargs,
    unwrap,
)

if TYPE_CHECKING:  # pragma: no cover
    from napari.layers import Image, Layer

    import napari

_MODES = {"pairs (burst + clean reference)": "pairs",
          "self-supervised (burst only)": "self-supervised"}


def _is_burst_layer(layer: Layer) -> bool:
    return is_plain_image(layer) and layer.ndim == 3


def _is_2d_layer(layer: Layer) -> bool:
    return is_plain_image(layer) and layer.ndim == 2


class LossPlot(QWidget):
    """A tiny live plot: the training loss per step (blue line) and the holdout score of each
    evaluation (orange dots, own scale), painted with QPainter."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.losses: list[tuple[float, float]] = []
        self.scores: list[tuple[float, float]] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("blue: training loss per step; orange: holdout score (PSNR in dB with "
                        "a reference, else the self-supervised holdout loss)")

    def clear(self) -> None:
        self.losses.clear()
        self.scores.clear()
        self.update()

    def add(self, step: int, loss: Optional[float], score: Optional[float] = None) -> None:
        if loss is not None:
            self.losses.append((float(step), float(loss)))
        if score is not None:
            self.scores.append((float(step), float(score)))
        self.update()

    def paintEvent(self, _event: Any) -> None:  # noqa: N802 (Qt's name)
        p = QPainter(self)
        try:
            p.setRenderHint(QPainter.RenderHint.Antialiasing)
            rect = self.rect().adjusted(4, 4, -4, -14)
            p.setPen(QPen(QColor(128, 128, 128)))
            p.drawRect(rect)
            steps = [s for s, _ in self.losses + self.scores]
            if not steps:
                p.drawText(rect, Qt.AlignmentFlag.AlignCenter, "loss")
                return
            x_hi = max(max(steps), 1.0)

            def poly(points: list[tuple[float, float]]) -> list[QPointF]:
                vals = [v for _, v in points]
                lo, hi = min(vals), max(vals)
                span = (hi - lo) or 1.0
                return [QPointF(rect.left() + rect.width() * s / x_hi,
                                rect.bottom() - rect.height() * (v - lo) / span)
                        for s, v in points]

            if len(self.losses) > 1:
                p.setPen(QPen(QColor(70, 140, 230), 1.5))
                p.drawPolyline(QPolygonF(poly(self.losses)))
            p.setPen(QPen(QColor(240, 150, 40), 4))
            for pt in poly(self.scores):
                p.drawPoint(pt)
            p.setPen(QPen(QColor(160, 160, 160)))
            last = self.losses[-1][1] if self.losses else float("nan")
            p.drawText(4, self.height() - 2, f"step {int(x_hi)}   loss {last:.4g}")
        finally:
            p.end()


class FinetuneWidget(QWidget):
    """Base model, burst layer, mode (with a clean reference layer for pairs), budget preset,
    device; Fine-tune / Adapt BN statistics / Cancel; live loss plot, holdout preview layer,
    before / after scores; Save as a new model."""

    def __init__(self, napari_viewer: napari.Viewer, scheduler: Optional[Scheduler] = None,
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.scheduler = scheduler or get_scheduler()
        self.result: Optional[engine.FinetuneResult] = None
        self.preview_layer: Optional[Image] = None
        self._stop: Optional[CancelToken] = None
        self._source: Optional[Layer] = None
        self._unit = ""
        self._suggested_id = ""

        self.model_combo = ModelComboBox(
            lambda card: card.task in engine.SUPPORTED_TASKS and not card.is_classical,
            prefer="tem-burst-fast")
        self.layer_combo = LayerComboBox(napari_viewer, accept=_is_burst_layer)
        self.reference_spin = FrameSpinBox()
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(_MODES))
        self.clean_combo = LayerComboBox(napari_viewer, accept=_is_2d_layer, none_text="(none)")
        self.clean_combo.setToolTip("Clean image of the reference frame's field: the target in "
                                    "pairs mode; in self-supervised mode it only scores the "
                                    "holdout crop")
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(list(engine.PRESETS))
        self.budget_spin = QDoubleSpinBox()
        self.budget_spin.setRange(1.0, 24 * 3600.0)
        self.budget_spin.setDecimals(0)
        self.budget_spin.setSuffix(" s")
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(16, 512)
        self.patch_spin.setSingleStep(8)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 256)
        self.device_combo = DeviceComboBox()
        self.panel = JobPanel(self.scheduler, "Fine-tune")
        self.panel.run_button.clicked.connect(self.run)
        self.adapt_button = self.panel.add_button("Adapt BN statistics")
        self.adapt_button.setToolTip("Re-estimate the BatchNorm statistics of the base model on "
                                     "this burst (no weight update; nets with BatchNorm only)")
        self.adapt_button.clicked.connect(self.adapt)
        # Cancel of a fine-tune ends it early and keeps its best weights (see the module notes)
        self.panel.cancel_button.clicked.disconnect()
        self.panel.cancel_button.clicked.connect(self.cancel)
        self.plot = LossPlot()
        self.score_label = QLabel("holdout: -")
        self.score_label.setWordWrap(True)
        self.id_edit = QLineEdit()
        self.id_edit.setPlaceholderText("new model id")
        self.save_button = QPushButton("Save as...")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self.save)
        self.save_label = QLabel("")
        self.save_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("base model", self.model_combo)
        form.addRow("burst", self.layer_combo)
        form.addRow("reference frame", self.reference_spin)
        form.addRow("mode", self.mode_combo)
        form.addRow("clean reference", self.clean_combo)
        form.addRow("preset", self.preset_combo)
        form.addRow("budget", self.budget_spin)
        form.addRow("patch / batch", _row(self.patch_spin, self.batch_spin))
        form.addRow("device", self.device_combo)
        save_row = QHBoxLayout()
        save_row.addWidget(self.id_edit, 1)
        save_row.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.panel)
        layout.addWidget(self.plot)
        layout.addWidget(self.score_label)
        layout.addLayout(save_row)
        layout.addWidget(self.save_label)
        layout.addStretch(1)

        self.preset_combo.currentTextChanged.connect(self.set_preset)
        self.mode_combo.currentIndexChanged.connect(self._update_runnable)
        self.clean_combo.currentIndexChanged.connect(self._update_runnable)
        self.layer_combo.currentIndexChanged.connect(self._layer_changed)
        self.model_combo.currentIndexChanged.connect(self._update_runnable)
        self.refresh_models()
        self.set_preset(self.preset_combo.currentText())
        self._layer_changed()
        self.device_job = self.scheduler.submit(Task("List devices", available_devices),
                                                on_result=self.panel.guard(self._set_devices))

    # ---- choices -------------------------------------------------------------------------
    def card(self) -> Optional[ModelCard]:
        return self.model_combo.card()

    def mode(self) -> str:
        return _MODES[self.mode_combo.currentText()]

    def set_mode(self, mode: str) -> None:
        """Choose ``"pairs"`` or ``"self-supervised"``."""
        self.mode_combo.setCurrentText(next(k for k, v in _MODES.items() if v == mode))

    def refresh_models(self) -> None:
        """List the fine-tunable models (burst networks of the zoo and the user's folder)."""
        self.model_combo.refresh()
        self._update_runnable()

    def set_model(self, model_id: str) -> None:
        self.model_combo.set_model(model_id)

    def set_preset(self, name: str) -> None:
        """Fill budget, patch and batch from a preset of ``engine.finetune.PRESETS``."""
        preset = engine.PRESETS[name]
        self.budget_spin.setValue(preset["budget_seconds"])
        self.patch_spin.setValue(preset["patch"])
        self.batch_spin.setValue(preset["batch"])

    def _set_devices(self, devices: list[str]) -> None:
        auto = self.device_combo.currentText() == "auto"
        self.device_combo.set_devices(devices)
        if auto and any(d.startswith("cuda") for d in devices):
            self.preset_combo.setCurrentText("GPU")   # "auto" will pick the GPU

    def _layer_changed(self, _index: int = 0) -> None:
        layer = self.layer_combo.layer()
        if layer is not None:
            self.reference_spin.set_frames(layer.data.shape[0])
        self._update_runnable()

    def _suggest_id(self) -> None:
        """Suggest ``<base>-<burst>-ft`` as the new model's id, unless the user typed one."""
        card, layer = self.card(), self.layer_combo.layer()
        if card is None or layer is None:
            return
        if self.id_edit.text() in ("", self._suggested_id):
            self._suggested_id = _default_id(card.id, layer.name)
            self.id_edit.setText(self._suggested_id)

    def _update_runnable(self, _index: int = 0) -> None:
        self._suggest_id()
        ready = self.card() is not None and self.layer_combo.layer() is not None
        self.panel.set_runnable(ready and (self.mode() != "pairs"
                                           or self.clean_combo.layer() is not None))
        self.panel.set_runnable(ready, self.adapt_button)

    # ---- run -----------------------------------------------------------------------------
    def run(self) -> None:
        """Fine-tune the chosen model on the chosen burst, in the scheduler."""
        card, layer, clean = self.card(), self.layer_combo.layer(), self.clean_combo.layer()
        if card is None or layer is None:
            return
        preset = engine.PRESETS[self.preset_combo.currentText()]
        self._stop = CancelToken()
        kwargs: dict[str, Any] = {
            "model": card, "data": layer.data, "mode": self.mode(),
            "reference": None if clean is None else clean.data,
            "budget_seconds": float(self.budget_spin.value()), "lr": preset["lr"],
            "patch": self.patch_spin.value(), "batch": self.batch_spin.value(),
            "device": self.device_combo.currentText(),
            "reference_frame": self.reference_spin.reference(), "data_name": layer.name,
            "stop": self._stop}
        self._start(layer)
        self._unit = " dB" if clean is not None else " (self-supervised loss)"
        task = Task(f"Fine-tune {card.id} on {layer.name}", engine.finetune, kwargs)
        self.panel.submit(task, self._show, on_update=self._on_update)

    def adapt(self) -> None:
        """Adapt the base model's BatchNorm statistics to the chosen burst, in the scheduler."""
        card, layer = self.card(), self.layer_combo.layer()
        if card is None or layer is None:
            return
        self._stop = None
        self._start(layer)
        task = Task(f"Adapt BN of {card.id} on {layer.name}", engine.adapt, {
            "model": card, "data": layer.data, "device": self.device_combo.currentText(),
            "reference_frame": self.reference_spin.reference(), "data_name": layer.name})
        self.panel.submit(task, self._show)

    def cancel(self) -> None:
        """Cancel: a fine-tune stops early and keeps its best weights; anything else stops."""
        if self._stop is not None and self.panel.running:
            self._stop.cancel()
            self.panel.cancel_button.setEnabled(False)
            self.panel.status.setText("stopping: keeping the best weights so far...")
        else:
            self.panel.cancel()

    def _start(self, layer: Layer) -> None:
        self._source = layer
        self.result = None
        self.save_button.setEnabled(False)
        self.plot.clear()
        self.score_label.setText("holdout: -")
        self.save_label.setText("")

    def _on_update(self, upd: engine.FinetuneUpdate) -> None:
        self.plot.add(upd.step, upd.loss, upd.score)
        if upd.best is not None:
            self.score_label.setText(f"holdout at step {upd.step}: best {upd.best:.4g}"
                                     f"{self._unit}")
        if upd.preview is not None:
            self._set_preview(upd.preview, upd.holdout)

    def _set_preview(self, image: Any, holdout: tuple) -> None:
        """Show ``image`` (the restored holdout crop) in the preview layer, placed over the
        crop it restores."""
        source = self._source
        if source is None:
            return
        layer = self.preview_layer
        if (layer is not None and self._in_viewer(layer)
                and layer.metadata.get("source_layer") == source.name
                and layer.metadata.get("holdout") == list(holdout)):
            layer.data = image
            return
        kw = spatial_kwargs(source, 2)
        kw["translate"] = [t + h * s for t, h, s in zip(kw["translate"], holdout[:2],
                                                        kw["scale"])]
        self.preview_layer = self.viewer.add_image(
            image, name=f"{source.name} fine-tune preview", colormap=source.colormap.name,
            metadata={"source_layer": source.name, "holdout": list(holdout)}, **kw)

    def _in_viewer(self, layer: Layer) -> bool:
        """Whether ``layer`` is still in the viewer (napari may hand plugin widgets proxies,
        so compare the objects behind them)."""
        return any(unwrap(la) is unwrap(layer) for la in self.viewer.layers)

    def _show(self, res: engine.FinetuneResult) -> None:
        self.result = res
        if res.preview_after is not None:
            self._set_preview(res.preview_after, res.holdout)
        if self.preview_layer is not None and self._in_viewer(self.preview_layer):
            self.preview_layer.metadata["provenance"] = {
                "finetune": res.card.get("training", {}), "holdout": list(res.holdout)}
        self.score_label.setText(_score_text(res))
        self.save_button.setEnabled(True)

    # ---- save ----------------------------------------------------------------------------
    def save(self) -> None:
        """Save the last result as a new model in the user's model folder (in the scheduler)."""
        if self.result is None:
            return
        model_id = self.id_edit.text().strip()
        task = Task(f"Save model {model_id}", engine.save_finetuned,
                    {"result": self.result, "model_id": model_id})
        self.save_button.setEnabled(False)
        self.scheduler.submit(task, on_result=self.panel.guard(self._saved),
                              on_done=self.panel.guard(lambda _job: self.save_button.setEnabled(
                                  self.result is not None)))

    def _saved(self, card: ModelCard) -> None:
        self.save_label.setText(f"saved {card.id} to {card.path.parent} (Restore > Refresh "
                                "lists it)")
        self.refresh_models()


def _row(*widgets: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    for w in widgets:
        row.addWidget(w)
    return row


def _default_id(base_id: str, layer_name: str) -> str:
    """``<base>-<layer>-ft`` with anything but letters, digits, '-' and '_' made '-'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{base_id}-{layer_name}-ft").strip("-")


def _score_text(res: engine.FinetuneResult) -> str:
    how = "stopped early, " if res.cancelled else ""
    if res.mode == "adapt-bn":
        return f"BatchNorm statistics adapted in {res.seconds:.1f} s (compare the preview)"
    b, a = res.before, res.after
    if "psnr" in b:
        head = (f"holdout PSNR {b['psnr']:.2f} -> {a['psnr']:.2f} dB "
                f"({a['psnr'] - b['psnr']:+.2f} dB), SSIM {b['ssim']:.3f} -> {a['ssim']:.3f}")
    else:
        head = f"holdout self-supervised loss {b['loss']:.4g} -> {a['loss']:.4g}"
    return (f"{head}; best at step {res.best_step} of {res.steps} ({how}{res.seconds:.0f} s on "
            f"{res.device})")
