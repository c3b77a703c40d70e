"""Screenshot of the Restore widget at work, from generated data only.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot_napari.py

A simulated TEM stream burst of a synthetic probe is restored with the shipped `tem-burst`
model through the Restore widget (the real scheduler and worker thread), shown side by side
with its input; writes docs/images/napari_restore.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
import numpy as np
from PIL import Image
from qtpy.QtWidgets import QApplication

from napari_microrestore._napari._widgets import RestoreWidget
from napari_microrestore.core import degrade, probes

OUT = Path(__file__).resolve().parent / "images" / "napari_restore.png"


def main() -> int:
    rng = np.random.default_rng(3)
    scene = probes.make_probe("spots-lines", (448, 448), rng=rng) * 100 + 10
    burst = degrade.simulate_burst(scene, 5, shape=(320, 320), blur_length=10, dose=20,
                                   origin=(64, 64), rng=rng)
    viewer = napari.Viewer(title="napari-microrestore")
    viewer.window._qt_window.resize(1500, 900)
    viewer.add_image(burst.frames, name="TEM burst", scale=(1, 2.0, 2.0), units=("pixel", "nm", "nm"))
    widget = RestoreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Restore", area="right")
    widget.set_model("tem-burst")
    widget.run()
    t0 = time.time()
    while not any("restored" in layer.name for layer in viewer.layers):
        QApplication.processEvents()
        time.sleep(0.05)
        if time.time() - t0 > 120:
            print("restore did not finish in 2 minutes", file=sys.stderr)
            return 1
    widget.side_button.setChecked(True)
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shot).save(OUT, optimize=True)
    print(f"wrote {OUT} {shot.shape}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
