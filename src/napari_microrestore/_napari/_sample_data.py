"""File > Open Sample: generated data to try every tool on, with its ground truth.

Each sample is drawn from a fixed seed by :mod:`~napari_microrestore.core.phantoms` (no
external or non-commercial data ships in the wheel) and degraded by
:mod:`~napari_microrestore.core.degrade`; the clean scene comes along as a hidden
"... ground truth" layer for the Compare widget, and every layer's
``metadata["provenance"]`` records the generator, seed and degradation parameters, so the
same data can be regenerated headless (e.g. ``tem_burst_sample()`` in a script).

* ``tem-burst``: 7 frames of a TEM stream with a moving stage (512 x 512 px at 4 nm): vertical
  motion blur of 8-12 px per frame, Poisson noise at ~20 counts per pixel;
* ``defocus-stack``: a 16-plane widefield z-stack of a fluorescence sample (filaments and
  blobs, 0.1 um pixels, 0.3 um planes) with out-of-focus light from every plane and
  Poisson-Gaussian camera noise;
* ``sstem-stack``: 10 serial sections (384 x 384 px at 4 nm, 50 nm thick) with stain
  precipitates on section 2, a missing (blank) section 4 and a support-film fold on section
  6; the artefact masks come as a Labels layer (1 missing, 2 fold, 3 precipitate).

Pure numpy: no torch, no Qt (napari calls these functions when the menu entry is chosen).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import __version__
from ..core import degrade, phantoms

LayerData = tuple[np.ndarray, dict[str, Any], str]

TEM_PIXEL_NM = 4.0
SECTION_NM = 50.0
FLUO_PIXEL_UM = 0.1
FLUO_PLANE_UM = 0.3
SSTEM_LABELS = {1: "missing section", 2: "fold", 3: "precipitate"}


def _provenance(sample: str, generator: str, seed: int, **record: Any) -> dict[str, Any]:
    return {"operation": "sample data", "sample": sample, "generator": generator,
            "seed": seed, "version": __version__, **record}


def tem_burst_sample(seed: int = 0) -> list[LayerData]:
    """A simulated 7-frame TEM stream burst and its ground truth (reference frame 3)."""
    scene = phantoms.tem_section((640, 640), rng=seed)
    burst = degrade.simulate_burst(scene, 7, shape=(512, 512), blur_length=(8.0, 12.0),
                                   blur_angle=90.0, dose=20.0, rng=seed + 1)
    prov = _provenance("tem-burst", "core.phantoms.tem_section(shape=(640, 640)) -> "
                       "core.degrade.simulate_burst(n_frames=7, shape=(512, 512), "
                       "blur_length=(8, 12), blur_angle=90, dose=20)", seed,
                       degradation=burst.params, reference=int(burst.reference),
                       shifts=np.asarray(burst.shifts).tolist())
    yx = {"scale": (TEM_PIXEL_NM, TEM_PIXEL_NM), "units": ("nm", "nm"),
          "axis_labels": ("y", "x")}
    truth = (burst.ground_truth, {"name": "TEM burst ground truth", "visible": False,
                                  "metadata": {"provenance": prov}, **yx}, "image")
    frames = (burst.frames, {"name": "TEM burst", "scale": (1.0, TEM_PIXEL_NM, TEM_PIXEL_NM),
                             "units": ("pixel", "nm", "nm"), "axis_labels": ("t", "y", "x"),
                             "metadata": {"provenance": prov}}, "image")
    return [truth, frames]


def defocus_stack_sample(seed: int = 0) -> list[LayerData]:
    """A widefield fluorescence z-stack (out-of-focus light, noise) and its in-focus truth."""
    volume = phantoms.fluorescence_volume((16, 256, 256), rng=seed,
                                          plane_spacing=FLUO_PLANE_UM / FLUO_PIXEL_UM)
    stack, truth = phantoms.widefield_stack(volume, focus_sigma=1.0, defocus_per_plane=1.2)
    peak, background, offset, read_noise = 200.0, 10.0, 100.0, 2.0
    scale = peak / float(truth.max())
    noisy = degrade.poisson_gaussian_counts(stack * scale + background, read_noise=read_noise,
                                            offset=offset, rng=seed + 1)
    truth_counts = (truth * scale + background + offset).astype(np.float32)
    prov = _provenance("defocus-stack", "core.phantoms.fluorescence_volume(shape=(16, 256, "
                       "256), plane_spacing=3) -> core.phantoms.widefield_stack("
                       "focus_sigma=1.0, defocus_per_plane=1.2)", seed,
                       degradation={"psf": "gaussian, sigma = hypot(1.0, 1.2 * |dz|) px",
                                    "peak_counts": peak, "background_counts": background,
                                    "gain": 1.0, "offset": offset, "read_noise": read_noise},
                       ground_truth="each plane blurred by the in-focus PSF only")
    zyx = {"scale": (FLUO_PLANE_UM, FLUO_PIXEL_UM, FLUO_PIXEL_UM), "units": ("um",) * 3,
           "axis_labels": ("z", "y", "x"), "metadata": {"provenance": prov},
           "colormap": "gray"}
    return [(truth_counts, {"name": "defocus z-stack in-focus truth", "visible": False,
                            **zyx}, "image"),
            (noisy, {"name": "defocus z-stack", **zyx}, "image")]


def sstem_stack_sample(seed: int = 0) -> list[LayerData]:
    """A serial-section TEM stack with a missing section, a fold and precipitates, the intact
    stack as ground truth and the artefact masks as labels."""
    clean = phantoms.cell_volume((10, 384, 384), rng=seed, z_step=SECTION_NM / TEM_PIXEL_NM)
    dose = 120.0
    intact = degrade.poisson_gaussian_counts(clean * dose, rng=seed + 1)
    damaged = intact.copy()
    labels = np.zeros(intact.shape, np.uint8)
    damaged[2], mask = degrade.precipitates(intact[2], rng=seed + 2, count=(3, 5),
                                            radius=(4.0, 12.0))
    labels[2][mask] = 3
    damaged[6], mask = degrade.fold(intact[6], rng=seed + 3, width=(10.0, 18.0))
    labels[6][mask] = 2
    damaged, lost = degrade.missing_section(damaged, 4, fill="zeros")
    labels[lost] = 1
    prov = _provenance("sstem-stack", f"core.phantoms.cell_volume(shape=(10, 384, 384), "
                       f"z_step={SECTION_NM / TEM_PIXEL_NM:g}) -> Poisson noise at {dose:g} "
                       "counts/px", seed,
                       degradation={"precipitates": [2], "fold": [6], "missing": [4],
                                    "missing_fill": "zeros", "dose": dose},
                       labels={str(k): v for k, v in SSTEM_LABELS.items()},
                       ground_truth="the same noisy sections before the artefacts")
    zyx = {"scale": (SECTION_NM, TEM_PIXEL_NM, TEM_PIXEL_NM), "units": ("nm",) * 3,
           "axis_labels": ("z", "y", "x"), "metadata": {"provenance": prov}}
    return [(intact, {"name": "ssTEM stack ground truth", "visible": False, **zyx}, "image"),
            (damaged, {"name": "ssTEM stack", **zyx}, "image"),
            (labels, {"name": "ssTEM artefacts", "opacity": 0.4, **zyx}, "labels")]
