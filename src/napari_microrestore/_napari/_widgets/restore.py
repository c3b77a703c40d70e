"""Restore widget: run any model of the zoo on a layer, on the device of the user's choice.

The widget builds an :func:`napari_microrestore.engine.restore.restore` call (model card,
device, reference frame, register) and hands it to the scheduler; it never imports torch (the
device list comes from :func:`~napari_microrestore._napari.scheduler.available_devices`, run
in the scheduler too). The result is a new Image layer ``"<name> restored (<model id>)"`` with
the input's pixel size and units (divided by the model's scale for 2x super-resolution) and
the engine's provenance (model, weights sha256, parameters, device, version, registration) in
``metadata["provenance"]``; the input layer is never modified.

Burst models restore a *window* of the stream: ``frames`` consecutive frames around the
reference frame ("model's" = the card's default burst length), shifted to stay inside the
stream at its ends, the same frames for Run, Preview, Live and each frame of "Whole stream".
The Stream widget sets the window (and the frame axis of a 4-D+ layer); without it the frames
run along axis 0 and the reference frame box is the centre. Provenance of a windowed restore
records ``stream_window`` and gives ``reference`` / ``frames_used`` as stream frame numbers
(``parameters`` are those of the engine call on the window's frames).

* **Whole stream** (burst models): :func:`napari_microrestore.engine.stream.restore_stream`
  slides the window along the stream; a ``"<name> restored stream (<id>)"`` (N, Y, X) float32
  layer is allocated when the first frame arrives and filled frame by frame. Frames not done
  yet are NaN (so they cannot be mistaken for restored zeros; napari leaves them blank). A
  cancelled or failed run keeps the frames done, with ``metadata["provenance"]["partial"]``
  True and ``frames_done`` listing them.
* **Whole stream to OME-Zarr...** (burst models; streams too long for memory): the same
  sliding window, run by :func:`napari_microrestore.engine.batch.run_batch` (the function of
  ``microrestore batch`` and the cluster) block by block into an OME-Zarr folder the user
  picks; the result is opened lazily (the plugin reader) as a new layer over the input, with
  the batch provenance. A layer read from a file whole passes its path(s), so "Dask workers"
  > 0 can run it on an embedded ``LocalCluster``; any other layer (in memory, a view of a
  4-D+ layer) passes its frames, restored in this process. The status line counts the blocks
  written; Cancel stops between frames, the blocks written stay recorded, and running the
  same output again resumes with the rest (an output made with other settings is refused).
* **Preview**: restores only the data pixels in view (the camera's view of the canvas) or the
  bounding box of the selected (else all) shapes of a Shapes layer, computed with ``margin``
  more pixels on every side (room for registration shifts and the net's receptive field) and
  cropped back, into one ``"<name> preview"`` layer placed over its region (replaced each
  time). Single-image models preview the plane in view; burst models the Run window.
* **Live** (burst models): while on, each move of the frame slider restores the window around
  the frame in view, debounced by 50 ms, in a scheduler group of its own (the newest request
  wins, older ones are cancelled) into one ``"<name> live"`` layer; turning it off cancels.
* **ssTEM models**: "sections" ("auto": missing sections and those with a mask, or "3, 7")
  and artefact masks from a Labels layer (non-zero = damaged) of the stack's shape.

The widget's choices (model, device, register, frames, margin, live) persist between
sessions (:class:`~napari_microrestore._napari._widgets._common.Settings`); values that no
longer fit (a model that is gone) are ignored.

"Side by side" moves the output layer right by the input's width (plus a 5 % gap) and back
when clicked again, rather than switching the viewer to grid mode: grid mode would tile every
layer of the viewer (coverage masks, other results) into its own cell, while the translation
puts exactly the two images next to each other on one canvas with one camera. The shift is
recorded in ``metadata["side_by_side_offset"]`` while it is on, since it changes the layer's
world coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from napari.layers import Labels, Shapes
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ...core.errors import CancelToken, InputError, ProgressCallback
from ...core.io import ImageData
from ...engine import batch as engine_batch
from ...engine import restore as engine
from ...engine import stream as engine_stream
from ...engine.compute_process import offload
from ...models.zoo import ModelCard
from .._geometry import Box, BurstWindow, pixel_box, view_corners
from .._reader import read_layers
from ..scheduler import (
    Job,
    Scheduler,
    Task,
    available_devices,
    get_scheduler,
    prestart_compute_process,
)
from ._common import (
    WINDOWS,
    DeviceComboBox,
    FrameSpinBox,
    JobPanel,
    LayerComboBox,
    ModelComboBox,
    Settings,
    WindowRequest,
    _Lifetime,
    cancel_jobs_on_quit,
    card_text,
    connect_while_alive,
    current_indices,
    layer_stream,
    source_info,
    spatial_kwargs,
    unwrap,
)

if TYPE_CHECKING:  # pragma: no cover
    from napari.layers import Image, Layer

    import napari

DEBOUNCE_MS = 50      # live mode: wait this long after the last slider move
DEFAULT_MARGIN = 32   # preview: extra pixels on every side of the region
# self-ensemble choices: (shown text, engine name); see engine.restore.ENSEMBLES
ENSEMBLE_CHOICES = (("off", "none"), ("flips (4 passes)", "flips"),
                    ("flips + transposes (8 passes)", "dihedral"))


# --------------------------------------------------------------------------------------------
# what the worker runs (no Qt)
# --------------------------------------------------------------------------------------------
def parse_sections(text: str) -> Optional[list[int]]:
    """``"auto"`` or empty -> ``None`` (the engine's choice); ``"3, 7"`` -> ``[3, 7]``."""
    text = text.strip()
    if text.lower() in ("", "auto"):
        return None
    try:
        return sorted({int(part) for part in text.replace(";", ",").split(",") if part.strip()})
    except ValueError:
        raise InputError(f"sections must be 'auto' or section numbers like '3, 7'; got "
                         f"{text!r}") from None


def restore_region(data: Any, model: ModelCard, *, start: Optional[int] = None,
                   stop: Optional[int] = None, plane: Optional[int] = None,
                   box: Optional[Box] = None, margin: int = 0, masks: Any = None,
                   progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None, **kwargs: Any) -> engine.RestoreResult:
    """:func:`engine.restore.restore` on part of ``data``, reading only that part.

    ``start``/``stop``: the frames of a burst window of a (T, Y, X) stream (``reference`` in
    ``kwargs`` then counts from ``start``); ``plane``: one plane of a stack (single-image
    preview); ``box``: the pixels to restore, computed with ``margin`` more on every side
    (clipped to the image) and cropped back. Provenance records the window and the region.
    """
    if plane is not None:
        data = data[plane]
    elif start is not None:
        data = data[start:stop]
    outer = None
    if box is not None:
        outer = box.expanded(margin, data.shape[-2:])
        data = data[(Ellipsis, *outer.slices)]
        if masks is not None:
            masks = masks[(Ellipsis, *outer.slices)]
    if masks is not None:
        kwargs["masks"] = np.asarray(masks)
    # on the CPU the engine runs in the compute process (a main thread: see
    # engine.compute_process); only the part read here travels there
    res = offload(engine.restore, data=np.asarray(data), model=model, progress=progress,
                  cancel=cancel, **kwargs)
    prov = res.provenance
    if start is not None:
        prov["stream_window"] = {"start": start, "stop": stop}
        if "reference" in prov:
            prov["reference"] = int(prov["reference"]) + start
        if "frames_used" in prov:
            prov["frames_used"] = [int(t) + start for t in prov["frames_used"]]
    if plane is not None:
        prov["plane"] = plane
    if box is not None:
        res.image = res.image[(Ellipsis, *box.within(outer, model.scale))]
        prov["region"] = {"box": box.to_list(), "margin": margin, "computed": outer.to_list()}
    return res


def motion_note(prov: dict) -> str:
    """The stage-motion part of the status line: the direction the engine read and whether it
    turned the burst for the net (see engine.restore.burst_orientation)."""
    md = prov.get("motion_direction") or {}
    if md.get("angle_deg") is not None:
        return (f"; stage motion {md['angle_deg']:.0f} deg"
                + (" (from the blur)" if md.get("source") == "blur" else "")
                + (f", turned {md['rotation_deg']:+.0f} deg for the net"
                   if md.get("rotation_deg") else ""))
    if md.get("source") == "unknown":
        return ("; stage motion not measured (no registration or frames barely moved, and no "
                "clear blur): not turned")
    return ""


def method_note(prov: dict) -> str:
    """The method's part of the status line: a learned net's self-ensemble, or for the
    classical methods the motion blur measured for the PSF, or that none was found and the
    registered mean came back (see models.classical)."""
    ens = (prov.get("tiling") or {}).get("ensemble")
    if ens:
        return f"; self-ensemble {ens['name']} ({ens['members']} passes)"
    info = prov.get("method") or {}
    if "deconvolved" not in info:
        return ""
    if not info["deconvolved"]:
        return f"; {info.get('note', 'not deconvolved')}"
    return (f"; PSF: {info['blur_length']:.1f} px blur at {info['blur_angle']:.0f} deg"
            + (f", {info['iterations']} iterations" if "iterations" in info else "")
            + (f", balance {info['balance']:.2g}" if "balance" in info else ""))


class RestoreWidget(QWidget):
    """Model picker (with each card's task, training data and metrics), device, input layer,
    burst window, ssTEM sections and masks; Run / Whole stream / Preview / Cancel with a
    progress bar; live mode; "side by side". See the module docstring."""

    def __init__(self, napari_viewer: napari.Viewer, scheduler: Optional[Scheduler] = None,
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.scheduler = scheduler or get_scheduler()
        self.settings = Settings("restore")
        self.model_combo = ModelComboBox()
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("List the models again (e.g. one you just fine-tuned)")
        self.refresh_button.clicked.connect(self.refresh_models)
        self.card_view = QTextBrowser()
        self.card_view.setMaximumHeight(160)
        self.device_combo = DeviceComboBox()
        self.layer_combo = LayerComboBox(napari_viewer)
        self.reference_spin = FrameSpinBox()
        self.frames_spin = QSpinBox()
        self.frames_spin.setRange(1, 999)
        self.frames_spin.setSpecialValueText("model's")
        self.frames_spin.setToolTip("Frames per burst window; model's: the card's default")
        self.window_label = QLabel("")
        self.register_check = QCheckBox("register frames first")
        self.register_check.setChecked(True)
        self.ensemble_combo = QComboBox()
        self.ensemble_combo.setToolTip(
            "Every restore of this widget: average the net's answers over flipped (and transposed) "
            "copies of the input, each flipped back; 4 or 8 times the compute for a little "
            "less noise and fewer artefacts. Burst nets take flips only (their stage motion "
            "must stay along the columns).")
        self.sections_edit = QLineEdit("auto")
        self.sections_edit.setToolTip("ssTEM: sections to restore, e.g. '3, 7'; auto: the "
                                      "missing ones and those with an artefact mask")
        self.masks_combo = LayerComboBox(napari_viewer, accept=lambda la: isinstance(la, Labels),
                                         none_text="no masks")
        self.masks_combo.setToolTip("ssTEM: a Labels layer of the stack's shape; non-zero "
                                    "pixels are damaged (folds, precipitates)")
        self.region_combo = LayerComboBox(napari_viewer, accept=lambda la: isinstance(la, Shapes),
                                          none_text="region in view")
        self.region_combo.setToolTip("Preview: the region in view, or the bounding box of the "
                                     "selected (else all) shapes of a Shapes layer")
        self.margin_spin = QSpinBox()
        self.margin_spin.setRange(0, 1024)
        self.margin_spin.setSuffix(" px")
        self.margin_spin.setToolTip("Preview: extra pixels around the region for registration "
                                    "shifts and the net's receptive field (cropped away)")
        self.live_check = QCheckBox("live: restore the frame in view as the slider moves")
        self.workers_spin = QSpinBox()
        self.workers_spin.setRange(0, 256)
        self.workers_spin.setSpecialValueText("0 (in napari)")
        self.workers_spin.setToolTip("Whole stream to OME-Zarr: worker processes of an embedded "
                                     "Dask LocalCluster (needs the [batch] extra and a stream "
                                     "read from a file); 0 runs it in napari")
        self.zarr_block_spin = QSpinBox()
        self.zarr_block_spin.setRange(0, 4096)
        self.zarr_block_spin.setSpecialValueText("auto")
        self.zarr_block_spin.setSuffix(" frames")
        self.zarr_block_spin.setToolTip("Whole stream to OME-Zarr: output frames per block (the "
                                        "unit that is written, recorded and resumed); auto: up "
                                        "to 16 frames, 256 MB")
        self.panel = JobPanel(self.scheduler, "Restore")
        self.panel.run_button.clicked.connect(self.run)
        self.stream_button = self.panel.add_button("Whole stream")
        self.stream_button.setToolTip("Restore every frame of the stream, each from its window")
        self.stream_button.clicked.connect(self.run_stream)
        self.preview_button = self.panel.add_button("Preview")
        self.preview_button.setToolTip("Restore only the region in view (or the shapes)")
        self.preview_button.clicked.connect(self.preview)
        self.zarr_button = self.panel.add_button("Whole stream to OME-Zarr...")
        self.zarr_button.setToolTip("Restore every frame of a stream too long for memory into "
                                    "an OME-Zarr folder, block by block (resumable)")
        self.zarr_button.clicked.connect(self.choose_zarr)
        self.device_label = QLabel("ran on: -")
        self.live_label = QLabel("")
        self.side_button = QPushButton("Side by side")
        self.side_button.setCheckable(True)
        self.side_button.setEnabled(False)
        self.side_button.toggled.connect(self._side_by_side)
        self._pair: Optional[tuple[Image, Image]] = None
        self._preview: Optional[Image] = None
        self._live: Optional[Image] = None
        self._live_life = _Lifetime()   # cancels the live job when the widget goes
        self.destroyed.connect(self._live_life.end)
        self._live_group = f"live {id(self):x}"
        self._devices_listed = False
        self._devices: Optional[list[str]] = None   # the listed device choices
        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.setInterval(DEBOUNCE_MS)
        self._live_timer.timeout.connect(self.live_restore)

        models = QHBoxLayout()
        models.addWidget(self.model_combo, 1)
        models.addWidget(self.refresh_button)
        form = QFormLayout()
        form.addRow("model", models)
        form.addRow(self.card_view)
        form.addRow("device", self.device_combo)
        form.addRow("input", self.layer_combo)
        form.addRow("reference frame", self.reference_spin)
        form.addRow("frames", self.frames_spin)
        form.addRow(self.window_label)
        form.addRow(self.register_check)
        form.addRow("self-ensemble", self.ensemble_combo)
        form.addRow("sections", self.sections_edit)
        form.addRow("artefact masks", self.masks_combo)
        form.addRow("preview region", self.region_combo)
        form.addRow("margin", self.margin_spin)
        form.addRow(self.live_check)
        form.addRow("Dask workers", self.workers_spin)
        form.addRow("zarr block", self.zarr_block_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.panel)
        layout.addWidget(self.device_label)
        layout.addWidget(self.live_label)
        layout.addWidget(self.side_button)
        layout.addStretch(1)

        self.refresh_models()
        self._restore_settings()
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        self.model_combo.currentIndexChanged.connect(self._save_settings)
        self.layer_combo.currentIndexChanged.connect(self._layer_changed)
        self.reference_spin.valueChanged.connect(self._show_window)
        self.frames_spin.valueChanged.connect(self._frames_changed)
        self.device_combo.currentIndexChanged.connect(self._save_settings)
        self.device_combo.currentIndexChanged.connect(self._prestart)
        self.register_check.toggled.connect(self._save_settings)
        self.ensemble_combo.currentIndexChanged.connect(self._save_settings)
        self.margin_spin.valueChanged.connect(self._save_settings)
        self.workers_spin.valueChanged.connect(self._save_settings)
        self.live_check.toggled.connect(self._live_toggled)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        connect_while_alive(self, self.viewer.dims.events.current_step, self._on_step)
        connect_while_alive(self, WINDOWS.changed, self._on_window_changed)
        connect_while_alive(self, WINDOWS.sent, self._on_window_sent)
        cancel_jobs_on_quit(self.scheduler)
        self._layer_changed()
        self.device_job = self.scheduler.submit(Task("List devices", available_devices),
                                                on_result=self.panel.guard(self._set_devices))

    # ---- persisted choices ---------------------------------------------------------------
    def _restore_settings(self) -> None:
        model_id = self.settings.get("model", "")
        if model_id:
            try:
                self.set_model(model_id)
            except ValueError:   # a model that is gone: keep the first one
                pass
        self._model_changed()
        self._wanted_device = self.settings.get("device", "auto")
        self.register_check.setChecked(self.settings.get("register",
                                                         self.register_check.isChecked()))
        self.frames_spin.setValue(self.settings.get("frames", 1))
        self.set_ensemble(self.settings.get("ensemble", "none"))
        self.margin_spin.setValue(self.settings.get("margin", DEFAULT_MARGIN))
        self.live_check.setChecked(self.settings.get("live", False))
        self.workers_spin.setValue(self.settings.get("zarr_workers", 0))

    def _save_settings(self, *_: Any) -> None:
        card = self.card()
        if card is not None:
            self.settings.set("model", card.id)
        # until the device list arrives, keep the device chosen last time
        self.settings.set("device", self.device_combo.currentText() if self._devices_listed
                          else self._wanted_device)
        self.settings.set("register", self.register_check.isChecked())
        self.settings.set("frames", self.frames_spin.value())
        self.settings.set("ensemble", self.ensemble())
        self.settings.set("margin", self.margin_spin.value())
        self.settings.set("live", self.live_check.isChecked())
        self.settings.set("zarr_workers", self.workers_spin.value())

    # ---- choices -------------------------------------------------------------------------
    def card(self) -> Optional[ModelCard]:
        return self.model_combo.card()

    def refresh_models(self) -> None:
        """List the zoo's and the user's model cards (keeping the chosen model if it is
        still there)."""
        self.model_combo.refresh()
        self._model_changed()

    def set_model(self, model_id: str) -> None:
        """Choose the model with this id."""
        self.model_combo.set_model(model_id)

    def _set_devices(self, devices: list[str]) -> None:
        self.device_combo.set_devices(devices, wanted=self._wanted_device)
        self._devices = list(devices)
        self._devices_listed = True
        self._prestart()

    def _prestart(self, *_: Any) -> None:
        """CPU chosen (or auto without a GPU): start the compute process now, so that the
        first run does not wait for it."""
        prestart_compute_process(self.device_combo.currentText(), self._devices)

    def _model_changed(self, _index: int = 0) -> None:
        card = self.card()
        self.card_view.setPlainText(card_text(card) if card else "no models found")
        burst = bool(card and card.is_burst)
        sstem = bool(card and card.task == "sstem")
        for widget in (self.reference_spin, self.register_check, self.frames_spin,
                       self.live_check, self.workers_spin, self.zarr_block_spin):
            widget.setEnabled(burst)
        for widget in (self.sections_edit, self.masks_combo):
            widget.setEnabled(sstem)
        if card is not None:
            self.register_check.setChecked(bool(card.input.get("register", True)))
        self._set_ensembles(card)
        if not burst and self.live_check.isChecked():
            self.live_check.setChecked(False)
        self._layer_changed()

    def _set_ensembles(self, card: Optional[ModelCard]) -> None:
        """The self-ensembles ``card`` takes: none for classical methods, flips for burst
        nets that expect motion along the columns, all for the others (keeping the choice
        when the new card takes it)."""
        wanted = self.ensemble()
        allowed = [] if card is None or card.is_classical else [
            c for c in ENSEMBLE_CHOICES
            if not (c[1] == "dihedral" and card.motion_axis is not None)]
        self.ensemble_combo.blockSignals(True)
        self.ensemble_combo.clear()
        for text, name in allowed or ENSEMBLE_CHOICES[:1]:
            self.ensemble_combo.addItem(text, name)
        self.ensemble_combo.blockSignals(False)
        self.ensemble_combo.setEnabled(len(allowed) > 1)
        self.set_ensemble(wanted)

    def ensemble(self) -> str:
        """The chosen self-ensemble (an engine name: none, flips or dihedral)."""
        return self.ensemble_combo.currentData() or "none"

    def set_ensemble(self, name: str) -> None:
        """Choose the self-ensemble ``name`` if the model takes it (else keep the choice)."""
        idx = self.ensemble_combo.findData(name)
        if idx >= 0:
            self.ensemble_combo.setCurrentIndex(idx)

    def _layer_changed(self, _index: int = 0) -> None:
        layer = self.layer_combo.layer()
        if layer is not None:
            known = WINDOWS.get(layer)
            axis = known.axis if known is not None else 0
            self.reference_spin.set_frames(layer.data.shape[axis] if layer.ndim >= 3 else 1)
        card = self.card()
        ready = card is not None and layer is not None
        self.panel.set_runnable(ready)
        self.panel.set_runnable(ready and card.is_burst, self.stream_button)
        self.panel.set_runnable(ready and card.is_burst, self.zarr_button)
        self.panel.set_runnable(ready, self.preview_button)
        self._show_window()

    def _frames_changed(self, _value: int) -> None:
        self._show_window()
        self._save_settings()

    def stream_axis(self, layer: Layer) -> int:
        """The frame axis of ``layer``: the Stream widget's choice, else 0."""
        known = WINDOWS.get(layer)
        return known.axis if known is not None else 0

    def window(self, layer: Optional[Layer] = None, centre: Optional[int] = None,
               card: Optional[ModelCard] = None) -> Optional[BurstWindow]:
        """The burst window a burst model restores: ``frames`` frames around ``centre``
        (default: the reference frame), or ``None`` for a layer that is not a stream."""
        layer = layer or self.layer_combo.layer()
        card = card or self.card()
        if layer is None or card is None or not card.is_burst or layer.ndim < 3:
            return None
        axis = self.stream_axis(layer)
        n = int(layer.data.shape[axis])
        fr = card.frames
        size = self.frames_spin.value()
        if size <= 1:   # "model's"
            size = min(max(fr["default"], fr["min"], 2), fr["max"])
        if centre is None:
            centre = self.reference_spin.reference()
            centre = n // 2 if centre is None else centre
        return BurstWindow(n, min(centre, n - 1), min(size, n), axis)

    def _show_window(self, *_: Any) -> None:
        window = self.window()
        if window is None:
            self.window_label.setText("")
            return
        origin = " from Stream" if WINDOWS.get(self.layer_combo.layer()) is not None else ""
        self.window_label.setText(f"window{origin}: {window.describe()}")

    def _on_window_changed(self, layer: Any) -> None:
        known = WINDOWS.get(layer)
        if layer is not unwrap(self.layer_combo.layer()) or known is None:
            return
        self.reference_spin.set_frames(known.n_frames)
        self.reference_spin.setValue(known.centre)
        self.frames_spin.setValue(known.size)
        self._show_window()

    def _on_window_sent(self, request: WindowRequest) -> None:
        if request.target != "restore" or request.viewer is not unwrap(self.viewer):
            return
        request.accepted = True
        self.layer_combo.set_layer(request.layer)
        self._on_window_changed(request.layer)

    # ---- what to run ---------------------------------------------------------------------
    def _request(self, card: ModelCard, layer: Layer,
                 centre: Optional[int] = None) -> dict[str, Any]:
        """:func:`restore_region` keyword arguments for ``layer`` with ``card`` (the window
        around ``centre`` for burst models). Raises InputError for bad choices."""
        kwargs: dict[str, Any] = {"data": layer.data, "model": card,
                                  "device": self.device_combo.currentText()}
        if not card.is_classical:
            kwargs["ensemble"] = self.ensemble()
        window = self.window(layer, centre, card)
        if card.is_burst:
            kwargs["register"] = self.register_check.isChecked()
            if window is None:
                kwargs["reference"] = self.reference_spin.reference()
            else:
                kwargs.update(data=layer_stream(self.viewer, layer, window.axis),
                              start=window.start, stop=window.stop,
                              reference=window.local_reference)
        elif card.task == "sstem":
            kwargs["sections"] = parse_sections(self.sections_edit.text())
            masks = self.masks_combo.layer()
            if masks is not None:
                kwargs["masks"] = masks.data
        return kwargs

    def run(self) -> None:
        """Restore the chosen layer with the chosen model, in the scheduler."""
        card, layer = self.card(), self.layer_combo.layer()
        if card is None or layer is None:
            return
        try:
            kwargs = self._request(card, layer)
        except InputError as exc:
            show_error(str(exc))
            return
        task = Task(f"Restore {layer.name} with {card.id}", restore_region, kwargs)
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
        self.device_label.setText(f"ran on: {prov['device']} ({prov['seconds']:.2f} s)"
                                  + motion_note(prov) + method_note(prov))
        self._pair = (source, out)
        self.side_button.setEnabled(True)

    # ---- whole stream --------------------------------------------------------------------
    def run_stream(self) -> None:
        """Restore every frame of the stream, each from its window, into a movie layer that
        fills as the frames arrive."""
        card, layer = self.card(), self.layer_combo.layer()
        if card is None or layer is None or not card.is_burst:
            return
        if layer.ndim < 3:
            show_error(f"layer {layer.name!r} is not a stream: it has shape "
                       f"{tuple(layer.data.shape)}; whole-stream restore needs (T, Y, X) frames")
            return
        window = self.window(layer, card=card)
        kwargs = {"data": layer_stream(self.viewer, layer, window.axis), "model": card,
                  "window": window.size, "device": self.device_combo.currentText(),
                  "register": self.register_check.isChecked()}
        if not card.is_classical:
            kwargs["ensemble"] = self.ensemble()
        movie = _Movie(self.viewer, layer, card, window.axis, int(layer.data.shape[window.axis]),
                       {key: kwargs[key] for key in ("window", "register", "device", "ensemble")
                        if key in kwargs})
        task = Task(f"Restore the stream {layer.name} with {card.id}",
                    engine_stream.restore_stream, kwargs)
        self.panel.submit(task, movie.finish, on_update=movie.add, on_done=movie.end)

    # ---- whole stream to OME-Zarr ---------------------------------------------------------
    def choose_zarr(self) -> None:
        """Ask for the output folder (new, or an earlier output to resume), then
        :meth:`run_to_zarr`."""
        card, layer = self.card(), self.layer_combo.layer()
        if card is None or layer is None:
            return
        src = layer.metadata.get("source_path")   # beside the input file or folder
        start = Path(src).parent if src else Path.cwd()
        path, _ = QFileDialog.getSaveFileName(
            self, "Restore the whole stream into OME-Zarr",
            str(start / f"{layer.name}_restored_{card.id}.zarr"), "OME-Zarr folder (*.zarr)",
            options=QFileDialog.Option.DontConfirmOverwrite)   # an existing one resumes
        if not path:
            return
        self.run_to_zarr(path if path.lower().endswith(".zarr") else path + ".zarr")

    def run_to_zarr(self, output: str | Path) -> Optional[Job]:
        """Restore every frame of the stream, each from its window, into the OME-Zarr folder
        ``output`` with :func:`engine.batch.run_batch` (resuming an earlier run there), then
        open it lazily as a layer. Bad choices surface as one error notification."""
        card, layer = self.card(), self.layer_combo.layer()
        if card is None or layer is None or not card.is_burst:
            return None
        if layer.ndim < 3:
            show_error(f"layer {layer.name!r} is not a stream: it has shape "
                       f"{tuple(layer.data.shape)}; whole-stream restore needs (T, Y, X) frames")
            return None
        window = self.window(layer, card=card)
        try:
            inputs = self._batch_inputs(layer, window.axis)
        except InputError as exc:
            show_error(str(exc))
            return None
        kwargs = {"inputs": inputs, "output": str(output),
                  "model": card, "device": self.device_combo.currentText(),
                  "workers": self.workers_spin.value(),
                  "block": self.zarr_block_spin.value() or None, "window": window.size,
                  "register": self.register_check.isChecked()}
        if not card.is_classical:
            kwargs["ensemble"] = self.ensemble()
        run = _ZarrRun(self.viewer, layer, card, window.axis, self.panel)
        task = Task(f"Restore the stream {layer.name} with {card.id} into {Path(output).name}",
                    engine_batch.run_batch, kwargs)
        return self.panel.submit(task, run.finish, on_update=run.add, on_done=run.end)

    def _batch_inputs(self, layer: Layer, axis: int) -> Sequence[str] | ImageData:
        """What :func:`engine.batch.run_batch` reads: the file(s) of a layer that is a whole
        (T, Y, X) stream read by this plugin (so Dask workers can open them), else the layer's
        frames along ``axis`` (a lazy view: nothing is read here) with their pixel size."""
        meta = layer.metadata
        path = meta.get("source_path")
        if path and layer.ndim == 3 and axis == 0 and meta.get("axes") in ("TYX", "ZYX"):
            frames = meta.get("frames")
            if meta.get("format") == "tiff-frames" and frames:
                return [str(Path(path) / name) for name in frames]
            return [str(path)]
        yx = [_size_nm(layer.scale[a], layer.units[a]) for a in (-2, -1)]
        calibrated = None not in yx
        return ImageData(layer_stream(self.viewer, layer, axis), "TYX",
                         (1.0, *yx) if calibrated else None, "nm" if calibrated else None,
                         {"layer": layer.name})

    # ---- preview -------------------------------------------------------------------------
    def region_box(self, layer: Layer) -> Box:
        """The data-pixel box (Y, X) of ``layer`` to preview: the selected (else all) shapes
        of the chosen Shapes layer, or the region in view."""
        shapes = self.region_combo.layer()
        if shapes is not None:
            chosen = sorted(shapes.selected_data) or range(len(shapes.data))
            if not len(chosen):
                raise InputError(f"the Shapes layer {shapes.name!r} has no shapes; draw a "
                                 "rectangle or choose 'region in view'")
            world = [shapes.data_to_world(v) for i in chosen for v in shapes.data[i]]
        else:
            if self.viewer.dims.ndisplay != 2:
                raise InputError("preview the region in view in the 2-D view, or draw a "
                                 "rectangle in a Shapes layer")
            camera = self.viewer.scene.camera
            corners = view_corners(camera.center, camera.zoom, self.viewer.canvas.size)
            displayed = list(self.viewer.dims.displayed)
            world = []
            for corner in corners:
                point = np.array(self.viewer.dims.point, float)
                point[displayed] = corner
                world.append(point)
        points = [np.asarray(layer.world_to_data(p))[-2:] for p in world]
        return pixel_box(points, layer.data.shape[-2:])

    def preview(self) -> None:
        """Restore only the region in view (or the shapes) into the preview layer."""
        card, layer = self.card(), self.layer_combo.layer()
        if card is None or layer is None:
            return
        try:
            box = self.region_box(layer)
            kwargs = self._request(card, layer)
        except InputError as exc:
            show_error(str(exc))
            return
        if not card.is_burst and card.task != "sstem" and layer.ndim == 3:
            kwargs["plane"] = current_indices(self.viewer, layer)[0]
        kwargs.update(box=box, margin=self.margin_spin.value())
        task = Task(f"Preview {layer.name} with {card.id}", restore_region, kwargs)
        self.panel.submit(task, lambda res: self._show_preview(layer, card, res, box))

    def _show_preview(self, source: Image, card: ModelCard, res: engine.RestoreResult,
                      box: Box) -> None:
        self._preview = self._put(self._preview, f"{source.name} preview", source, card,
                                  res, box)

    def _put(self, layer: Optional[Image], name: str, source: Image, card: ModelCard,
             res: engine.RestoreResult, box: Optional[Box]) -> Image:
        """Show ``res`` in ``layer`` (replacing its data) or in a new layer, over ``box``."""
        placed = spatial_kwargs(source, res.image.ndim, card.scale)
        if box is not None:
            for ax, start in zip((-2, -1), box.start):
                placed["translate"][ax] += start * float(source.scale[ax])
        metadata = {"provenance": res.provenance, "source_layer": source.name}
        if layer is None or layer not in self.viewer.layers:
            return self.viewer.add_image(res.image, name=name, colormap=source.colormap.name,
                                         metadata=metadata, **placed)
        layer.data = res.image
        layer.scale = placed["scale"]
        layer.translate = placed["translate"]
        layer.metadata = metadata
        layer.reset_contrast_limits()
        return layer

    # ---- live ----------------------------------------------------------------------------
    @property
    def live_job(self) -> Optional[Job]:
        """The last live-mode job."""
        return self._live_life.job

    def _on_step(self, _event: Any = None) -> None:
        if self.live_check.isChecked():
            self._live_timer.start()   # restarted by every move: debounce

    def _live_toggled(self, on: bool) -> None:
        self._save_settings()
        if on:
            self._live_timer.start()
            return
        self._live_timer.stop()
        if self.live_job is not None:
            self.live_job.cancel(quiet=True)
        self.live_label.setText("")

    def live_restore(self) -> None:
        """Restore the window around the frame in view into the live layer (newest wins)."""
        card, layer = self.card(), self.layer_combo.layer()
        if card is None or layer is None or not card.is_burst or layer.ndim < 3:
            return
        centre = current_indices(self.viewer, layer)[self.stream_axis(layer)]
        try:
            kwargs = self._request(card, layer, centre)
        except InputError as exc:
            show_error(str(exc))
            return
        task = Task(f"Live {layer.name} frame {centre} with {card.id}", restore_region, kwargs)
        self.live_label.setText(f"live: frame {centre}...")
        self._live_life.job = self.scheduler.submit(
            task, on_result=self.panel.guard(lambda res: self._show_live(layer, card, res)),
            on_done=self.panel.guard(self._live_done), group=self._live_group)

    def _show_live(self, source: Image, card: ModelCard, res: engine.RestoreResult) -> None:
        self._live = self._put(self._live, f"{source.name} live", source, card, res, None)
        self.live_label.setText(f"live: frame {res.provenance.get('reference', '?')} on "
                                f"{res.provenance['device']} "
                                f"({res.provenance['seconds']:.2f} s)")

    def _live_done(self, job: Job) -> None:
        if job is self.live_job and job.state == "failed":
            self.live_label.setText("live: failed")

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
        if self._pair is not None and any(unwrap(layer) is unwrap(event.value)
                                          for layer in self._pair):
            self.side_button.blockSignals(True)
            self.side_button.setChecked(False)
            self.side_button.blockSignals(False)
            self.side_button.setEnabled(False)
            self._pair = None


def _size_nm(scale: float, unit: Any) -> Optional[float]:
    """A napari layer's pixel size ``scale`` in (pint) ``unit`` as nm, or ``None`` when the
    unit is not a length (napari's default ``pixel``)."""
    try:
        return float(f"{(float(scale) * unit).to('nm').magnitude:.12g}")
    except (TypeError, ValueError, AttributeError):   # pint's DimensionalityError: TypeError
        return None


class _ZarrRun:
    """Follows a whole-stream-to-OME-Zarr run on the GUI thread: blocks written in the status
    line, the output opened lazily as a layer at the end, what a cancel leaves behind."""

    def __init__(self, viewer: napari.Viewer, source: Image, card: ModelCard, axis: int,
                 panel: JobPanel) -> None:
        self.viewer = viewer
        self.source = source
        self.card = card
        self.axis = axis
        self.panel = panel
        self.blocks: list[engine_batch.BlockDone] = []
        self.layer: Optional[Image] = None

    def add(self, done: Any) -> None:
        """One :class:`~napari_microrestore.engine.batch.BlockDone`: say how far the run is."""
        if isinstance(done, engine_batch.BlockDone):
            self.blocks.append(done)
            self.panel.status.setText(f"block {done.done}/{done.total} written")

    def finish(self, summary: engine_batch.BatchSummary) -> None:
        """Open the output lazily as a layer over the input, with the batch provenance; blocks
        that failed (after retries) are left NaN and reported."""
        [(data, kwargs, _)] = read_layers(summary.output)
        meta = kwargs["metadata"]
        prov = {**meta.get("microrestore", {}).get("provenance", {}),
                "operation": "restore stream to OME-Zarr", "output": summary.output,
                "source": source_info(self.source), "partial": not summary.complete,
                "blocks": {"total": summary.blocks_total, "done": summary.blocks_done,
                           "skipped": summary.blocks_skipped,
                           "failed": [f.index for f in summary.failures]}}
        placed = spatial_kwargs(self.source, 3, axes=[self.axis, self.source.ndim - 2,
                                                      self.source.ndim - 1])
        self.layer = self.viewer.add_image(
            data, name=kwargs["name"], colormap=self.source.colormap.name,
            metadata={**meta, "provenance": prov, "source_layer": self.source.name}, **placed)
        if summary.failures:
            first = summary.failures[0]
            show_error(f"{len(summary.failures)} of {summary.blocks_total} blocks of "
                       f"{Path(summary.output).name} failed (block {first.index}: "
                       f"{first.reason}); run it again to retry them")

    def end(self, job: Job) -> None:
        """After a cancel: the blocks written stay recorded, and a re-run resumes."""
        if job.state == "cancelled":
            self.panel.status.setText(
                f"cancelled after {len(self.blocks)} block{'s' if len(self.blocks) != 1 else ''}"
                ", which stay recorded: run the same output again to resume")


class _Movie:
    """The layer that a whole-stream restore fills frame by frame (GUI thread only)."""

    def __init__(self, viewer: napari.Viewer, source: Image, card: ModelCard, axis: int,
                 n_frames: int, parameters: dict[str, Any]) -> None:
        self.viewer = viewer
        self.source = source
        self.card = card
        self.axis = axis
        self.n_frames = n_frames
        self.layer: Optional[Image] = None
        self.done: list[int] = []
        self.provenance: dict[str, Any] = {
            "operation": "restore stream", "model": card.id, "task": card.task,
            "weights_sha256": (card.weights or {}).get("sha256"), "parameters": parameters,
            "source": source_info(source), "partial": True, "frames_done": self.done}

    def add(self, frame: Any) -> None:
        """Put one :class:`~napari_microrestore.engine.stream.StreamFrame` into the layer."""
        if not isinstance(frame, engine_stream.StreamFrame):
            return
        if self.layer is None:
            data = np.full((self.n_frames,) + frame.image.shape, np.nan, np.float32)
            lo, hi = float(np.min(frame.image)), float(np.max(frame.image))
            placed = spatial_kwargs(self.source, 3, axes=[self.axis, self.source.ndim - 2,
                                                          self.source.ndim - 1])
            self.layer = self.viewer.add_image(
                data, name=f"{self.source.name} restored stream ({self.card.id})",
                colormap=self.source.colormap.name, contrast_limits=(lo, hi if hi > lo else lo + 1),
                metadata={"provenance": self.provenance, "source_layer": self.source.name},
                **placed)
        self.layer.data[frame.index] = frame.image
        self.done.append(int(frame.index))
        self.layer.refresh()

    def finish(self, res: engine_stream.StreamResult) -> None:
        """The whole stream is done: the engine's provenance replaces the partial one."""
        if self.layer is None:
            return
        self.layer.data[res.indices] = res.images
        self.provenance = {**res.provenance, "source": source_info(self.source),
                           "partial": False, "frames_done": sorted(res.indices)}
        self.layer.metadata = {**self.layer.metadata, "provenance": self.provenance}
        self.layer.refresh()

    def end(self, job: Job) -> None:
        """A run that did not finish keeps its frames, marked as partial."""
        if self.layer is not None and job.state != "done":
            self.provenance["frames_done"] = sorted(self.done)
            self.provenance["ended"] = job.state
