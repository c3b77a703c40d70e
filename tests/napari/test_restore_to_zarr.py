"""The Restore widget's "Whole stream to OME-Zarr..." (engine.batch.run_batch from napari),
driven as a user would (Xvfb, real viewer): an in-memory and a file-backed stream restored into
OME-Zarr and opened lazily, equal to the engine's batch and to the in-memory "Whole stream";
cancel mid-run then resume; bad output paths and missing Dask as one error, nothing written."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

pytest.importorskip("napari")
zarr = pytest.importorskip("zarr")

from napari.utils.notifications import NotificationSeverity  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtWidgets import QFileDialog  # noqa: E402

from napari_microrestore._napari._reader import read_layers  # noqa: E402
from napari_microrestore._napari._widgets import RestoreWidget  # noqa: E402
from napari_microrestore.core import degrade, io, probes  # noqa: E402
from napari_microrestore.core.errors import check_cancel  # noqa: E402
from napari_microrestore.engine import batch  # noqa: E402

pytestmark = pytest.mark.gui
WAIT = 30000
SCALE = (1.0, 2.5, 2.5)
TRANSLATE = (0.0, 10.0, 20.0)
MODEL = "registered-mean"


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(5)
    scene = probes.make_probe("spots-lines", (160, 160), rng=rng) * 100 + 10
    bursts = [degrade.simulate_burst(scene, 4, shape=(40, 40), blur_length=3, dose=60,
                                     rng=rng).frames for _ in range(2)]
    return np.concatenate(bursts).astype(np.float32)          # (8, 40, 40)


def make_widget(viewer, qtbot, frames=3, block=3):
    w = RestoreWidget(viewer)
    viewer.window.add_dock_widget(w)
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)
    w.set_model(MODEL)
    w.frames_spin.setValue(frames)
    w.zarr_block_spin.setValue(block)
    return w


def errors(notes):
    return [msg for sev, msg in notes if sev == NotificationSeverity.ERROR]


def engine_zarr(inputs, out, **kw):
    """The reference: the engine's batch in this process, read back whole."""
    s = batch.run_batch(inputs, out, MODEL, workers=0, window=3, **kw)
    assert s.complete and not s.failures
    return zarr.open_array(str(out / "0"), mode="r")[...]


def test_in_memory_stream_to_zarr_equals_engine_and_whole_stream(make_napari_viewer, qtbot,
                                                                  stream, tmp_path, notes,
                                                                  monkeypatch):
    viewer = make_napari_viewer()
    src = viewer.add_image(stream.copy(), name="stream", scale=SCALE, translate=TRANSLATE,
                           units=("pixel", "nm", "nm"))
    w = make_widget(viewer, qtbot)
    assert w.zarr_button.isEnabled()
    statuses: list[str] = []
    set_text = w.panel.status.setText
    monkeypatch.setattr(w.panel.status, "setText", lambda t: (statuses.append(t), set_text(t)))
    out = tmp_path / "movie.zarr"
    job = w.run_to_zarr(out)
    assert job.task.func is batch.run_batch
    assert isinstance(job.task.kwargs["inputs"], io.ImageData)   # no file: the frames
    qtbot.waitUntil(lambda: job.done, timeout=WAIT)
    assert job.state == "done" and errors(notes) == []
    assert [t for t in statuses if t.endswith(" written")] == [
        "block 1/3 written", "block 2/3 written", "block 3/3 written"]
    layer = viewer.layers["movie"]
    assert isinstance(layer.data, zarr.Array)                     # opened lazily
    got = np.asarray(layer.data[...])
    assert got.dtype == np.float32 and not np.isnan(got).any()

    # the engine's batch on the same frames
    np.testing.assert_array_equal(got, engine_zarr(io.ImageData(stream, "TYX", None, None),
                                                   tmp_path / "engine.zarr", block=3))
    # the in-memory "Whole stream" of the same model and window
    w.stream_button.click()
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    movie = viewer.layers[f"stream restored stream ({MODEL})"]
    np.testing.assert_allclose(got, movie.data, rtol=1e-5, atol=1e-3)

    np.testing.assert_allclose(layer.scale, SCALE)
    np.testing.assert_allclose(layer.translate, TRANSLATE)
    img = io.read(out)                                            # calibrated from the layer
    assert img.pixel_size == (1.0, 2.5, 2.5) and img.unit == "nm"
    prov = layer.metadata["provenance"]
    assert prov["model"] == MODEL and prov["parameters"]["window"] == 3
    assert prov["operation"] == "restore stream to OME-Zarr" and prov["partial"] is False
    assert prov["blocks"] == {"total": 3, "done": 3, "skipped": 0, "failed": []}
    assert prov["source"]["layer"] == "stream" and prov["output"] == str(out)
    assert layer.metadata["source_path"] == str(out)
    np.testing.assert_array_equal(src.data, stream)               # input untouched


def test_file_backed_stream_passes_its_path_and_dask_needs_the_extra(
        make_napari_viewer, qtbot, stream, tmp_path, notes, monkeypatch):
    path = tmp_path / "stream.tif"
    io.write_tiff(path, stream, axes="TYX", pixel_size=(1.0, 0.8, 0.8), unit="nm")
    viewer = make_napari_viewer()
    [(data, kwargs, _)] = read_layers(str(path))
    viewer.add_image(data, **kwargs)
    w = make_widget(viewer, qtbot, block=0)                       # auto: one block here

    # Dask workers without the [batch] extra: one error naming it, nothing written
    monkeypatch.setitem(sys.modules, "distributed", None)
    w.workers_spin.setValue(2)
    job = w.run_to_zarr(tmp_path / "dask.zarr")
    qtbot.waitUntil(lambda: job.done, timeout=WAIT)
    assert job.state == "failed" and len(errors(notes)) == 1
    assert "napari-microrestore[batch]" in errors(notes)[0]
    assert not (tmp_path / "dask.zarr").exists()
    monkeypatch.undo()

    w.workers_spin.setValue(0)
    job = w.run_to_zarr(tmp_path / "out.zarr")
    assert job.task.kwargs["inputs"] == [str(path)]               # workers can open it
    qtbot.waitUntil(lambda: job.done, timeout=WAIT)
    assert job.state == "done" and len(errors(notes)) == 1
    layer = viewer.layers["out"]
    np.testing.assert_array_equal(np.asarray(layer.data[...]),
                                  engine_zarr([path], tmp_path / "ref.zarr"))
    np.testing.assert_allclose(layer.scale, (1.0, 0.8, 0.8))
    assert layer.metadata["provenance"]["source"]["source_path"] == str(path)
    assert layer.metadata["provenance"]["parameters"]["block"] == 16  # auto


def test_cancel_mid_run_then_resume_equals_an_uninterrupted_run(make_napari_viewer, qtbot,
                                                                 stream, tmp_path, notes,
                                                                 monkeypatch):
    """Blocks of 2 frames: the first is restored, the second waits for Cancel; a second run
    skips the recorded block and gives what one uninterrupted run gives."""
    real = batch.restore_block
    hold = threading.Event()
    hold.set()
    calls: list[int] = []

    def held_after_one(job, block, cancel=None):
        calls.append(block.index)
        while len(calls) > 1 and hold.is_set():
            check_cancel(cancel)
            threading.Event().wait(0.01)
        return real(job, block, cancel)

    monkeypatch.setattr(batch, "restore_block", held_after_one)
    viewer = make_napari_viewer()
    viewer.add_image(stream.copy(), name="stream")
    w = make_widget(viewer, qtbot, block=2)
    out = tmp_path / "resumed.zarr"
    job = w.run_to_zarr(out)
    qtbot.waitUntil(lambda: len(calls) == 2, timeout=WAIT)
    # the worker's progress reaches the GUI as a queued signal: wait for it, do not race it
    qtbot.waitUntil(lambda: w.panel.status.text() == "block 1/4 written", timeout=WAIT)
    qtbot.mouseClick(w.panel.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: job.done, timeout=WAIT)
    assert job.state == "cancelled" and "resumed" not in viewer.layers
    assert "stay recorded" in w.panel.status.text() and "resume" in w.panel.status.text()
    assert sorted(p.name for p in (out / ".microrestore" / "blocks").iterdir()) == [
        "0000000.json"]

    hold.clear()                                                   # the next run goes through
    job = w.run_to_zarr(out)
    qtbot.waitUntil(lambda: job.done, timeout=WAIT)
    assert job.state == "done" and errors(notes) == []
    layer = viewer.layers["resumed"]
    assert layer.metadata["provenance"]["blocks"] == {"total": 4, "done": 3, "skipped": 1,
                                                      "failed": []}
    np.testing.assert_array_equal(np.asarray(layer.data[...]),
                                  engine_zarr(io.ImageData(stream, "TYX", None, None),
                                              tmp_path / "whole.zarr", block=2))


def test_bad_output_paths_are_one_error_and_nothing_written(make_napari_viewer, qtbot, stream,
                                                           tmp_path, notes, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(stream.copy(), name="stream")
    w = make_widget(viewer, qtbot)
    tmp_path = tmp_path / "outputs"          # apart from the widget's settings file
    other = tmp_path / "other.zarr"
    other.mkdir(parents=True)
    (other / "keep.txt").write_text("not ours")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [(tmp_path / "out.tif", "ending in .zarr"),
             (tmp_path / "missing" / "out.zarr", "does not exist"),
             (other, "not a microrestore batch output")]
    for k, (path, match) in enumerate(cases, 1):
        job = w.run_to_zarr(path)
        qtbot.waitUntil(lambda job=job: job.done, timeout=WAIT)
        assert job.state == "failed" and len(errors(notes)) == k and match in errors(notes)[-1]
    # an in-memory stream cannot go to Dask workers: said before anything is written
    w.workers_spin.setValue(1)
    job = w.run_to_zarr(tmp_path / "dask.zarr")
    qtbot.waitUntil(lambda: job.done, timeout=WAIT)
    assert "in this process" in errors(notes)[-1] and len(errors(notes)) == 4
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert "dask" not in " ".join(layer.name for layer in viewer.layers)

    # the dialog: a name without the suffix gets ".zarr"; cancelling it runs nothing
    asked: list = []
    monkeypatch.setattr(w, "run_to_zarr", asked.append)
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(tmp_path / "picked"), "")))
    w.zarr_button.click()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: ("", "")))
    w.zarr_button.click()
    assert asked == [str(tmp_path / "picked") + ".zarr"]


def test_a_learned_model_to_zarr_takes_the_self_ensemble(make_napari_viewer, qtbot, stream,
                                                         tmp_path, notes):
    viewer = make_napari_viewer()
    viewer.add_image(stream, name="stream")
    w = make_widget(viewer, qtbot)
    w.set_model("tem-burst-fast")
    w.set_ensemble("flips")
    job = w.run_to_zarr(tmp_path / "out.zarr")
    assert job.task.kwargs["ensemble"] == "flips"
    qtbot.waitUntil(lambda: job.done, timeout=WAIT)
    assert job.state == "done" and errors(notes) == []
    layer = viewer.layers["out"]
    assert layer.metadata["provenance"]["parameters"]["ensemble"] == "flips"
    s = batch.run_batch(io.ImageData(stream, "TYX", None, None), tmp_path / "ref.zarr",
                        "tem-burst-fast", workers=0, window=3, block=3, device="cpu",
                        ensemble="flips")
    assert s.complete
    ref = zarr.open_array(str(tmp_path / "ref.zarr" / "0"), mode="r")[...]
    np.testing.assert_allclose(np.asarray(layer.data[...]), ref, rtol=0,
                               atol=1e-3 * float(np.abs(ref).max()))
