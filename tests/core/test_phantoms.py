"""Procedural scenes for the sample data: shapes, ranges, determinism, z-correlation, optics."""

import numpy as np
import pytest

from napari_microrestore.core import metrics, phantoms
from napari_microrestore.core.errors import InputError


def test_tem_section_looks_like_bright_field_tissue():
    img = phantoms.tem_section((128, 160), rng=3)
    assert img.shape == (128, 160) and img.dtype == np.float32
    assert 0 < img.min() and img.max() <= 1.0
    assert 0.5 < float(np.median(img)) < 0.85          # bright cytoplasm ...
    assert np.percentile(img, 1) < 0.6 * np.median(img)  # ... and dark membranes / stain
    np.testing.assert_array_equal(img, phantoms.tem_section((128, 160), rng=3))
    assert not np.array_equal(img, phantoms.tem_section((128, 160), rng=4))


def test_cell_volume_sections_change_slowly_along_z():
    vol = phantoms.cell_volume((8, 96, 96), rng=0, z_step=10.0, texture=0.0)
    assert vol.shape == (8, 96, 96) and vol.dtype == np.float32
    near = metrics.pcc(vol[0], vol[1])
    far = metrics.pcc(vol[0], vol[7])
    assert 0.5 < near < 0.999 and far < near - 0.2


def test_cell_volume_options_and_bad_input():
    few = phantoms.cell_volume((1, 64, 64), rng=1, n_mitochondria=0, n_vesicles=0)
    assert few.shape == (1, 64, 64)
    for kw, match in (({"shape": (2, 8, 64)}, "shape"), ({"z_step": 0}, "z_step"),
                      ({"texture": 0.7}, "texture"), ({"n_vesicles": -1}, "n_vesicles")):
        with pytest.raises(InputError, match=match):
            phantoms.cell_volume(**({"shape": (1, 64, 64)} | kw))
    with pytest.raises(InputError, match="shape"):
        phantoms.tem_section((1, 64, 64))


def test_fluorescence_volume_and_widefield_stack():
    vol = phantoms.fluorescence_volume((6, 64, 64), rng=2)
    assert vol.shape == (6, 64, 64) and vol.dtype == np.float32 and vol.min() >= 0
    assert 0.5 < vol.max() < 5 and (vol > 0.1).mean() < 0.3          # sparse, bright features
    stack, truth = phantoms.widefield_stack(vol, focus_sigma=1.0, defocus_per_plane=1.5)
    assert stack.shape == truth.shape == vol.shape
    # Gaussians conserve the flux: every image gets the light of all planes, the truth of one
    for z in range(6):
        assert stack[z].sum() == pytest.approx(vol.sum(), rel=0.05)
        assert truth[z].sum() == pytest.approx(vol[z].sum(), rel=0.05)
    # out-of-focus light blurs: less gradient energy than the sum of the in-focus planes
    def grad_energy(img):
        return sum(float((np.diff(img, axis=a) ** 2).sum()) for a in (0, 1))

    assert grad_energy(truth.sum(0)) > 1.5 * grad_energy(stack[3])
    # no defocus and one plane: the stack is the truth
    s1, t1 = phantoms.widefield_stack(vol[:1], defocus_per_plane=0.0)
    np.testing.assert_allclose(s1, t1, atol=1e-5)
    with pytest.raises(InputError, match="non-negative"):
        phantoms.widefield_stack(-vol)
    with pytest.raises(InputError, match="focus_sigma"):
        phantoms.widefield_stack(vol, focus_sigma=0)
