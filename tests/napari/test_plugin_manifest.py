"""The plugin as napari sees it: the manifest is valid and shipped, and napari opens files
through our reader with the right scale and units (a real viewer, under Xvfb)."""

import numpy as np
import pytest
import tifffile


def test_manifest_is_valid_and_installed():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManifest.from_distribution("napari-microrestore")
    assert pm.name == "napari-microrestore"
    readers = list(pm.contributions.readers or [])
    assert readers and "*.mrc" in readers[0].filename_patterns
    # every command points at an importable callable
    for cmd in pm.contributions.commands or []:
        module, _, attr = cmd.python_name.partition(":")
        mod = __import__(module, fromlist=[attr])
        assert callable(getattr(mod, attr)), cmd.python_name


def test_reader_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, napari_microrestore._napari._reader as r; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'qtpy' not in sys.modules and 'napari' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gui
def test_viewer_opens_tiff_with_scale_and_units(make_napari_viewer, tmp_path):
    data = (np.arange(3 * 40 * 50) % 251).astype(np.uint8).reshape(3, 40, 50)
    path = tmp_path / "stack.tif"
    # ImageJ hyperstack, 2.5 nm pixels
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 2.5, 1 / 2.5),
                     metadata={"axes": "ZYX", "unit": "nm", "spacing": 50.0})
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin="napari-microrestore")
    assert len(layers) == 1
    layer = layers[0]
    np.testing.assert_array_equal(np.asarray(layer.data), data)
    assert layer.scale[-1] == pytest.approx(2.5) and layer.scale[-2] == pytest.approx(2.5)
    units = [str(u) for u in layer.units]
    assert units[-1] in ("nanometer", "nm")
    assert layer.metadata.get("source_path") is not None
