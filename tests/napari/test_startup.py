"""Start-up: the plugin and the Restore widget's module import without torch (torch is
imported only when a computation first needs it, in a worker thread)."""

import json
import subprocess
import sys

_CODE = """
import json, sys
import napari_microrestore
after_package = "torch" in sys.modules
import napari_microrestore._napari._widgets.restore
import napari_microrestore.engine.stream
print(json.dumps([after_package, "torch" in sys.modules, "napari" in sys.modules]))
"""


def test_widget_module_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    after_package, after_widget, napari_loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert napari_loaded  # the import really happened (the widget module needs napari)
    assert not after_package
    assert not after_widget
