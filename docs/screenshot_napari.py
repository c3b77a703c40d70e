"""Screenshots of the whole napari workflow, made on the plugin's sample data only.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot_napari.py
    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot_napari.py --only probes

Each step opens a fresh napari window, loads a sample through File > Open Sample
(``viewer.open_sample("napari-microrestore", ...)``), opens the plugin's dock widgets through
the plugin menu's path (``add_plugin_dock_widget``) and drives them as a user would: it sets
their controls, clicks their buttons and waits (processing Qt events) for the jobs that the
real scheduler runs in worker threads. It then arranges the layers and saves one PNG per step
into ``docs/images/`` (or ``--out DIR``):

* ``napari_stream.png``: the TEM burst sample, the Stream widget's 5-frame window, and the
  Register widget's registered stack with its coverage contour;
* ``napari_restore.png``: Restore with ``tem-burst`` on the CPU, side by side with the input;
* ``napari_compare.png``: Compare table of the input frame, the registered mean and the
  ``tem-burst`` restoration against the sample's ground truth;
* ``napari_probes.png``: Probes: a ``siemens-star`` degraded like the sample burst and
  restored by ``tem-burst-fast``, with its metrics and invented-structure readout;
* ``napari_finetune.png``: Fine-tune: a short self-supervised fine-tune of ``tem-burst-fast``
  on the sample burst, with its loss plot and holdout preview;
* ``napari_sstem.png``: the ssTEM sample restored by ``sstem-restore`` with its artefact
  Labels layer as masks, side by side.

Every step prints what it took and the numbers the README captions quote. A step that fails
(e.g. a widget that does not load) is reported and skipped; the others still run, and the
exit status is then 1. The widgets' persisted choices and the user's model folder are pointed
at a temporary folder, so the run neither reads nor changes the user's settings.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import notification_manager
from PIL import Image
from qtpy.QtCore import QSettings
from qtpy.QtWidgets import QApplication

import napari
from napari_microrestore.core.io import write_bytes

PLUGIN = "napari-microrestore"
WINDOW = (1400, 850)          # window size in px (the screenshots' size)
MAX_BYTES = 250_000           # keep each PNG small enough for the README
JOB_TIMEOUT = 300.0           # seconds a single job may take before the step gives up
FINETUNE_BUDGET = 40.0        # seconds of fine-tuning for the Fine-tune screenshot


class StepFailed(RuntimeError):
    """A step could not finish (a job failed or timed out, a widget did not load)."""


# --------------------------------------------------------------------------------------------
# driving napari
# --------------------------------------------------------------------------------------------
_errors: list[str] = []


def _record(event: Any) -> None:
    """Keep napari's error notifications (the scheduler's way to report a failed job)."""
    if str(event.severity).lower().endswith("error"):
        _errors.append(str(event.message))


def settle(seconds: float = 0.5) -> None:
    """Process Qt events for ``seconds`` (layouts, redraws, queued signals)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def wait_until(done: Callable[[], bool], what: str, timeout: float = JOB_TIMEOUT) -> None:
    """Process Qt events until ``done()`` is true; StepFailed after ``timeout`` seconds."""
    end = time.perf_counter() + timeout
    while not done():
        if time.perf_counter() > end:
            raise StepFailed(f"{what} did not finish in {timeout:.0f} s")
        QApplication.processEvents()
        time.sleep(0.02)


def click_and_wait(panel: Any, button: Any, what: str, timeout: float = JOB_TIMEOUT) -> Any:
    """Click ``button`` of a widget's JobPanel and wait for the job it starts; the job."""
    before = panel.job
    n_errors = len(_errors)
    button.click()
    wait_until(lambda: panel.job is not before and panel.job.done, what, timeout)
    settle(0.3)
    job = panel.job
    if job.state != "done":
        why = "; ".join(_errors[n_errors:]) or job.state
        raise StepFailed(f"{what}: {why}")
    print(f"  {what}: {job.seconds:.1f} s")
    return job


def new_viewer() -> napari.Viewer:
    """A fresh napari window of the screenshot size."""
    viewer = napari.Viewer(title="napari-microrestore")
    viewer.window._qt_window.resize(*WINDOW)
    settle(0.3)
    return viewer


_docks: dict[int, Any] = {}   # id(widget) -> the QDockWidget napari put it in


def dock(viewer: napari.Viewer, name: str) -> Any:
    """Open the plugin's dock widget ``name`` (as Plugins > MicroRestore > name does)."""
    dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    _docks[id(widget)] = dock_widget
    settle(0.2)
    return widget


def undock(viewer: napari.Viewer, widget: Any) -> None:
    """Close a dock widget opened by :func:`dock`, making room for the others."""
    viewer.window.remove_dock_widget(_docks.pop(id(widget)))
    settle(0.2)


def wait_devices(widget: Any) -> None:
    """Wait for the widget's device list, then choose the CPU (reproducible timings)."""
    wait_until(lambda: widget.device_job.done, "listing devices", 60)
    settle(0.1)
    widget.device_combo.setCurrentText("cpu")


def show_only(viewer: napari.Viewer, names: list[str]) -> None:
    """Make exactly the layers ``names`` visible."""
    for layer in viewer.layers:
        layer.visible = layer.name in names


def stretch(layer: Any, plane: Any = None, low: float = 0.1, high: float = 99.9) -> None:
    """Contrast limits at percentiles of ``plane`` (default the layer's data): noisy counts
    otherwise show as a flat grey between their extreme pixels."""
    data = np.asarray(layer.data if plane is None else plane, np.float32)
    lo, hi = np.nanpercentile(data, [low, high])
    layer.contrast_limits = (float(lo), float(hi if hi > lo else lo + 1))


def layer_named(viewer: napari.Viewer, start: str) -> Any:
    """The layer whose name starts with ``start``."""
    for layer in viewer.layers:
        if layer.name.startswith(start):
            return layer
    raise StepFailed(f"no layer named {start!r}...; layers: {[la.name for la in viewer.layers]}")


def _smaller(shot: Image.Image) -> Iterator[Image.Image]:
    """The screenshot, then versions with fewer colours, then smaller (noisy data compresses
    badly), until one fits MAX_BYTES."""
    yield shot
    for colours in (256, 128, 64):
        yield shot.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    for factor in (0.85, 0.7):
        size = (round(shot.width * factor), round(shot.height * factor))
        yield shot.resize(size, Image.Resampling.LANCZOS).quantize(
            128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def shoot(viewer: napari.Viewer, path: Path) -> None:
    """Save the whole window as a PNG of at most MAX_BYTES (fewer colours if needed)."""
    settle(1.0)
    shot = Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).convert("RGB")
    data = b""
    for image in _smaller(shot):
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
        if len(data) <= MAX_BYTES:
            break
    shot = image
    write_bytes(path, data)
    print(f"  wrote {path} ({shot.width}x{shot.height}, {len(data) / 1000:.0f} kB)")


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------
def step_stream(viewer: napari.Viewer) -> None:
    """TEM burst sample, Stream window of 5 frames around frame 3, registered to it."""
    viewer.open_sample(PLUGIN, "tem-burst")
    burst = viewer.layers["TEM burst"]
    stretch(burst, burst.data[3])
    viewer.dims.set_current_step(0, 3)
    stream = dock(viewer, "Stream")
    register = dock(viewer, "Register")
    stream.layer_combo.set_layer(burst)
    stream.follow_check.setChecked(True)
    stream.size_spin.setValue(5)
    stream.register_button.click()          # hands the window to the Register widget
    settle(0.2)
    print(f"  Stream: {stream.frames_label.text()}; Register: {register.window_label.text()}")
    register.motion_combo.setCurrentText("translation")
    click_and_wait(register.panel, register.panel.run_button, "register 5 frames")
    registered = viewer.layers["TEM burst registered"]
    reg = registered.metadata["registration"]
    shifts = np.abs(np.asarray(reg["shifts"], float)).max()
    covered = viewer.layers["TEM burst registered coverage"].data.astype(bool).mean()
    print(f"  largest shift {shifts:.1f} px; every frame covers {100 * covered:.0f} % of the "
          f"reference frame; ECC {min(reg['ecc']):.3f}-{max(reg['ecc']):.3f}")
    stretch(registered, registered.data[0])
    show_only(viewer, ["TEM burst registered", "TEM burst registered coverage"])
    viewer.layers.selection.active = registered
    viewer.reset_view()
    viewer.dims.set_current_step(0, 3)


def _restore(viewer: napari.Viewer, widget: Any, source: Any, model: str) -> Any:
    """Run ``model`` on ``source`` in the Restore widget; the new layer."""
    widget.set_model(model)
    widget.layer_combo.set_layer(source)
    job = click_and_wait(widget.panel, widget.panel.run_button, f"restore with {model}")
    out = viewer.layers[-1]
    used = out.metadata["provenance"].get("frames_used")
    print(f"  {widget.device_label.text()} (the whole job {job.seconds:.1f} s)"
          + (f"; frames {used}" if used is not None else ""))
    return out


def step_restore(viewer: napari.Viewer) -> None:
    """tem-burst on the CPU through the Restore widget, side by side with its input."""
    viewer.open_sample(PLUGIN, "tem-burst")
    burst = viewer.layers["TEM burst"]
    restore = dock(viewer, "Restore")
    wait_devices(restore)
    out = _restore(viewer, restore, burst, "tem-burst")
    restore.side_button.click()
    stretch(burst, burst.data[3])
    stretch(out)
    show_only(viewer, [burst.name, out.name])
    viewer.dims.set_current_step(0, 3)
    viewer.layers.selection.active = out
    viewer.reset_view()


def step_compare(viewer: napari.Viewer) -> None:
    """Input frame, registered mean and tem-burst scored against the ground truth."""
    viewer.open_sample(PLUGIN, "tem-burst")
    burst = viewer.layers["TEM burst"]
    truth = viewer.layers["TEM burst ground truth"]
    viewer.dims.set_current_step(0, 3)      # the reference frame: the field of the truth
    restore = dock(viewer, "Restore")
    wait_devices(restore)
    mean = _restore(viewer, restore, burst, "registered-mean")
    net = _restore(viewer, restore, burst, "tem-burst")
    undock(viewer, restore)
    compare = dock(viewer, "Compare")
    compare.reference_combo.set_layer(truth)
    compare.set_checked([burst, mean, net])
    compare.fit_check.setChecked(True)
    click_and_wait(compare.panel, compare.panel.run_button, "score 3 layers")
    for name, s in compare.scores.items():
        print(f"  {name}: PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.3f}, PCC {s['pcc']:.3f}")
    for layer in (burst, mean, net, truth):
        stretch(layer, burst.data[3] if layer is burst else None)
    show_only(viewer, [truth.name, burst.name, mean.name, net.name])
    viewer.canvas.grid.enabled = True
    viewer.canvas.grid.shape = (2, 2)
    viewer.reset_view()


def step_probes(viewer: napari.Viewer) -> None:
    """A siemens star degraded like the sample burst, restored by tem-burst-fast."""
    viewer.open_sample(PLUGIN, "tem-burst")
    burst = viewer.layers["TEM burst"]
    probes = dock(viewer, "Probes")
    wait_devices(probes)
    probes.pattern_combo.setCurrentText("siemens-star")
    probes.size_spin.setValue(256)
    probes.seed_spin.setValue(0)
    probes.like_combo.set_layer(burst)
    probes.set_model("tem-burst-fast")
    click_and_wait(probes.panel, probes.panel.run_button, "probe tem-burst-fast")
    res = probes.result
    est = res.estimate or {}
    print(f"  measured on the burst: blur {est.get('blur_length', float('nan')):.1f} px at "
          f"{est.get('blur_angle', float('nan')):.0f} deg, dose {est.get('dose') or 0:.1f} "
          "counts/px")
    for row in ("degraded", "restored"):
        m, inv = res.metrics[row], res.invented[row]
        print(f"  {row}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, invented "
              f"{inv['score']:.3f}")
    print(f"  readout: {probes.readout.text()!r}")
    reference = res.provenance["parameters"]["reference"]
    print(f"  {res.provenance['parameters']['n_frames']} frames; showing the scored one, "
          f"{reference}")
    made = [la for la in viewer.layers if la.name.startswith("siemens-star")]
    for layer in made:
        stretch(layer)
    show_only(viewer, [la.name for la in made])
    viewer.dims.set_current_step(0, reference)
    viewer.layers.selection.active = made[-1]
    viewer.reset_view()


def step_finetune(viewer: napari.Viewer) -> None:
    """A short self-supervised fine-tune of tem-burst-fast on the sample burst."""
    viewer.open_sample(PLUGIN, "tem-burst")
    burst = viewer.layers["TEM burst"]
    truth = viewer.layers["TEM burst ground truth"]
    finetune = dock(viewer, "Fine-tune")
    wait_devices(finetune)
    finetune.set_model("tem-burst-fast")
    finetune.layer_combo.set_layer(burst)
    finetune.set_mode("self-supervised")
    finetune.clean_combo.set_layer(truth)     # scores the holdout crop only (self-supervised)
    finetune.preset_combo.setCurrentText("CPU quick")
    finetune.budget_spin.setValue(FINETUNE_BUDGET)
    finetune.patch_spin.setValue(64)          # more, smaller steps in a short budget
    click_and_wait(finetune.panel, finetune.panel.run_button,
                   f"fine-tune tem-burst-fast for {FINETUNE_BUDGET:.0f} s",
                   timeout=FINETUNE_BUDGET + JOB_TIMEOUT)
    res = finetune.result
    print(f"  {finetune.score_label.text()}")
    print(f"  {res.steps} steps, {len(finetune.plot.losses)} losses plotted, "
          f"holdout {res.holdout}")
    preview = finetune.preview_layer
    viewer.dims.set_current_step(0, 3)
    stretch(burst, burst.data[3])
    stretch(preview)
    show_only(viewer, [burst.name, preview.name])
    viewer.layers.selection.active = preview
    # zoom in on the holdout crop, keeping the view inside the frame
    viewer.reset_view()
    camera = viewer.scene.camera
    camera.zoom *= 1.3
    y, x, h, w = res.holdout
    sy, sx = (float(s) for s in burst.scale[-2:])
    ny, nx = burst.data.shape[-2:]
    half_h, half_w = (n / 2 / camera.zoom for n in viewer.canvas.size)
    camera.center = (_inside((y + h / 2) * sy, half_h, ny * sy),
                     _inside((x + w / 2) * sx, half_w, nx * sx))


def _inside(centre: float, half: float, extent: float) -> float:
    """``centre`` moved so that ``[centre - half, centre + half]`` stays in ``[0, extent]``
    (the middle when the view is larger)."""
    if 2 * half >= extent:
        return extent / 2
    return float(np.clip(centre, half, extent - half))


def step_sstem(viewer: napari.Viewer) -> None:
    """The ssTEM sample restored by sstem-restore with its artefact labels as masks."""
    viewer.open_sample(PLUGIN, "sstem-stack")
    stack = viewer.layers["ssTEM stack"]
    labels = viewer.layers["ssTEM artefacts"]
    restore = dock(viewer, "Restore")
    wait_devices(restore)
    restore.set_model("sstem-restore")
    restore.masks_combo.set_layer(labels)
    restore.sections_edit.setText("auto")
    out = _restore(viewer, restore, stack, "sstem-restore")
    print(f"  sections restored: {out.metadata['provenance'].get('sections')}")
    restore.side_button.click()
    section = 6                              # the fold
    stretch(stack, stack.data[section])
    out.contrast_limits = stack.contrast_limits
    labels.contour = 2
    show_only(viewer, [stack.name, labels.name, out.name])
    viewer.dims.set_current_step(0, section)
    viewer.layers.selection.active = out
    viewer.reset_view()


STEPS: dict[str, tuple[str, Callable[[napari.Viewer], None]]] = {
    "stream": ("napari_stream.png", step_stream),
    "restore": ("napari_restore.png", step_restore),
    "compare": ("napari_compare.png", step_compare),
    "probes": ("napari_probes.png", step_probes),
    "finetune": ("napari_finetune.png", step_finetune),
    "sstem": ("napari_sstem.png", step_sstem),
}


def run_steps(names: list[str], out: Path, scratch: str) -> list[str]:
    """Make the screenshots ``names`` in ``out``, with settings and user models in
    ``scratch``; the names of the steps that failed."""
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, scratch)
    os.environ["MICRORESTORE_MODELS"] = scratch   # only the shipped zoo in the pickers
    notification_manager.notification_ready.connect(_record)
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    for name in names:
        filename, step = STEPS[name]
        print(f"{name}:")
        t0 = time.perf_counter()
        viewer = new_viewer()
        try:
            step(viewer)
            shoot(viewer, out / filename)
        except Exception as exc:  # noqa: BLE001 (a failing step must not cost the others)
            skipped.append(name)
            print(f"  SKIPPED {filename}: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            viewer.close()
            settle(0.2)
        print(f"  {name} took {time.perf_counter() - t0:.1f} s")
    return skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=list(STEPS), action="append",
                        help="make only this screenshot (may be repeated)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "images",
                        help="folder for the PNGs (default: docs/images)")
    args = parser.parse_args(argv)

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="microrestore-screenshots-") as scratch:
        skipped = run_steps(args.only or list(STEPS), args.out, scratch)
    print(f"all steps took {time.perf_counter() - t_all:.1f} s")
    if skipped:
        print(f"skipped: {', '.join(skipped)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
