"""The Register, Restore and Compare widgets driven as a user would, in a real viewer (Xvfb):
choose layers and values, click, wait for the scheduler, check the new layers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.layers import Labels  # noqa: E402
from napari.utils.notifications import NotificationSeverity  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402

from napari_microrestore._napari._widgets import (  # noqa: E402
    CompareWidget,
    RegisterWidget,
    RestoreWidget,
)
from napari_microrestore._napari.scheduler import available_devices  # noqa: E402
from napari_microrestore.core import degrade, metrics, probes, registration  # noqa: E402
from napari_microrestore.core.errors import check_cancel, report  # noqa: E402
from napari_microrestore.models.zoo import PACKAGE_ZOO, list_cards  # noqa: E402

pytestmark = pytest.mark.gui

SCALE = (1.0, 2.5, 2.5)          # frames, nm, nm
TRANSLATE = (0.0, 10.0, 20.0)
WAIT = 30000                     # ms; the CPU may be shared


@pytest.fixture(scope="module")
def burst():
    rng = np.random.default_rng(7)
    scene = probes.make_probe("spots-lines", (200, 200), rng=rng) * 100 + 10
    return degrade.simulate_burst(scene, 5, shape=(96, 96), blur_length=6, dose=40, rng=rng)


def add_burst(viewer, frames, name="burst"):
    return viewer.add_image(frames.copy(), name=name, scale=SCALE, translate=TRANSLATE,
                            units=("pixel", "nm", "nm"), axis_labels=("t", "y", "x"))


def dock(viewer, widget):
    viewer.window.add_dock_widget(widget)
    return widget


def click(qtbot, button):
    assert button.isEnabled(), f"{button.text()!r} is disabled"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def units(layer):
    return [str(u) for u in layer.units]


def test_widget_modules_do_not_import_torch():
    code = ("import sys, napari_microrestore._napari._widgets; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# Register
# --------------------------------------------------------------------------------------------
def test_register_adds_registered_stack_and_coverage(make_napari_viewer, qtbot, burst, notes):
    viewer = make_napari_viewer()
    src = add_burst(viewer, burst.frames)
    w = dock(viewer, RegisterWidget(viewer))
    assert w.layer_combo.layer() is src
    assert w.reference_spin.maximum() == 4 and w.reference_spin.reference() is None
    w.motion_combo.setCurrentText("translation")
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: "burst registered coverage" in viewer.layers, timeout=WAIT)

    out = viewer.layers["burst registered"]
    np.testing.assert_array_equal(src.data, burst.frames)        # input untouched
    assert out.data.shape == burst.frames.shape and out.data.dtype == np.float32
    np.testing.assert_allclose(out.scale, SCALE)
    np.testing.assert_allclose(out.translate, TRANSLATE)
    assert units(out)[1:] == ["nanometer", "nanometer"]
    reg = out.metadata["registration"]
    assert reg["reference"] == burst.reference and reg["motion"] == "translation"
    assert len(reg["transforms"]) == 5 and len(reg["ecc"]) == 5 and all(reg["converged"])
    np.testing.assert_allclose(np.array(reg["shifts"]), burst.shifts, atol=0.5)
    prov = out.metadata["provenance"]
    assert prov["parameters"] == {"reference": None, "motion": "translation"}
    assert prov["command"] == "microrestore register IN -o OUT --motion translation"
    assert prov["source"]["layer"] == "burst" and prov["source"]["shape"] == [5, 96, 96]
    # the aligned frames agree with the reference frame better than the raw ones
    cov = viewer.layers["burst registered coverage"]
    assert isinstance(cov, Labels) and cov.data.shape == (96, 96) and cov.contour == 2
    inside = cov.data.astype(bool)
    assert 0.5 * inside.size < inside.sum() < inside.size   # the frames moved: not all covered
    np.testing.assert_allclose(cov.scale, SCALE[1:])
    np.testing.assert_allclose(cov.translate, TRANSLATE[1:])
    ref = burst.frames[burst.reference]
    for t in range(5):
        if t != burst.reference:
            assert (metrics.pcc(out.data[t], ref, mask=inside)
                    > metrics.pcc(burst.frames[t], ref, mask=inside))
    assert w.panel.status.text().startswith("done") and w.panel.run_button.isEnabled()
    assert notes == []

    # another reference frame, another motion model
    w.reference_spin.setValue(0)
    w.motion_combo.setCurrentText("euclidean")
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: len(viewer.layers) == 5, timeout=WAIT)
    again = viewer.layers[3]
    assert again.metadata["registration"]["reference"] == 0
    assert again.metadata["registration"]["motion"] == "euclidean"
    assert again.metadata["provenance"]["command"].endswith("--motion euclidean --reference 0")


def test_register_a_2d_layer_notifies_and_adds_nothing(make_napari_viewer, qtbot, burst, notes):
    viewer = make_napari_viewer()
    viewer.add_image(burst.frames[0], name="one frame")
    w = dock(viewer, RegisterWidget(viewer))
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert w.panel.job.state == "failed" and len(viewer.layers) == 1
    assert len(notes) == 1 and notes[0][0] == NotificationSeverity.ERROR
    assert "3-D" in notes[0][1] and "(96, 96)" in notes[0][1]


# --------------------------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------------------------
def test_restore_model_picker_shows_cards_and_refreshes(make_napari_viewer, qtbot, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("MICRORESTORE_MODELS", str(tmp_path))
    viewer = make_napari_viewer()
    w = dock(viewer, RestoreWidget(viewer))
    listed = [w.model_combo.itemData(i).id for i in range(w.model_combo.count())]
    assert listed == [c.id for c in list_cards()]
    assert {"registered-mean", "tem-burst-fast"} <= set(listed)

    w.set_model("tem-burst-fast")
    card = w.card()
    text = w.card_view.toPlainText()
    psnr = card.metrics["values"]["psnr"]
    for expected in ("task: burst-deblur", "2-9 frames", "sstem/isbi2012_train_volume.tif",
                     f"psnr {psnr:.4g}"[:9], card.metrics["command"]):
        assert expected in text
    tooltip = w.model_combo.itemData(w.model_combo.currentIndex(), Qt.ItemDataRole.ToolTipRole)
    assert tooltip == text
    assert w.reference_spin.isEnabled() and w.register_check.isChecked()

    # a user's new model appears on refresh; the chosen model stays chosen
    card_yaml = (PACKAGE_ZOO / "registered-mean.yaml").read_text()
    (tmp_path / "my-mean.yaml").write_text(card_yaml.replace("id: registered-mean",
                                                             "id: my-mean"))
    assert "my-mean" not in [w.model_combo.itemData(i).id for i in range(w.model_combo.count())]
    click(qtbot, w.refresh_button)
    ids = [w.model_combo.itemData(i).id for i in range(w.model_combo.count())]
    assert "my-mean" in ids and w.card().id == "tem-burst-fast"
    w.set_model("my-mean")
    assert "your model" in w.card_view.toPlainText()

    # the device list arrives from the scheduler
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)
    devices = [w.device_combo.itemText(i) for i in range(w.device_combo.count())]
    assert devices == available_devices() and w.device_combo.currentText() == "auto"


@pytest.mark.parametrize("model_id", ["registered-mean", "tem-burst-fast"])
def test_restore_a_burst_adds_a_layer_with_provenance(make_napari_viewer, qtbot, burst, notes,
                                                      model_id):
    from napari_microrestore.engine import compute_process
    from napari_microrestore.engine.restore import resolve_device, restore

    viewer = make_napari_viewer()
    src = add_burst(viewer, burst.frames)
    w = dock(viewer, RestoreWidget(viewer))
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)
    w.set_model(model_id)
    assert w.layer_combo.layer() is src
    calls = compute_process.shared().calls
    click(qtbot, w.panel.run_button)
    name = f"burst restored ({model_id})"
    qtbot.waitUntil(lambda: name in viewer.layers, timeout=WAIT)

    out = viewer.layers[name]
    np.testing.assert_array_equal(src.data, burst.frames)        # input untouched
    assert out.data.shape == (96, 96) and out.data.dtype == np.float32
    np.testing.assert_allclose(out.scale, SCALE[1:])
    np.testing.assert_allclose(out.translate, TRANSLATE[1:])
    assert units(out) == ["nanometer", "nanometer"]
    prov = out.metadata["provenance"]
    expected_device = "cpu" if model_id == "registered-mean" else resolve_device("auto")
    assert prov["model"] == model_id and prov["device"] == expected_device
    assert prov["reference"] == burst.reference == 2        # "middle" = T // 2
    assert len(prov["registration"]["transforms"]) == 5
    assert w.device_label.text().startswith(f"ran on: {expected_device}")
    if model_id != "registered-mean":  # the direction the engine read from the registration
        import re

        angle = re.search(r"stage motion (\d+) deg", w.device_label.text())
        assert angle and 80 <= int(angle.group(1)) <= 100  # along the columns
    # on the CPU the engine ran in the compute process (a main thread), not in the worker
    assert compute_process.shared().calls == calls + (expected_device == "cpu")
    # the widget's action replays headless through the engine with the same parameters
    replay = restore(burst.frames, model_id, device="auto", **{
        k: prov["parameters"][k] for k in ("reference", "register", "motion")}).image
    np.testing.assert_allclose(out.data, replay, rtol=1e-4, atol=1e-3 * np.ptp(replay))
    # and it restores: closer to the truth than the reference frame it is aligned to
    mask = registration.coverage_mask(np.array(prov["registration"]["transforms"]), (96, 96))
    gain = [metrics.compare(img, burst.ground_truth, fit=True, border=12, mask=mask)["psnr"]
            for img in (out.data, burst.frames[burst.reference])]
    assert gain[0] > gain[1] + 1
    assert notes == []

    # side by side: the output moves right by the input's width (+5 %), and back
    click(qtbot, w.side_button)
    assert out.translate[-1] == pytest.approx(TRANSLATE[-1] + 1.05 * 96 * SCALE[-1])
    assert out.translate[-2] == pytest.approx(TRANSLATE[-2])
    click(qtbot, w.side_button)
    assert out.translate[-1] == pytest.approx(TRANSLATE[-1])
    viewer.layers.remove(out)
    assert not w.side_button.isEnabled()


def test_method_note_says_what_a_classical_method_did(burst):
    from napari_microrestore._napari._widgets.restore import method_note
    from napari_microrestore.engine.restore import restore

    assert method_note({"model": "tem-burst-fast"}) == ""   # learned models: no PSF
    for model in ("richardson-lucy", "wiener"):
        info = restore(burst.frames, model, device="cpu").provenance["method"]
        note = method_note({"method": info})
        if info["deconvolved"]:
            assert f"{info['blur_length']:.1f} px blur at {info['blur_angle']:.0f} deg" in note
            assert ("5 iterations" in note) == (model == "richardson-lucy")
            assert ("balance" in note) == (model == "wiener")
        else:
            assert "not deconvolved" in note
    assert "not deconvolved" in method_note({"method": {
        "deconvolved": False, "note": "no motion blur of at least 4 px measured: the "
                                      "registered mean, not deconvolved"}})


def test_restore_cancel_mid_run(make_napari_viewer, qtbot, burst, notes, monkeypatch):
    """A slow fake engine that honours the cancel token: Cancel stops it, no layer comes."""
    from napari_microrestore.engine import restore as engine

    stopped = threading.Event()
    called: dict = {}

    def slow_restore(data, model, *, progress=None, cancel=None, **kwargs):
        called.update(kwargs, model=model.id, shape=data.shape)
        try:
            for i in range(500):
                check_cancel(cancel)
                time.sleep(0.01)
                report(progress, (i + 1) / 500, f"tile {i + 1}/500")
        finally:
            stopped.set()
        raise AssertionError("not cancelled")

    monkeypatch.setattr(engine, "restore", slow_restore)
    viewer = make_napari_viewer()
    add_burst(viewer, burst.frames)
    w = dock(viewer, RestoreWidget(viewer))
    w.set_model("registered-mean")
    w.reference_spin.setValue(1)
    w.register_check.setChecked(False)
    click(qtbot, w.panel.run_button)
    assert not w.panel.run_button.isEnabled() and w.panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: w.panel.progress_bar.value() > 0, timeout=WAIT)
    assert w.panel.status.text().startswith("tile ")
    click(qtbot, w.panel.cancel_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert stopped.is_set() and w.panel.job.state == "cancelled"
    assert called["model"] == "registered-mean" and called["shape"] == (5, 96, 96)
    assert called["reference"] == 1 and called["register"] is False
    assert [la.name for la in viewer.layers] == ["burst"]
    assert w.panel.run_button.isEnabled() and not w.panel.cancel_button.isEnabled()
    assert w.panel.progress_bar.value() == 0 and w.panel.status.text() == "cancelled"
    assert (NotificationSeverity.INFO, "Restore burst with registered-mean: cancelled") in notes
    assert not any(sev == NotificationSeverity.ERROR for sev, _ in notes)
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)


def test_restore_sr2x_output_has_half_the_pixel_size(make_napari_viewer, qtbot, tmp_path,
                                                     monkeypatch):
    """A 2x model's output tiles the input: pixel size / 2, grid shifted by -1/4 input px."""
    from napari_microrestore.engine import restore as engine

    monkeypatch.setenv("MICRORESTORE_MODELS", str(tmp_path))
    (tmp_path / "fake-sr.yaml").write_text(
        "id: fake-sr\ntask: sr2x\narchitecture: rrdb\ninput: {scale: 2}\n"
        f"weights: {{file: fake-sr.safetensors, sha256: '{'0' * 64}'}}\n")

    def fake_restore(data, model, **kwargs):
        big = np.kron(np.asarray(data, np.float32), np.ones((2, 2), np.float32))
        return engine.RestoreResult(big, {"model": model.id, "device": "cpu", "seconds": 0.0})

    monkeypatch.setattr(engine, "restore", fake_restore)
    viewer = make_napari_viewer()
    image = np.arange(12 * 16, dtype=np.float32).reshape(12, 16)
    viewer.add_image(image, name="img", scale=(2.5, 2.5), translate=(10, 20),
                     units=("nm", "nm"))
    w = dock(viewer, RestoreWidget(viewer))
    w.set_model("fake-sr")
    assert not w.reference_spin.isEnabled() and not w.register_check.isEnabled()
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: "img restored (fake-sr)" in viewer.layers, timeout=WAIT)
    out = viewer.layers["img restored (fake-sr)"]
    assert out.data.shape == (24, 32)
    np.testing.assert_allclose(out.scale, (1.25, 1.25))
    np.testing.assert_allclose(out.translate, (10 - 0.625, 20 - 0.625))
    # both layers span the same world extent (pixel edges), so they overlay exactly
    for layer in (viewer.layers["img"], out):
        lo = np.asarray(layer.translate) - 0.5 * np.asarray(layer.scale)
        np.testing.assert_allclose(lo, (10 - 1.25, 20 - 1.25))
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)


def test_restore_self_ensemble_choices_reach_the_engine(make_napari_viewer, qtbot, monkeypatch):
    """The self-ensemble combo offers what the model takes (flips only for burst nets, none for
    classical methods), is passed to restore(), remembered, and named in the status line."""
    from napari_microrestore._napari._widgets.restore import method_note
    from napari_microrestore.engine import restore as engine

    seen = []

    def fake_restore(data, model, **kwargs):
        seen.append(kwargs.get("ensemble"))
        name = kwargs.get("ensemble") or "none"
        tiling = {"ensemble": {"name": name, "members": 8}} if name != "none" else {}
        return engine.RestoreResult(np.array(data, np.float32),
                                    {"model": model.id, "device": "cpu", "seconds": 0.0,
                                     "tiling": tiling})

    monkeypatch.setattr(engine, "restore", fake_restore)
    viewer = make_napari_viewer()
    viewer.add_image(np.ones((24, 24), np.float32), name="img")
    w = dock(viewer, RestoreWidget(viewer))

    def choices():
        return [w.ensemble_combo.itemData(i) for i in range(w.ensemble_combo.count())]

    w.set_model("tem-burst-fast")
    assert choices() == ["none", "flips"] and w.ensemble_combo.isEnabled()
    w.set_model("registered-mean")
    assert choices() == ["none"] and not w.ensemble_combo.isEnabled()
    w.set_model("zstack-defocus")
    assert choices() == ["none", "flips", "dihedral"]
    w.set_ensemble("dihedral")
    assert w.ensemble() == "dihedral" and w.settings.get("ensemble", "") == "dihedral"
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: "img restored (zstack-defocus)" in viewer.layers, timeout=WAIT)
    assert seen == ["dihedral"]
    assert "self-ensemble dihedral (8 passes)" in w.device_label.text()
    assert method_note({"tiling": {"tile": 1024}}) == ""
    # a burst net cannot take transposes: back to off, and a classical method gets no option
    w.set_model("tem-burst-fast")
    assert w.ensemble() == "none"
    w.set_ensemble("flips")
    w.set_model("tem-burst")
    assert w.ensemble() == "flips"
    w.set_model("registered-mean")
    assert "ensemble" not in w._request(w.card(), viewer.layers["img"])
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)


def test_restore_2d_layer_with_a_burst_model_notifies_and_adds_nothing(make_napari_viewer,
                                                                       qtbot, burst, notes):
    viewer = make_napari_viewer()
    viewer.add_image(burst.frames[0], name="one frame")
    w = dock(viewer, RestoreWidget(viewer))
    w.set_model("tem-burst-fast")
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: w.panel.job.done and w.device_job.done, timeout=WAIT)
    assert w.panel.job.state == "failed" and w.panel.status.text() == "failed"
    assert [la.name for la in viewer.layers] == ["one frame"]
    errors = [msg for sev, msg in notes if sev == NotificationSeverity.ERROR]
    assert len(errors) == 1 and "3-D" in errors[0] and "(96, 96)" in errors[0]


# --------------------------------------------------------------------------------------------
# Compare
# --------------------------------------------------------------------------------------------
def test_compare_scores_against_a_reference_and_without(make_napari_viewer, qtbot, notes):
    rng = np.random.default_rng(3)
    truth = (probes.make_probe("spots-lines", (80, 80), rng=rng) * 100 + 10).astype(np.float32)
    low = truth + rng.normal(0, 2, truth.shape).astype(np.float32)
    high = 0.5 * truth + 7 + rng.normal(0, 8, truth.shape).astype(np.float32)
    stack = np.stack([high, low, high])
    viewer = make_napari_viewer()
    kw = {"scale": SCALE[1:], "translate": TRANSLATE[1:], "units": ("nm", "nm")}
    ref_layer = viewer.add_image(truth, name="truth", **kw)
    low_layer = viewer.add_image(low, name="low", **kw)
    high_layer = viewer.add_image(high, name="high", **kw)
    stack_layer = viewer.add_image(stack, name="stack", units=("pixel", "nm", "nm"))
    viewer.add_labels(np.zeros((80, 80), np.uint8), name="not an image", **kw)
    w = dock(viewer, CompareWidget(viewer))
    assert w.reference() is None
    names = [w.layer_list.item(i).text() for i in range(w.layer_list.count())]
    assert names == ["truth", "low", "high", "stack"]
    assert not w.panel.run_button.isEnabled()          # nothing checked yet

    # against the reference, after the gain + offset fit
    w.reference_combo.set_layer(ref_layer)
    w.set_checked([low_layer, high_layer, stack_layer])
    viewer.dims.set_current_step(0, 1)                 # the stack shows its plane 1 (= low)
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: bool(w.scores), timeout=WAIT)
    assert list(w.scores) == ["low", "high", "stack"]
    for name, img in (("low", low), ("high", high), ("stack", low)):
        want = metrics.compare(img, truth, fit=True)
        for k, v in want.items():
            assert w.scores[name][k] == pytest.approx(v, rel=1e-9)
    assert w.scores["low"]["psnr"] > w.scores["high"]["psnr"] + 5
    headers = [w.table.horizontalHeaderItem(c).text() for c in range(w.table.columnCount())]
    assert headers == ["PSNR (dB)", "SSIM", "PCC", "gain", "offset"]
    assert w.table.rowCount() == 3 and w.table.verticalHeaderItem(1).text() == "high"
    assert w.table.item(0, 0).text() == f"{w.scores['low']['psnr']:.2f}"

    # without the fit, the gain-0.5 image scores worse
    fitted = w.scores["high"]["psnr"]
    w.fit_check.setChecked(False)
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: "gain" not in w.scores["high"], timeout=WAIT)
    assert w.scores["high"]["psnr"] == pytest.approx(metrics.psnr(high, truth))
    assert w.scores["high"]["psnr"] < fitted - 3
    assert w.table.columnCount() == 3

    # no reference: noise, sharpness, SNR
    w.reference_combo.set_layer(None)
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: "noise" in w.scores["low"], timeout=WAIT)
    for name, img in (("low", low), ("high", high)):
        want = metrics.no_reference(img)
        assert w.scores[name] == pytest.approx(want)
    assert w.scores["high"]["noise"] > 2 * w.scores["low"]["noise"]
    headers = [w.table.horizontalHeaderItem(c).text() for c in range(w.table.columnCount())]
    assert headers == ["noise (std)", "sharpness (1/px)", "SNR"]
    assert not w.diff_button.isEnabled()               # a difference needs a reference
    assert notes == []


def test_compare_difference_layers(make_napari_viewer, qtbot, notes):
    rng = np.random.default_rng(4)
    truth = rng.random((40, 50)).astype(np.float32) * 100 + 20
    est = truth + rng.normal(0, 3, truth.shape).astype(np.float32)
    viewer = make_napari_viewer()
    ref_layer = viewer.add_image(truth, name="truth", scale=(2.5, 2.5), units=("nm", "nm"))
    est_layer = viewer.add_image(est.astype(np.uint16), name="est")
    small = viewer.add_image(truth[:20], name="small")
    w = dock(viewer, CompareWidget(viewer))
    w.reference_combo.set_layer(ref_layer)
    w.set_checked([est_layer])
    click(qtbot, w.diff_button)
    qtbot.waitUntil(lambda: "est - truth" in viewer.layers, timeout=WAIT)
    diff = viewer.layers["est - truth"]
    np.testing.assert_allclose(diff.data, est.astype(np.uint16).astype(np.float32) - truth,
                               atol=1e-4)
    assert diff.data.dtype == np.float32
    lim = float(np.abs(diff.data).max())
    assert tuple(diff.contrast_limits) == pytest.approx((-lim, lim))
    np.testing.assert_allclose(diff.scale, (2.5, 2.5))
    assert units(diff) == ["nanometer", "nanometer"]
    np.testing.assert_array_equal(est_layer.data, est.astype(np.uint16))   # inputs untouched

    # shapes that differ: one clear error, no layer
    n = len(viewer.layers)
    w.set_checked([small])
    click(qtbot, w.diff_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert len(viewer.layers) == n and w.panel.job.state == "failed"
    errors = [msg for sev, msg in notes if sev == NotificationSeverity.ERROR]
    assert len(errors) == 1 and "(20, 50)" in errors[0] and "(40, 50)" in errors[0]
