"""The Probes widget driven as a user would: pattern, degradation, model, Run; Cancel; errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import NotificationSeverity  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402

from napari_microrestore._napari._widgets import ProbesWidget  # noqa: E402
from napari_microrestore.core import degrade, metrics, probes  # noqa: E402
from napari_microrestore.core.errors import check_cancel, report  # noqa: E402

pytestmark = pytest.mark.gui
WAIT = 30000


def click(qtbot, button):
    assert button.isEnabled(), f"{button.text()!r} is disabled"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def make_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    w = ProbesWidget(viewer)
    viewer.window.add_dock_widget(w)
    return viewer, w


def test_probe_by_hand_adds_three_layers_side_by_side(make_napari_viewer, qtbot, notes):
    viewer, w = make_widget(make_napari_viewer)
    models = [w.model_combo.itemData(i).id for i in range(w.model_combo.count())]
    assert {"registered-mean", "wiener"} <= set(models) and "sstem-restore" not in models
    w.pattern_combo.setCurrentText("line-pairs")
    w.size_spin.setValue(96)
    w.seed_spin.setValue(2)
    w.set_model("registered-mean")
    assert w.blur_spin.isEnabled() and w.frames_spin.isEnabled()
    assert not w.defocus_spin.isEnabled()
    w.blur_spin.setValue(4.0)
    w.dose_spin.setValue(50.0)
    w.frames_spin.setValue(4)
    w.residual_check.setChecked(True)
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert w.panel.job.state == "done" and notes == []

    names = [la.name for la in viewer.layers]
    assert names == ["line-pairs truth", "line-pairs degraded",
                     "line-pairs restored (registered-mean)",
                     "line-pairs residual (registered-mean)"]
    truth, degraded, restored, residual = viewer.layers
    assert truth.data.shape == restored.data.shape == (96, 96)
    assert degraded.data.shape == (4, 96, 96)
    # side by side: each next one 1.05 widths to the right
    for i, layer in enumerate(viewer.layers):
        assert layer.translate[-1] == pytest.approx(i * 1.05 * 96)
        assert layer.translate[-2] == pytest.approx(0.0)
    np.testing.assert_allclose(residual.data, restored.data - truth.data, atol=1e-4)
    prov = restored.metadata["provenance"]
    assert prov["model"] == "registered-mean" and prov["operation"] == "probe"
    params = prov["parameters"]
    assert params["pattern"] == "line-pairs" and params["seed"] == 2 and params["n_frames"] == 4
    assert params["blur_length"] == 4.0 and params["dose"] == 50.0
    assert prov["restoration"]["model"] == "registered-mean"
    # the table shows the metrics, which are real metrics of the layers
    res = w.result
    want = metrics.compare(restored.data, truth.data, mask=res.mask, fit=True)
    assert restored.metadata["metrics"]["restored"]["psnr"] == pytest.approx(want["psnr"])
    headers = [w.table.horizontalHeaderItem(c).text() for c in range(w.table.columnCount())]
    assert headers == ["PSNR (dB)", "SSIM", "PCC", "invented"]
    assert [w.table.verticalHeaderItem(r).text() for r in range(2)] == ["degraded", "restored"]
    assert w.table.item(1, 0).text() == f"{want['psnr']:.2f}"
    assert w.table.item(1, 3).text() == f"{res.invented['restored']['score']:.3f}"
    assert float(w.table.item(1, 0).text()) > float(w.table.item(0, 0).text())
    assert "restored:" in w.readout.text() and "degraded:" in w.readout.text()
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)


def test_probe_degraded_like_a_layer(make_napari_viewer, qtbot, notes):
    viewer, w = make_widget(make_napari_viewer)
    rng = np.random.default_rng(0)
    scene = probes.make_probe("spots-lines", (200, 200), rng=rng) * 100 + 10
    frames = degrade.simulate_burst(scene, 5, shape=(128, 128), blur_length=8, dose=40,
                                    rng=rng).frames
    like = viewer.add_image(frames, name="my burst", scale=(1, 2.5, 2.5),
                            units=("pixel", "nm", "nm"))
    w.like_combo.set_layer(like)
    assert not w.blur_spin.isEnabled() and not w.dose_spin.isEnabled()
    w.set_model("wiener")
    w.pattern_combo.setCurrentText("siemens-star")
    w.size_spin.setValue(96)
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert w.panel.job.state == "done" and notes == []
    est = w.result.estimate
    assert w.blur_spin.value() == pytest.approx(est["blur_length"], abs=0.05)
    restored = viewer.layers["siemens-star restored (wiener)"]
    np.testing.assert_allclose(restored.scale, (2.5, 2.5))     # the imitated layer's pixels
    assert [str(u) for u in restored.units] == ["nanometer", "nanometer"]
    assert restored.metadata["provenance"]["like"] == est
    np.testing.assert_array_equal(like.data, frames)           # input untouched
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)


def test_probe_cancel_mid_run(make_napari_viewer, qtbot, notes, monkeypatch):
    from napari_microrestore.engine import probe as engine

    stopped = threading.Event()
    called: dict = {}

    def slow_probe(pattern, model, *, progress=None, cancel=None, **kwargs):
        called.update(kwargs, pattern=pattern, model=model.id)
        try:
            for i in range(500):
                check_cancel(cancel)
                time.sleep(0.01)
                report(progress, (i + 1) / 500, f"step {i + 1}/500")
        finally:
            stopped.set()
        raise AssertionError("not cancelled")

    monkeypatch.setattr(engine, "run_probe", slow_probe)
    viewer, w = make_widget(make_napari_viewer)
    w.pattern_combo.setCurrentText("siemens-star")
    w.set_model("registered-mean")
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: w.panel.progress_bar.value() > 0, timeout=WAIT)
    click(qtbot, w.panel.cancel_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert stopped.is_set() and w.panel.job.state == "cancelled"
    assert called["pattern"] == "siemens-star" and called["model"] == "registered-mean"
    assert called["blur_length"] == 10.0 and called["dose"] == 20.0 and "like" not in called
    assert len(viewer.layers) == 0 and w.panel.run_button.isEnabled()
    assert not any(sev == NotificationSeverity.ERROR for sev, _ in notes)
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)


def test_probe_like_a_constant_layer_notifies_and_adds_nothing(make_napari_viewer, qtbot,
                                                               notes):
    viewer, w = make_widget(make_napari_viewer)
    flat = viewer.add_image(np.ones((64, 64), np.float32), name="flat")
    w.like_combo.set_layer(flat)
    w.set_model("registered-mean")
    w.size_spin.setValue(64)
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: w.panel.job.done and w.device_job.done, timeout=WAIT)
    assert w.panel.job.state == "failed" and [la.name for la in viewer.layers] == ["flat"]
    errors = [msg for sev, msg in notes if sev == NotificationSeverity.ERROR]
    assert len(errors) == 1 and "constant" in errors[0]
