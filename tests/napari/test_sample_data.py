"""File > Open Sample: the three generated samples open through napari with pixel size,
units, provenance and ground truth, and the burst restores towards its truth."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.layers import Image, Labels  # noqa: E402

from napari_microrestore._napari import _sample_data  # noqa: E402
from napari_microrestore.core import metrics  # noqa: E402

pytestmark = pytest.mark.gui
PLUGIN = "napari-microrestore"


def units(layer):
    return [str(u) for u in layer.units]


def test_sample_module_does_not_import_torch_or_qt():
    code = ("import sys, napari_microrestore._napari._sample_data as s; "
            "assert 'torch' not in sys.modules and 'qtpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tem_burst_sample_restores_towards_its_truth(make_napari_viewer):
    from napari_microrestore.engine.restore import restore

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "tem-burst")
    burst, truth = viewer.layers["TEM burst"], viewer.layers["TEM burst ground truth"]
    assert isinstance(burst, Image) and burst.data.shape == (7, 512, 512)
    assert burst.data.dtype == np.float32 and truth.data.shape == (512, 512)
    np.testing.assert_allclose(burst.scale, (1.0, 4.0, 4.0))
    assert units(burst)[1:] == units(truth) == ["nanometer", "nanometer"]
    assert not truth.visible and burst.visible
    prov = burst.metadata["provenance"]
    assert prov["sample"] == "tem-burst" and prov["seed"] == 0 and prov["reference"] == 3
    deg = prov["degradation"]
    assert deg["n_frames"] == 7 and all(8 * 0.9 <= b <= 12 * 1.1 for b in deg["blur_lengths"])
    assert 10 < float(burst.data.mean()) < 40                       # ~20 counts per pixel

    # the central 256 x 256 px of every frame (a burst of its own, and faster to register)
    crop = (slice(128, 384), slice(128, 384))
    res = restore(burst.data[(slice(None), *crop)], "registered-mean")
    mask = res.registration.coverage
    before = metrics.compare(burst.data[(3, *crop)], truth.data[crop], mask=mask, fit=True,
                             border=16)
    after = metrics.compare(res.image, truth.data[crop], mask=mask, fit=True, border=16)
    assert all(res.registration.converged)
    assert after["psnr"] > before["psnr"] + 2 and after["ssim"] > before["ssim"] + 0.1


def test_defocus_stack_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "defocus-stack")
    stack, truth = viewer.layers["defocus z-stack"], viewer.layers["defocus z-stack in-focus truth"]
    assert stack.data.shape == truth.data.shape == (16, 256, 256)
    np.testing.assert_allclose(stack.scale, (0.3, 0.1, 0.1))
    assert units(stack) == ["micrometer"] * 3
    assert stack.metadata["provenance"]["degradation"]["offset"] == 100.0
    # out-of-focus light: the stack is smoother and brighter than the in-focus planes
    z = 8
    assert (metrics.sharpness(truth.data[z], noise=0)
            > 1.2 * metrics.sharpness(stack.data[z]))
    assert stack.data[z].mean() > truth.data[z].mean()


def test_sstem_stack_sample(make_napari_viewer):
    from napari_microrestore.engine.restore import missing_sections

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "sstem-stack")
    stack = viewer.layers["ssTEM stack"]
    truth = viewer.layers["ssTEM stack ground truth"]
    labels = viewer.layers["ssTEM artefacts"]
    assert isinstance(labels, Labels) and labels.data.shape == stack.data.shape == (10, 384, 384)
    np.testing.assert_allclose(stack.scale, (50.0, 4.0, 4.0))
    assert units(labels) == ["nanometer"] * 3
    assert missing_sections(stack.data) == [4] and (labels.data[4] == 1).all()
    assert (labels.data[6] == 2).any() and (labels.data[2] == 3).any()
    # only the labelled pixels are damaged (and, beside the fold, tissue pulled towards it)
    damaged = stack.data != truth.data
    intact = np.delete(damaged, 6, axis=0)[np.delete(labels.data, 6, axis=0) == 0]
    assert not intact.any() and damaged[2].any() and damaged[6].any()
    # neighbouring sections are alike (the scene is 3-D), distant ones less so
    near = metrics.pcc(truth.data[0], truth.data[1])
    assert near > metrics.pcc(truth.data[0], truth.data[9]) + 0.1
    assert stack.metadata["provenance"]["labels"]["2"] == "fold"


def test_samples_are_reproducible():
    a = _sample_data.sstem_stack_sample()
    b = _sample_data.sstem_stack_sample()
    for (da, _, _), (db, _, _) in zip(a, b):
        np.testing.assert_array_equal(da, db)
