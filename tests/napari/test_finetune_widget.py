"""The Fine-tune widget driven as a user would, in a real viewer (Xvfb): choose the burst, the
mode and a short budget, run, watch the loss plot and the preview, cancel, save the model and
find it in the Restore widget; and the GUI thread never stalls while a restore and a
fine-tune run."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("napari")
torch = pytest.importorskip("torch")

from napari.utils.notifications import NotificationSeverity  # noqa: E402
from qtpy.QtCore import Qt, QTimer  # noqa: E402

from napari_microrestore._napari._widgets import FinetuneWidget, RestoreWidget  # noqa: E402
from napari_microrestore.core import degrade, probes  # noqa: E402
from napari_microrestore.models import build  # noqa: E402
from napari_microrestore.models.zoo import list_cards, save_model  # noqa: E402

pytestmark = pytest.mark.gui

SCALE = (1.0, 2.5, 2.5)
TRANSLATE = (0.0, 10.0, 20.0)
WAIT = 30000


@pytest.fixture(scope="module")
def burst():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    texture = gaussian_filter(rng.normal(size=(200, 200)), 3.0)
    scene = np.clip(probes.make_probe("spots-lines", (200, 200), rng=rng) * 100 + 40
                    + 15 * texture / texture.std(), 0, None)
    return degrade.simulate_burst(scene, 4, shape=(80, 80), blur_length=4, dose=30, rng=rng)


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """The user's model folder in tmp_path, holding a tiny random burst net ``tiny-burst``."""
    folder = tmp_path / "models"
    monkeypatch.setenv("MICRORESTORE_MODELS", str(folder))
    torch.manual_seed(0)
    net = build("burst-fast", {"channels": [4, 8, 8], "head_channels": 4})
    save_model(net, {"id": "tiny-burst", "task": "burst-deblur", "architecture": "burst-fast",
                     "kwargs": {"channels": [4, 8, 8], "head_channels": 4},
                     "input": {"frames": {"min": 2, "max": 9, "default": 5}, "multiple": 8,
                               "register": True}}, folder, dtype="float32")
    return folder


def test_widget_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from napari_microrestore._napari._widgets import finetune; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def click(qtbot, button):
    assert button.isEnabled(), f"{button.text()!r} is disabled"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def setup(viewer, burst, *, budget=3.0, mode="pairs"):
    src = viewer.add_image(burst.frames.copy(), name="burst", scale=SCALE, translate=TRANSLATE)
    clean = viewer.add_image(burst.ground_truth.copy(), name="truth", scale=SCALE[1:],
                             translate=TRANSLATE[1:])
    w = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.set_model("tiny-burst")
    w.layer_combo.set_layer(src)
    w.set_mode(mode)
    w.clean_combo.set_layer(clean if mode == "pairs" else None)
    w.budget_spin.setValue(budget)
    w.patch_spin.setValue(32)
    w.batch_spin.setValue(2)
    w.device_combo.setCurrentText("cpu")
    return src, w


def test_finetune_plots_previews_and_saves_a_model_restore_lists(make_napari_viewer, qtbot,
                                                                 burst, user_models, notes):
    viewer = make_napari_viewer()
    src, w = setup(viewer, burst)
    # only 3-D layers are offered as bursts; shipped burst nets and the user's are listed
    assert [w.layer_combo.itemText(i) for i in range(w.layer_combo.count())] == ["burst"]
    ids = [w.model_combo.itemData(i).id for i in range(w.model_combo.count())]
    assert {"tem-burst-fast", "tem-burst", "tem-single", "tiny-burst"} <= set(ids)
    assert "sstem-restore" not in ids and "registered-mean" not in ids
    assert w.id_edit.text() == "tiny-burst-burst-ft"              # suggested from the choices
    click(qtbot, w.panel.run_button)
    assert not w.panel.run_button.isEnabled() and w.panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert w.panel.job.state == "done" and w.result is not None
    assert len(w.plot.losses) >= 1 and len(w.plot.scores) >= 2
    w.plot.grab()  # paints without error
    res = w.result
    hy, hx, hh, hw = res.holdout
    preview = viewer.layers["burst fine-tune preview"]
    assert preview.data.shape == (hh, hw) and preview.data.dtype == np.float32
    np.testing.assert_allclose(preview.data, res.preview_after)
    np.testing.assert_allclose(preview.translate, [TRANSLATE[1] + hy * SCALE[1],
                                                   TRANSLATE[2] + hx * SCALE[2]])
    np.testing.assert_allclose(preview.scale, SCALE[1:])
    assert "holdout PSNR" in w.score_label.text() and "dB" in w.score_label.text()
    np.testing.assert_array_equal(src.data, burst.frames)        # input untouched
    assert res.card["training"]["data_details"]["name"] == "burst"

    # save: the new model is in the user's folder and the Restore picker lists it on refresh
    restore = RestoreWidget(viewer)
    assert "tiny-ft" not in [c.id for c in list_cards()]
    w.id_edit.setText("tiny-ft")
    click(qtbot, w.save_button)
    qtbot.waitUntil(lambda: w.save_label.text().startswith("saved"), timeout=WAIT)
    assert (user_models / "tiny-ft.yaml").is_file()
    restore.refresh_models()
    restore.set_model("tiny-ft")
    assert restore.card().source == "user"
    assert restore.card().training["base_model"] == "tiny-burst"
    # a shipped id is refused with a notification
    w.id_edit.setText("tem-burst-fast")
    click(qtbot, w.save_button)
    qtbot.waitUntil(lambda: any("shipped model" in m for _, m in notes), timeout=WAIT)
    qtbot.waitUntil(lambda: w.save_button.isEnabled(), timeout=WAIT)
    qtbot.waitUntil(lambda: restore.device_job.done and w.device_job.done, timeout=WAIT)


def test_cancel_mid_run_keeps_the_best_weights(make_napari_viewer, qtbot, burst, user_models,
                                               notes):
    viewer = make_napari_viewer()
    _, w = setup(viewer, burst, budget=120.0)
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: len(w.plot.losses) >= 3, timeout=WAIT)
    click(qtbot, w.panel.cancel_button)
    assert w.panel.status.text().startswith("stopping")
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert w.panel.job.state == "done" and w.result.cancelled
    assert w.result.seconds < 60 and len(w.plot.scores) >= 2   # scored at the stop too
    assert "stopped early" in w.score_label.text()
    assert w.save_button.isEnabled()
    scored = {h["step"]: h for h in w.result.history if "score" in h}
    assert w.result.after["psnr"] == pytest.approx(scored[w.result.best_step]["psnr"])
    assert not any(sev == NotificationSeverity.ERROR for sev, _ in notes)
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)


def test_pairs_needs_a_clean_layer_and_adapt_bn_explains(make_napari_viewer, qtbot, burst,
                                                         user_models, notes):
    viewer = make_napari_viewer()
    _, w = setup(viewer, burst, mode="self-supervised")
    assert w.panel.run_button.isEnabled()
    w.set_mode("pairs")
    assert not w.panel.run_button.isEnabled()       # no clean reference chosen
    w.clean_combo.set_layer(viewer.layers["truth"])
    assert w.panel.run_button.isEnabled()
    # the burst nets have no BatchNorm: the button says so, nothing is added
    click(qtbot, w.adapt_button)
    qtbot.waitUntil(lambda: w.panel.job.done, timeout=WAIT)
    assert w.panel.job.state == "failed"
    assert any(sev == NotificationSeverity.ERROR and "no BatchNorm" in m for sev, m in notes)
    assert [la.name for la in viewer.layers] == ["burst", "truth"]
    qtbot.waitUntil(lambda: w.device_job.done, timeout=WAIT)


def test_no_event_loop_stall_during_restore_and_finetune(make_napari_viewer, qtbot, burst,
                                                         user_models, notes, monkeypatch):
    """A 10 ms QTimer on the GUI thread: no gap between its ticks exceeds 100 ms while a
    restore (shipped tem-burst-fast) and a fine-tune run at the same time.

    napari's own ``add_image`` (making a layer and its vispy visual) takes 100-700 ms on a
    loaded 2-core machine with software OpenGL even when nothing else runs, so the gaps that
    overlap the two layer insertions (the restored image, the first preview) are attributed
    to napari, reported, and held to a looser bound; every other gap, including each
    preview *update* and each loss-plot repaint, must stay under 100 ms."""
    from napari.components import ViewerModel

    inserts: list[tuple[float, float]] = []
    real_add = ViewerModel.add_image

    def timed_add(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return real_add(self, *args, **kwargs)
        finally:
            inserts.append((t, time.perf_counter()))

    monkeypatch.setattr(ViewerModel, "add_image", timed_add)
    viewer = make_napari_viewer()
    src, w = setup(viewer, burst, budget=3.0)
    restore = RestoreWidget(viewer)
    viewer.window.add_dock_widget(restore)
    restore.set_model("tem-burst-fast")
    restore.layer_combo.set_layer(src)
    restore.device_combo.setCurrentText("cpu")
    qtbot.waitUntil(lambda: restore.device_job.done and w.device_job.done, timeout=WAIT)
    qtbot.wait(200)                                  # let the docks settle
    inserts.clear()

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    qtbot.wait(50)
    click(qtbot, restore.panel.run_button)
    click(qtbot, w.panel.run_button)
    qtbot.waitUntil(lambda: restore.panel.job.done and w.panel.job.done, timeout=WAIT)
    qtbot.wait(50)
    timer.stop()
    assert restore.panel.job.state == "done" and w.panel.job.state == "done"
    assert "burst restored (tem-burst-fast)" in viewer.layers
    assert "burst fine-tune preview" in viewer.layers
    assert len(inserts) == 2 and len(w.plot.losses) >= 1
    t = np.asarray(ticks)
    gaps = np.diff(t) * 1000
    assert len(gaps) > 50
    in_insert = np.array([any(a < t1 and t0 < b for a, b in inserts)
                          for t0, t1 in zip(t[:-1], t[1:])])
    print(f"max gap {gaps[~in_insert].max():.0f} ms outside layer insertions; insertions "
          f"{[round(1000 * (b - a)) for a, b in inserts]} ms, gaps over them "
          f"{gaps[in_insert].round().tolist()} ms")
    assert gaps[~in_insert].max() < 100, f"event loop stalled {gaps[~in_insert].max():.0f} ms"
    assert gaps.max() < 2000
