"""The Stream widget driven as a user would: choose a stream's burst window, watch it follow the
frame slider, and send it to the Register and Restore widgets (Xvfb, real viewer)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402

from napari_microrestore._napari._geometry import BurstWindow  # noqa: E402
from napari_microrestore._napari._widgets import (  # noqa: E402
    RegisterWidget,
    RestoreWidget,
    StreamWidget,
)
from napari_microrestore._napari._widgets._common import WINDOWS  # noqa: E402
from napari_microrestore.core import degrade, probes  # noqa: E402

pytestmark = pytest.mark.gui
WAIT = 30000


@pytest.fixture(scope="module")
def stream():
    """A 12-frame stream of a drifting probe: four 3-frame bursts glued together."""
    rng = np.random.default_rng(11)
    scene = probes.make_probe("spots-lines", (160, 160), rng=rng) * 100 + 10
    bursts = [degrade.simulate_burst(scene, 3, shape=(48, 48), blur_length=3, dose=60,
                                     rng=rng).frames for _ in range(4)]
    return np.concatenate(bursts).astype(np.float32)


def dock(viewer, widget):
    viewer.window.add_dock_widget(widget)
    return widget


def click(qtbot, button):
    assert button.isEnabled(), f"{button.text()!r} is disabled"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def test_window_follows_the_slider_and_reaches_the_restore_widget(make_napari_viewer, qtbot,
                                                                  stream):
    viewer = make_napari_viewer()
    layer = viewer.add_image(stream.copy(), name="stream")
    restore = dock(viewer, RestoreWidget(viewer))
    restore.set_model("registered-mean")
    w = dock(viewer, StreamWidget(viewer))
    assert w.layer() is layer and not w.axis_combo.isEnabled()    # one possible frame axis
    assert w.follow_check.isChecked() and w.size_spin.value() == 5
    viewer.dims.set_current_step(0, 7)
    assert w.centre_spin.value() == 7
    assert w.frames_label.text() == "frames 5-9 (centre 7) of 12"
    assert WINDOWS.get(layer) == BurstWindow(12, 7, 5)
    # the Restore widget on this layer follows: reference frame, frames, label
    assert restore.reference_spin.value() == 7 and restore.frames_spin.value() == 5
    assert restore.window_label.text() == "window from Stream: frames 5-9 (centre 7)"

    # near the end the window shifts to stay inside the stream
    viewer.dims.set_current_step(0, 11)
    assert w.frames_label.text() == "frames 7-11 (centre 11) of 12"
    w.size_spin.setValue(3)
    assert w.frames_label.text() == "frames 9-11 (centre 11) of 12"
    assert restore.frames_spin.value() == 3
    # not following: the slider no longer moves the window
    w.follow_check.setChecked(False)
    viewer.dims.set_current_step(0, 2)
    assert w.centre_spin.value() == 11
    w.centre_spin.setValue(4)
    assert WINDOWS.get(layer) == BurstWindow(12, 4, 3)
    np.testing.assert_array_equal(layer.data, stream)              # the input is untouched
    assert "burst_window" not in layer.metadata

    # the choices persist: a new Stream widget starts with 3 frames, not following
    again = StreamWidget(viewer)
    assert again.size_spin.value() == 3 and not again.follow_check.isChecked()
    again.deleteLater()
    qtbot.waitUntil(lambda: restore.device_job.done, timeout=WAIT)


def test_send_to_register_registers_only_the_window(make_napari_viewer, qtbot, stream, notes):
    viewer = make_napari_viewer()
    layer = viewer.add_image(stream.copy(), name="stream", scale=(0.5, 2.0, 2.0),
                             translate=(1.0, 0.0, 0.0))
    viewer.add_image(stream[0].copy(), name="other")
    register = dock(viewer, RegisterWidget(viewer))
    w = dock(viewer, StreamWidget(viewer))
    w.follow_check.setChecked(False)
    w.centre_spin.setValue(4)
    w.size_spin.setValue(3)
    register.layer_combo.set_layer(viewer.layers["other"])
    click(qtbot, w.register_button)
    assert register.layer_combo.layer() is layer and register.window_check.isChecked()
    assert register.window_label.text() == "frames 3-5 (centre 4)"
    assert not register.reference_spin.isEnabled()
    click(qtbot, register.panel.run_button)
    qtbot.waitUntil(lambda: "stream registered coverage" in viewer.layers, timeout=WAIT)
    out = viewer.layers["stream registered"]
    assert out.data.shape == (3, 48, 48)
    # it lines up with frames 3-5 of the stream
    np.testing.assert_allclose(out.translate, (1.0 + 3 * 0.5, 0, 0))
    np.testing.assert_allclose(out.scale, (0.5, 2.0, 2.0))
    reg = out.metadata["registration"]
    assert reg["reference"] == 1 and len(reg["ecc"]) == 3
    params = out.metadata["provenance"]["parameters"]
    assert params["window"]["frames"] == [3, 4, 5] and params["window"]["centre"] == 4
    assert params["reference"] == 1
    assert notes == []


def test_four_d_stream_frame_axis(make_napari_viewer, qtbot, stream):
    """A (C, T, Y, X) layer: frames along axis 1, the channel held at the slider's position."""
    viewer = make_napari_viewer()
    data = np.stack([stream, stream[::-1] * 2])                    # (2, 12, 48, 48)
    layer = viewer.add_image(data, name="movie", axis_labels=("c", "t", "y", "x"))
    register = dock(viewer, RegisterWidget(viewer))
    w = dock(viewer, StreamWidget(viewer))
    assert w.axis_combo.isEnabled() and w.axis_combo.count() == 2
    assert w.axis_combo.itemText(1) == "1 (t)"
    w.axis_combo.setCurrentIndex(1)
    w.follow_check.setChecked(False)
    w.centre_spin.setValue(10)
    w.size_spin.setValue(4)
    assert w.frames_label.text() == "frames 8-11 (centre 10) of 12"
    viewer.dims.set_current_step(0, 1)                             # channel 1
    w.follow_check.setChecked(True)
    viewer.dims.set_current_step(1, 9)
    assert w.centre_spin.value() == 9 and WINDOWS.get(layer).axis == 1
    click(qtbot, w.register_button)
    click(qtbot, register.panel.run_button)
    qtbot.waitUntil(lambda: "movie registered" in viewer.layers, timeout=WAIT)
    out = viewer.layers["movie registered"]
    assert out.data.shape == (4, 48, 48)       # frames 7-10 of channel 1
    assert out.metadata["provenance"]["parameters"]["window"]["frames"] == [7, 8, 9, 10]
    ref = data[1, 9]
    aligned_ref = out.data[out.metadata["registration"]["reference"]]
    np.testing.assert_allclose(aligned_ref, ref, rtol=1e-5)
    # a changed layer shape forgets its window
    layer.data = data[:, :6]
    assert WINDOWS.get(layer) is None


def test_send_to_restore_opens_the_restore_widget(make_napari_viewer, qtbot, stream):
    viewer = make_napari_viewer()
    layer = viewer.add_image(stream.copy(), name="stream")
    w = dock(viewer, StreamWidget(viewer))
    w.follow_check.setChecked(False)
    w.centre_spin.setValue(2)
    click(qtbot, w.restore_button)
    opened = [d for d in viewer.window.dock_widgets.values() if isinstance(d, RestoreWidget)]
    assert len(opened) == 1
    restore = opened[0]
    assert restore.layer_combo.layer() is layer and restore.reference_spin.value() == 2
    qtbot.waitUntil(lambda: restore.device_job.done, timeout=WAIT)
