"""invented_structure: coherent structure the truth lacks scores; noise, blur, gain do not."""

import numpy as np
import pytest

from napari_microrestore.core import degrade, probes
from napari_microrestore.core.errors import InputError

SHAPE = (128, 128)


@pytest.fixture(scope="module")
def truth():
    return probes.make_probe("spots-lines", SHAPE, rng=1) * 100 + 10


def _grating(period: float, vertical: bool = True) -> np.ndarray:
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    return np.cos(2 * np.pi * (yy if vertical else xx) / period)


def test_perfect_restoration_invents_nothing(truth):
    r = probes.invented_structure(truth, truth)
    assert r.score == 0 and r.n_peaks == 0 and r.peaks == []
    assert r.flat_rms == 0 and r.structure_rms == 0 and 0.3 < r.flat_fraction < 1


def test_a_faint_grating_scores_far_above_white_noise_of_the_same_energy(truth):
    amp = 0.05 * truth.std()
    added = amp * _grating(10.0)
    noise = np.random.default_rng(0).normal(0, 1, SHAPE)
    noise *= added.std() / noise.std()
    grid = probes.invented_structure(truth + added, truth)
    white = probes.invented_structure(truth + noise, truth)
    assert grid.score > 0.02 and white.score < 0.002
    assert grid.score > 10 * max(white.score, 1e-4)
    # both residuals have the same energy, so the spatial readout cannot tell them apart
    assert grid.flat_rms == pytest.approx(white.flat_rms, rel=0.2)
    top = grid.peaks[0]
    assert top["period"] == pytest.approx(10.0, rel=0.05)
    assert top["angle"] % 180 == pytest.approx(90.0, abs=1)          # varies along y
    assert 0.5 * grid.score < top["amplitude"] <= 1.5 * grid.score
    # a 2-D grid of lines (the calibration-grid artefact) too, whatever the orientation
    lines = probes.lines_2d(SHAPE, period=12.0, width=2.0, background=0.0)
    lines = (lines - lines.mean()) * amp / lines.std()
    assert probes.invented_structure(truth + lines, truth).score > 0.02


def test_blur_loses_structure_but_invents_none():
    grid = probes.make_probe("lines-2d", SHAPE) * 100
    blurred = degrade.defocus(grid, 2.0)
    r = probes.invented_structure(blurred, grid)
    assert r.score < 1e-3 and r.structure_rms > 0.1


def test_gain_and_offset_do_not_matter(truth):
    img = truth + 0.05 * truth.std() * _grating(8.0, vertical=False)
    a = probes.invented_structure(img, truth)
    b = probes.invented_structure(3.0 * img - 7.0, truth)
    assert a.score == pytest.approx(b.score, rel=1e-4)
    assert a.peaks[0]["angle"] % 180 == pytest.approx(0.0, abs=1)
    # without the fit a gain error is (wrongly) all residual
    assert probes.invented_structure(3.0 * img, truth, fit=False).flat_rms > 10 * a.flat_rms


def test_mask_and_bad_input(truth):
    mask = np.zeros(SHAPE, bool)
    mask[16:-16, 16:-16] = True
    img = truth + 0.05 * truth.std() * _grating(10.0)
    assert probes.invented_structure(img, truth, mask=mask).score > 0.01
    assert set(probes.invented_structure(img, truth).to_dict()) >= {"score", "peaks"}
    with pytest.raises(InputError, match="same shape"):
        probes.invented_structure(truth[:64], truth)
    with pytest.raises(InputError, match="constant"):
        probes.invented_structure(truth, np.ones(SHAPE))
    with pytest.raises(InputError, match="fewer than 64"):
        probes.invented_structure(truth, truth, mask=np.zeros(SHAPE, bool))
    with pytest.raises(InputError, match="mask"):
        probes.invented_structure(truth, truth, mask=np.ones((4, 4), bool))
