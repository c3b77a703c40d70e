"""The Restore widget's stream features driven as a user would (Xvfb, real viewer): whole-stream
restore into a progressively filled movie layer (and cancel mid-stream), quick preview of the
region in view or of a drawn rectangle, live mode (newest request wins), ssTEM sections and
masks, persisted choices, and jobs cancelled when the viewer closes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import NotificationSeverity  # noqa: E402
from qtpy.QtCore import QSettings, Qt  # noqa: E402

from napari_microrestore._napari._geometry import pixel_box, view_corners  # noqa: E402
from napari_microrestore._napari._widgets import RestoreWidget  # noqa: E402
from napari_microrestore._napari._widgets.restore import parse_sections  # noqa: E402
from napari_microrestore._napari.scheduler import Scheduler  # noqa: E402
from napari_microrestore.core import degrade, probes  # noqa: E402
from napari_microrestore.core.errors import InputError, check_cancel  # noqa: E402
from napari_microrestore.engine import restore as engine  # noqa: E402
from napari_microrestore.engine import stream as engine_stream  # noqa: E402

pytestmark = pytest.mark.gui
WAIT = 30000
SCALE = (1.0, 2.5, 2.5)
TRANSLATE = (0.0, 10.0, 20.0)


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(5)
    scene = probes.make_probe("spots-lines", (160, 160), rng=rng) * 100 + 10
    bursts = [degrade.simulate_burst(scene, 4, shape=(48, 48), blur_length=3, dose=60,
                                     rng=rng).frames for _ in range(2)]
    return np.concatenate(bursts).astype(np.float32)          # (8, 48, 48)


class RecordingScheduler(Scheduler):
    """A scheduler that remembers every job it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list = []

    def submit(self, task, *args, **kwargs):
        job = super().submit(task, *args, **kwargs)
        self.submitted.append(job)
        return job


def add_stream(viewer, frames, name="stream"):
    return viewer.add_image(frames.copy(), name=name, scale=SCALE, translate=TRANSLATE,
                            units=("pixel", "nm", "nm"))


def make_widget(viewer, qtbot, scheduler=None, model="registered-mean"):
    w = RestoreWidget(viewer, scheduler=scheduler)
    viewer.window.add_dock_widget(w)
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)
    w.set_model(model)
    return w


def click(qtbot, button):
    assert button.isEnabled(), f"{button.text()!r} is disabled"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def errors(notes):
    return [msg for sev, msg in notes if sev == NotificationSeverity.ERROR]


# --------------------------------------------------------------------------------------------
# whole stream
# --------------------------------------------------------------------------------------------
def test_whole_stream_fills_a_movie_layer_progressively(make_napari_viewer, qtbot, stream,
                                                        notes):
    viewer = make_napari_viewer()
    src = add_stream(viewer, stream)
    w = make_widget(viewer, qtbot)
    w.frames_spin.setValue(3)
    seen: list = []      # (NaN frames, job done) when the movie layer appears

    def inserted(event):
        if "restored stream" in event.value.name:
            seen.append((int(np.isnan(event.value.data).all(axis=(1, 2)).sum()),
                         w.panel.job.done))

    viewer.layers.events.inserted.connect(inserted)
    click(qtbot, w.stream_button)
    name = "stream restored stream (registered-mean)"
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert w.panel.job.state == "done" and errors(notes) == []
    movie = viewer.layers[name]
    assert seen == [(8, False)]            # allocated once, while the stream was running
    want = engine_stream.restore_stream(stream, "registered-mean", window=3)
    np.testing.assert_allclose(movie.data, want.images, rtol=1e-5, atol=1e-3)
    assert movie.data.dtype == np.float32 and not np.isnan(movie.data).any()
    np.testing.assert_allclose(movie.scale, SCALE)
    np.testing.assert_allclose(movie.translate, TRANSLATE)
    prov = movie.metadata["provenance"]
    assert prov["partial"] is False and prov["frames_done"] == list(range(8))
    assert prov["window"] == 3 and prov["indices"] == list(range(8))
    assert [f["frames_used"] for f in prov["per_frame"]][:2] == [[0, 1, 2], [0, 1, 2]]
    assert prov["source"]["layer"] == "stream"
    np.testing.assert_array_equal(src.data, stream)             # input untouched


def test_whole_stream_with_a_self_ensemble(make_napari_viewer, qtbot, stream, notes):
    viewer = make_napari_viewer()
    add_stream(viewer, stream)
    w = make_widget(viewer, qtbot, model="tem-burst-fast")
    w.frames_spin.setValue(3)
    w.set_ensemble("flips")
    click(qtbot, w.stream_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert w.panel.job.state == "done" and errors(notes) == []
    movie = viewer.layers["stream restored stream (tem-burst-fast)"]
    want = engine_stream.restore_stream(stream, "tem-burst-fast", window=3, device="cpu",
                                        ensemble="flips")
    np.testing.assert_allclose(movie.data, want.images, rtol=1e-4, atol=1e-3)
    assert movie.metadata["provenance"]["parameters"]["ensemble"] == "flips"


def test_whole_stream_cancel_keeps_the_frames_done(make_napari_viewer, qtbot, stream, notes,
                                                   monkeypatch):
    """The per-window restore is fast for two frames, then waits for Cancel."""
    real = engine_stream.restore
    calls: list[int] = []
    stopped = threading.Event()

    def slow_after_two(data, model, *, cancel=None, **kwargs):
        calls.append(kwargs["reference"])
        if len(calls) > 2:
            try:
                for _ in range(1000):
                    check_cancel(cancel)
                    time.sleep(0.01)
            finally:
                stopped.set()
        return real(data, model, cancel=cancel, **kwargs)

    monkeypatch.setattr(engine_stream, "restore", slow_after_two)
    viewer = make_napari_viewer()
    add_stream(viewer, stream)
    w = make_widget(viewer, qtbot)
    w.frames_spin.setValue(3)
    click(qtbot, w.stream_button)
    name = "stream restored stream (registered-mean)"
    qtbot.waitUntil(lambda: name in viewer.layers
                    and len(viewer.layers[name].metadata["provenance"]["frames_done"]) == 2,
                    timeout=WAIT)
    click(qtbot, w.panel.cancel_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert stopped.is_set() and w.panel.job.state == "cancelled"
    movie = viewer.layers[name]
    prov = movie.metadata["provenance"]
    assert prov["partial"] is True and prov["frames_done"] == [0, 1]
    assert prov["ended"] == "cancelled" and prov["model"] == "registered-mean"
    assert not np.isnan(movie.data[:2]).any() and np.isnan(movie.data[2:]).all()
    want = engine.restore(stream[:3], "registered-mean", reference=1)
    np.testing.assert_allclose(movie.data[1], want.image, rtol=1e-5, atol=1e-3)
    assert errors(notes) == []


def test_whole_stream_needs_a_burst_model(make_napari_viewer, qtbot, stream):
    viewer = make_napari_viewer()
    add_stream(viewer, stream)
    w = make_widget(viewer, qtbot, model="sstem-restore")
    assert not w.stream_button.isEnabled() and not w.live_check.isEnabled()
    w.set_model("wiener")
    assert w.stream_button.isEnabled()


# --------------------------------------------------------------------------------------------
# preview
# --------------------------------------------------------------------------------------------
def test_preview_of_the_region_in_view_and_of_a_rectangle(make_napari_viewer, qtbot, stream,
                                                          notes):
    viewer = make_napari_viewer()
    src = add_stream(viewer, stream)
    w = make_widget(viewer, qtbot)
    w.register_check.setChecked(False)        # the mean of the frames: exact crops to compare
    w.margin_spin.setValue(4)
    camera = viewer.scene.camera
    camera.center = (0.0, TRANSLATE[1] + 20 * 2.5, TRANSLATE[2] + 30 * 2.5)   # pixel (20, 30)
    camera.zoom = 1.0 * max(viewer.canvas.size) / (16 * 2.5)                # ~16 px wide
    corners = view_corners(camera.center, camera.zoom, viewer.canvas.size)
    box = pixel_box((corners - np.array(TRANSLATE[1:])) / 2.5, (48, 48))
    assert 0 < box.shape[0] * box.shape[1] < 48 * 48 / 2      # a part of the frame
    click(qtbot, w.preview_button)
    qtbot.waitUntil(lambda: "stream preview" in viewer.layers, timeout=WAIT)
    out = viewer.layers["stream preview"]
    full = engine.restore(stream[2:7], "registered-mean", register=False).image
    assert out.data.shape == box.shape
    np.testing.assert_allclose(out.data, full[box.slices], rtol=1e-5)
    np.testing.assert_allclose(out.scale, SCALE[1:])
    np.testing.assert_allclose(out.translate, (TRANSLATE[1] + box.y0 * 2.5,
                                               TRANSLATE[2] + box.x0 * 2.5))
    region = out.metadata["provenance"]["region"]
    assert region["box"] == box.to_list() and region["margin"] == 4
    assert out.metadata["provenance"]["stream_window"] == {"start": 2, "stop": 7}

    # a drawn rectangle (world coordinates) replaces the preview, same layer
    shapes = viewer.add_shapes([[TRANSLATE[1] + 5 * 2.5, TRANSLATE[2] + 8 * 2.5],
                                [TRANSLATE[1] + 14 * 2.5, TRANSLATE[2] + 40 * 2.5]],
                               shape_type="rectangle", name="roi")
    w.region_combo.set_layer(shapes)
    n_layers = len(viewer.layers)
    click(qtbot, w.preview_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert len(viewer.layers) == n_layers and viewer.layers["stream preview"] is out
    assert out.data.shape == (10, 33)
    np.testing.assert_allclose(out.data, full[5:15, 8:41], rtol=1e-5)
    np.testing.assert_allclose(out.translate, (TRANSLATE[1] + 5 * 2.5, TRANSLATE[2] + 8 * 2.5))
    np.testing.assert_array_equal(src.data, stream)

    # a rectangle off the image: one clear error, nothing changes
    shapes.data = [np.array([[500.0, 500.0], [600.0, 600.0]])]
    click(qtbot, w.preview_button)
    assert len(errors(notes)) == 1 and "does not overlap" in errors(notes)[0]
    assert out.data.shape == (10, 33)


# --------------------------------------------------------------------------------------------
# live
# --------------------------------------------------------------------------------------------
def test_live_mode_newest_request_wins(make_napari_viewer, qtbot, stream, notes, monkeypatch):
    """A slow fake engine that honours its cancel token: each slider move cancels the job
    before it; only the last frame's restoration reaches the live layer."""
    def slow_restore(data, model, *, reference=None, cancel=None, progress=None, **kwargs):
        for _ in range(40):
            check_cancel(cancel)
            time.sleep(0.01)
        frames = np.asarray(data, np.float32)
        return engine.RestoreResult(frames[reference].copy(), {
            "model": model.id, "device": "cpu", "seconds": 0.4, "reference": reference,
            "frames_used": list(range(len(frames)))})

    monkeypatch.setattr(engine, "restore", slow_restore)
    viewer = make_napari_viewer()
    add_stream(viewer, stream)
    scheduler = RecordingScheduler()
    w = make_widget(viewer, qtbot, scheduler)
    w.frames_spin.setValue(3)
    w.live_check.setChecked(True)
    qtbot.waitUntil(lambda: len(scheduler.submitted) == 2, timeout=WAIT)   # devices + frame 0
    # quick moves inside the debounce time make one request
    for step in (1, 2):
        viewer.dims.set_current_step(0, step)
    qtbot.waitUntil(lambda: len(scheduler.submitted) == 3, timeout=WAIT)
    for step in (4, 6):
        qtbot.wait(120)
        viewer.dims.set_current_step(0, step)
    qtbot.waitUntil(lambda: len(scheduler.submitted) == 5 and scheduler.submitted[-1].done,
                    timeout=WAIT)
    live = scheduler.submitted[1:]
    assert [job.task.name for job in live] == [
        f"Live stream frame {t} with registered-mean" for t in (3, 2, 4, 6)]
    assert [job.state for job in live] == ["cancelled"] * 3 + ["done"]
    out = viewer.layers["stream live"]
    np.testing.assert_array_equal(out.data, stream[6])     # frame 6 is 2nd of frames 5-7
    assert out.metadata["provenance"]["reference"] == 6
    assert out.metadata["provenance"]["stream_window"] == {"start": 5, "stop": 8}
    np.testing.assert_allclose(out.translate, TRANSLATE[1:])
    assert w.live_label.text().startswith("live: frame 6")
    assert notes == []                                     # replaced jobs go quietly

    # turning live off cancels the running request and stops following the slider
    viewer.dims.set_current_step(0, 3)
    qtbot.waitUntil(lambda: len(scheduler.submitted) == 6, timeout=WAIT)
    w.live_check.setChecked(False)
    qtbot.waitUntil(lambda: scheduler.submitted[-1].done, timeout=WAIT)
    assert scheduler.submitted[-1].state == "cancelled"
    viewer.dims.set_current_step(0, 5)
    qtbot.wait(150)
    assert len(scheduler.submitted) == 6
    np.testing.assert_array_equal(out.data, stream[6])


def test_jobs_end_with_their_widget_and_viewer(make_napari_viewer, qtbot, stream,
                                              monkeypatch):
    """A destroyed widget (as when Qt deletes the closed window's children) cancels its Run
    and live jobs, not the jobs of another widget; closing the viewer cancels the rest."""
    stopped: list[str] = []

    def endless(data, model, *, cancel=None, device=None, **kwargs):
        try:
            while True:
                check_cancel(cancel)
                time.sleep(0.01)
        finally:
            stopped.append(device)

    monkeypatch.setattr(engine, "restore", endless)
    viewer = make_napari_viewer()
    add_stream(viewer, stream)
    scheduler = RecordingScheduler()
    first = make_widget(viewer, qtbot, scheduler)
    other = make_widget(viewer, qtbot, scheduler)
    other.device_combo.setCurrentText("cpu")         # tells its job from the first's
    click(qtbot, other.panel.run_button)
    click(qtbot, first.panel.run_button)
    first.live_check.setChecked(True)
    qtbot.waitUntil(lambda: len(scheduler.submitted) == 5, timeout=WAIT)
    jobs = scheduler.submitted[2:]                  # other's run, first's run, first's live
    first.deleteLater()
    qtbot.waitUntil(lambda: jobs[1].done and jobs[2].done, timeout=WAIT)
    assert [job.state for job in jobs[1:]] == ["cancelled", "cancelled"]
    qtbot.wait(100)
    assert not jobs[0].done
    viewer.close()
    qtbot.waitUntil(lambda: jobs[0].done, timeout=WAIT)
    assert jobs[0].state == "cancelled" and "cpu" in stopped   # its compute stopped too


# --------------------------------------------------------------------------------------------
# ssTEM
# --------------------------------------------------------------------------------------------
def test_parse_sections():
    assert parse_sections("auto") is None and parse_sections("  ") is None
    assert parse_sections("7, 3; 3") == [3, 7]
    with pytest.raises(InputError, match="'3, x'"):
        parse_sections("3, x")


def test_sstem_sections_and_masks_from_a_labels_layer(make_napari_viewer, qtbot, notes):
    rng = np.random.default_rng(2)
    stack = (rng.random((5, 32, 32)) * 50 + 100).astype(np.float32)
    stack[1] = 0.0                                    # a missing section
    labels = np.zeros((5, 32, 32), np.uint8)
    labels[3, 8:20, 10:24] = 2                        # a fold in section 3
    viewer = make_napari_viewer()
    src = viewer.add_image(stack.copy(), name="sections")
    masks = viewer.add_labels(labels, name="folds")
    w = make_widget(viewer, qtbot, model="sstem-restore")
    assert w.sections_edit.isEnabled() and w.masks_combo.isEnabled()
    assert not w.frames_spin.isEnabled()
    w.layer_combo.set_layer(src)
    w.masks_combo.set_layer(masks)
    assert w.sections_edit.text() == "auto"
    click(qtbot, w.panel.run_button)
    name = "sections restored (sstem-restore)"
    qtbot.waitUntil(lambda: name in viewer.layers, timeout=WAIT)
    out = viewer.layers[name]
    prov = out.metadata["provenance"]
    assert prov["sections"] == [1, 3] and prov["mask_source"] == {"1": "missing", "3": "given"}
    want = engine.restore(stack, "sstem-restore", masks=labels > 0, device="cpu").image
    np.testing.assert_allclose(out.data, want, rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(out.data[[0, 2, 4]], stack[[0, 2, 4]])   # untouched ones

    # sections named by the user; a bad entry is one clear error and no job
    w.sections_edit.setText("2")
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: w.panel.job.done and len(viewer.layers) == 4, timeout=WAIT)
    assert viewer.layers[-1].metadata["provenance"]["sections"] == [2]
    job = w.panel.job
    w.sections_edit.setText("2, two")
    click(qtbot, w.panel.run_button)
    assert w.panel.job is job and "'2, two'" in errors(notes)[-1]
    # masks of another shape: the engine says so
    w.sections_edit.setText("auto")
    small = viewer.add_labels(labels[:3], name="small")
    w.masks_combo.set_layer(small)
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert w.panel.job.state == "failed" and "artefact masks" in errors(notes)[-1]
    np.testing.assert_array_equal(masks.data, labels)      # inputs untouched


# --------------------------------------------------------------------------------------------
# persistence
# --------------------------------------------------------------------------------------------
def test_choices_persist_and_stale_values_are_ignored(make_napari_viewer, qtbot, stream,
                                                      own_settings):
    viewer = make_napari_viewer()
    add_stream(viewer, stream)
    w = make_widget(viewer, qtbot, model="wiener")
    w.frames_spin.setValue(4)
    w.margin_spin.setValue(10)
    w.register_check.setChecked(False)
    w.device_combo.setCurrentText("cpu")
    again = RestoreWidget(viewer)
    viewer.window.add_dock_widget(again)
    qtbot.waitUntil(lambda: again.device_job.done, timeout=WAIT)
    assert again.card().id == "wiener" and again.frames_spin.value() == 4
    assert again.margin_spin.value() == 10 and not again.register_check.isChecked()
    assert again.device_combo.currentText() == "cpu" and not again.live_check.isChecked()

    # a model that is gone, a device that is not here, values of the wrong type
    settings = QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope,
                         "napari-microrestore", "restore")
    settings.setValue("model", "no-such-model")
    settings.setValue("device", "cuda:7")
    settings.setValue("frames", "many")
    settings.setValue("register", "perhaps")
    settings.sync()
    stale = RestoreWidget(viewer)
    viewer.window.add_dock_widget(stale)
    qtbot.waitUntil(lambda: stale.device_job.done, timeout=WAIT)
    assert stale.card() is not None and stale.frames_spin.value() == 1
    assert stale.device_combo.currentText() == "auto" and stale.register_check.isChecked()
