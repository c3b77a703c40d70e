"""Probes widget: challenge a model with a synthetic pattern whose ground truth is known.

The user picks a pattern (:data:`~napari_microrestore.core.probes.PROBES`), how to degrade it
(like a layer of real data: blur and noise measured by
:func:`~napari_microrestore.core.probes.estimate_degradation` in the worker; or by hand:
blur length and angle, counts per pixel, defocus, frames), a model and a device. Run hands
:func:`napari_microrestore.engine.probe.run_probe` to the scheduler; the result comes back as
three new layers side by side (truth, degraded, restored; optionally the residual restored -
truth), a metrics table (PSNR / SSIM / PCC after a gain + offset fit, and the
invented-structure score, for the degraded and the restored image) and a sentence on what
the model invented. The layers' ``metadata["provenance"]`` holds the probe's parameters and
the restoration's provenance, ``metadata["metrics"]`` the scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ...core.probes import PROBES
from ...engine import probe as engine
from ...models.zoo import ModelCard
from ..scheduler import Scheduler, Task, available_devices, get_scheduler
from ._common import (
    DeviceComboBox,
    JobPanel,
    LayerComboBox,
    ModelComboBox,
    card_text,
    spatial_kwargs,
)

if TYPE_CHECKING:  # pragma: no cover
    from napari.layers import Image

    import napari

_GAP = 1.05                      # side-by-side spacing, in image widths
_COLUMNS = (("PSNR (dB)", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.3f}"),
            ("PCC", "pcc", "{:.3f}"), ("invented", "score", "{:.3f}"))
EXPLANATION = ("'invented': RMS of the coherent residual (lines, grids, ringing) at frequencies "
               "the image has and the truth lacks, relative to the truth's contrast; noise "
               "and blur score 0.")


def _spin(lo: float, hi: float, value: float, decimals: int, suffix: str,
          tip: str) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(lo, hi)
    box.setDecimals(decimals)
    box.setValue(value)
    box.setSuffix(suffix)
    box.setToolTip(tip)
    return box


class ProbesWidget(QWidget):
    """Pattern, degradation (like a layer, or by hand), model and device; Run / Cancel; the
    truth / degraded / restored layers side by side with metrics and invented structure."""

    def __init__(self, napari_viewer: napari.Viewer, scheduler: Optional[Scheduler] = None,
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.scheduler = scheduler or get_scheduler()
        self.result: Optional[engine.ProbeResult] = None
        self.pattern_combo = QComboBox()
        self.pattern_combo.addItems(list(PROBES))
        self.invert_check = QCheckBox("dark features on bright (bright-field TEM)")
        self.size_spin = QSpinBox()
        self.size_spin.setRange(64, 1024)
        self.size_spin.setSingleStep(32)
        self.size_spin.setValue(256)
        self.size_spin.setSuffix(" px")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2 ** 31 - 1)
        self.like_combo = LayerComboBox(napari_viewer, none_text="(none: the values below)")
        self.like_combo.setToolTip("Measure blur and noise on this layer and degrade the probe "
                                   "like it (the values below are then filled in)")
        self.blur_spin = _spin(0.0, 60.0, 10.0, 1, " px", "motion blur length per frame")
        self.angle_spin = _spin(0.0, 180.0, 90.0, 0, " deg",
                                "motion direction, from +x towards +y (90: vertical)")
        self.dose_spin = _spin(0.5, 1e5, 20.0, 1, " counts/px",
                               "mean counts per pixel (Poisson noise: fewer is noisier)")
        self.defocus_spin = _spin(0.0, 20.0, 2.0, 1, " px", "defocus Gaussian sigma "
                                  "(defocus models)")
        self.frames_spin = QSpinBox()
        self.frames_spin.setRange(2, 16)
        self.frames_spin.setValue(5)
        # the models a probe can test (burst, defocus and 2x models; not ssTEM ones)
        self.model_combo = ModelComboBox(lambda card: card.task in engine.PROBE_TASKS)
        self.card_view = QTextBrowser()
        self.card_view.setMaximumHeight(120)
        self.device_combo = DeviceComboBox()
        self.residual_check = QCheckBox("add a residual layer (restored - truth)")
        self.panel = JobPanel(self.scheduler, "Run probe")
        self.panel.run_button.clicked.connect(self.run)
        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setMaximumHeight(130)
        self.readout = QLabel("")
        self.readout.setWordWrap(True)
        explanation = QLabel(EXPLANATION)
        explanation.setWordWrap(True)

        form = QFormLayout()
        form.addRow("pattern", self.pattern_combo)
        form.addRow(self.invert_check)
        form.addRow("size", self.size_spin)
        form.addRow("seed", self.seed_spin)
        form.addRow("degrade like", self.like_combo)
        form.addRow("blur length", self.blur_spin)
        form.addRow("blur angle", self.angle_spin)
        form.addRow("dose", self.dose_spin)
        form.addRow("defocus", self.defocus_spin)
        form.addRow("frames", self.frames_spin)
        form.addRow("model", self.model_combo)
        form.addRow(self.card_view)
        form.addRow("device", self.device_combo)
        form.addRow(self.residual_check)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.panel)
        layout.addWidget(self.table)
        layout.addWidget(self.readout)
        layout.addWidget(explanation)
        layout.addStretch(1)

        self.model_combo.currentIndexChanged.connect(self._update_controls)
        self.like_combo.currentIndexChanged.connect(self._update_controls)
        self.model_combo.refresh()
        self._update_controls()
        self.like_combo.set_layer(None)
        self.device_job = self.scheduler.submit(Task("List devices", available_devices),
                                                on_result=self.panel.guard(self.device_combo.set_devices))

    # ---- choices -------------------------------------------------------------------------
    def card(self) -> Optional[ModelCard]:
        return self.model_combo.card()

    def set_model(self, model_id: str) -> None:
        """Choose the model with this id."""
        self.model_combo.set_model(model_id)

    def _update_controls(self, _index: int = 0) -> None:
        card = self.card()
        self.card_view.setPlainText(card_text(card) if card else "no models to probe")
        manual = self.like_combo.layer() is None
        burst = bool(card and card.is_burst)
        for box in (self.blur_spin, self.angle_spin):
            box.setEnabled(manual and burst)
        self.dose_spin.setEnabled(manual)
        self.defocus_spin.setEnabled(bool(card and card.task == "defocus"))
        self.frames_spin.setEnabled(burst)
        if burst:
            fr = card.frames
            self.frames_spin.setRange(max(2, fr["min"]), max(2, fr["max"]))
            self.frames_spin.setValue(max(2, fr["default"]))
        self.panel.set_runnable(card is not None)

    # ---- run -----------------------------------------------------------------------------
    def run(self) -> None:
        """Run the probe experiment in the scheduler."""
        card = self.card()
        if card is None:
            return
        like = self.like_combo.layer()
        kwargs: dict[str, Any] = {
            "pattern": self.pattern_combo.currentText(), "model": card,
            "shape": (self.size_spin.value(),) * 2, "seed": self.seed_spin.value(),
            "invert": self.invert_check.isChecked(), "device": self.device_combo.currentText(),
            "defocus": self.defocus_spin.value()}
        if like is None:
            kwargs.update(dose=self.dose_spin.value())
            if card.is_burst:
                kwargs.update(blur_length=self.blur_spin.value(),
                              blur_angle=self.angle_spin.value())
        else:
            kwargs["like"] = like.data
        if card.is_burst:
            kwargs["n_frames"] = self.frames_spin.value()
        task = Task(f"Probe {card.id} with {kwargs['pattern']}", engine.run_probe, kwargs)
        self.panel.submit(task, lambda res: self._show(res, card, like))

    def _show(self, res: engine.ProbeResult, card: ModelCard, like: Optional[Image]) -> None:
        self.result = res
        pattern = res.provenance["parameters"]["pattern"]
        if res.estimate is not None:
            self._fill_estimate(res.estimate)
        if like is not None:
            geo = spatial_kwargs(like, 2)
        else:
            geo = {"scale": [1.0, 1.0], "translate": [0.0, 0.0], "units": ("pixel", "pixel")}
        width = res.truth.shape[-1] * geo["scale"][-1]
        zoom = card.scale if card.task == "sr2x" else 1
        meta = {"provenance": {**res.provenance, "restoration": res.restore_provenance},
                "metrics": res.metrics, "invented": res.invented}

        def place(data: Any, name: str, slot: int, pixel: float = 1.0, **kw: Any) -> Image:
            lead = data.ndim - 2
            scale = [1.0] * lead + [s * pixel for s in geo["scale"]]
            # pixel edges aligned with the truth's (matters for the coarser sr2x input)
            shift = 0.5 * (pixel - 1.0) * geo["scale"][-1]
            translate = [0.0] * lead + [geo["translate"][0] + shift,
                                        geo["translate"][1] + shift + slot * _GAP * width]
            units = ("pixel",) * lead + tuple(geo["units"])
            return self.viewer.add_image(data, name=name, scale=scale, translate=translate,
                                         units=units, metadata=meta, **kw)

        place(res.truth, f"{pattern} truth", 0)
        place(res.degraded, f"{pattern} degraded", 1, pixel=float(zoom))
        place(res.restored, f"{pattern} restored ({card.id})", 2)
        if self.residual_check.isChecked():
            diff = res.restored - res.truth
            lim = float(abs(diff[res.mask]).max()) if res.mask.any() else 1.0
            place(diff, f"{pattern} residual ({card.id})", 3, colormap="PiYG",
                  contrast_limits=(-(lim or 1.0), lim or 1.0))
        self._fill_table(res)
        self.readout.setText(f"restored: {engine.describe_invented(res.invented['restored'])}"
                             f"\ndegraded: {engine.describe_invented(res.invented['degraded'])}")

    def _fill_estimate(self, est: dict) -> None:
        """Show the blur and noise measured on the "degrade like" layer."""
        self.blur_spin.setValue(est["blur_length"])
        self.angle_spin.setValue(est["blur_angle"])
        if est.get("dose") is not None:
            self.dose_spin.setValue(est["dose"])

    def _fill_table(self, res: engine.ProbeResult) -> None:
        rows = ("degraded", "restored")
        self.table.clear()
        self.table.setRowCount(len(rows))
        self.table.setColumnCount(len(_COLUMNS))
        self.table.setHorizontalHeaderLabels([c[0] for c in _COLUMNS])
        self.table.setVerticalHeaderLabels(list(rows))
        for r, row in enumerate(rows):
            values = {**res.metrics[row], "score": res.invented[row]["score"]}
            for c, (_, key, fmt) in enumerate(_COLUMNS):
                self.table.setItem(r, c, QTableWidgetItem(fmt.format(values[key])))
        self.table.resizeColumnsToContents()
