"""The napari reader contribution: which paths it takes and the layer data it returns.

No viewer is created here (the widget tests do that); layers are built directly.
"""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import tifffile

from napari_microrestore._napari._reader import layer_data, napari_get_reader, read_layers
from napari_microrestore.core.errors import InputError
from napari_microrestore.core.io import SUPPORTED_SUFFIXES, LazyStack, read


def _imagej(path, data, pixel_nm=2.5, spacing_nm=50.0):
    """ImageJ TIFF in nm; a 3D array is a Z stack with the given spacing."""
    meta = {"axes": "ZYX", "spacing": spacing_nm} if data.ndim == 3 else {"axes": "YX"}
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / pixel_nm, 1 / pixel_nm),
                     metadata={**meta, "unit": "nm"})
    return path


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES + (".TIF", ".Mrc"))
def test_supported_suffixes_get_the_reader(tmp_path, suffix):
    assert napari_get_reader(str(tmp_path / f"image{suffix}")) is read_layers


@pytest.mark.parametrize("name", ["image.png", "image.zarr", "image.tif.gz", "noext"])
def test_other_files_are_declined(tmp_path, name):
    assert napari_get_reader(str(tmp_path / name)) is None


def test_folders_only_with_tiffs(tmp_path):
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    (empty / ".zarray").write_text("{}")
    frames = tmp_path / "frames"
    frames.mkdir()
    tifffile.imwrite(frames / "f_1.tif", np.zeros((4, 4), np.uint8))
    assert napari_get_reader(str(empty)) is None
    assert napari_get_reader(str(frames)) is read_layers


def test_lists_of_tiffs_only(tmp_path):
    tifs = [str(tmp_path / "a_1.tif"), str(tmp_path / "a_2.tif")]
    assert napari_get_reader(tifs) is read_layers
    assert napari_get_reader([str(tmp_path / "one.mrc")]) is read_layers
    assert napari_get_reader(tifs + [str(tmp_path / "b.mrc")]) is None
    assert napari_get_reader([]) is None


def test_imagej_stack_layer_has_scale_units_labels_and_metadata(tmp_path, rng):
    data = rng.integers(0, 255, (3, 40, 50), dtype=np.uint8)
    path = _imagej(tmp_path / "stack.tif", data)

    [(layer, kwargs, kind)] = napari_get_reader(str(path))(str(path))

    assert kind == "image"
    np.testing.assert_array_equal(np.asarray(layer), data)
    assert kwargs["name"] == "stack"
    assert kwargs["scale"] == pytest.approx((50.0, 2.5, 2.5))
    assert kwargs["units"] == ("nm", "nm", "nm")
    assert kwargs["axis_labels"] == ("z", "y", "x")
    assert kwargs["rgb"] is False
    meta = kwargs["metadata"]
    assert meta["source_path"] == str(path)
    assert meta["axes"] == "ZYX" and meta["unit"] == "nm"
    assert meta["pixel_size"] == pytest.approx((50.0, 2.5, 2.5))
    assert meta["format"] == "imagej-tiff"


def test_uncalibrated_tiff_has_unit_scale_and_no_units(tmp_path, rng):
    path = tmp_path / "plain.ome.tif"
    tifffile.imwrite(path, rng.random((6, 7)).astype(np.float32))
    [(_, kwargs, _)] = read_layers(str(path))
    assert kwargs["name"] == "plain"
    assert kwargs["scale"] == (1.0, 1.0)
    assert "units" not in kwargs
    assert kwargs["metadata"]["pixel_size"] is None


def test_mrc_movie_layer_in_nm(tmp_path, rng):
    data = rng.integers(-100, 100, (4, 8, 10)).astype(np.int16)
    path = tmp_path / "movie.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = 8.0  # Angstrom
    [(layer, kwargs, _)] = read_layers(str(path))
    np.testing.assert_array_equal(np.asarray(layer), data)
    assert kwargs["scale"] == pytest.approx((1.0, 0.8, 0.8))
    assert kwargs["units"] == ("pixel", "nm", "nm")
    assert kwargs["axis_labels"] == ("t", "y", "x")


def test_folder_and_list_become_one_stream_in_natural_order(tmp_path):
    folder = tmp_path / "burst"
    folder.mkdir()
    paths = []
    for i in (10, 2, 1):
        paths.append(str(folder / f"frame_{i}.tif"))
        _imagej(paths[-1], np.full((5, 6), i, np.uint16))

    [(from_folder, kwargs, _)] = read_layers(str(folder))
    [(from_list, list_kwargs, _)] = read_layers(paths)

    for layer in (from_folder, from_list):
        assert isinstance(layer, LazyStack)
        assert np.asarray(layer)[:, 0, 0].tolist() == [1, 2, 10]
    assert kwargs["name"] == list_kwargs["name"] == "burst"
    assert kwargs["axis_labels"] == ("t", "y", "x")
    assert kwargs["scale"] == pytest.approx((1.0, 2.5, 2.5))
    assert kwargs["metadata"]["frames"] == ["frame_1.tif", "frame_2.tif", "frame_10.tif"]


def test_rgb_image_is_an_rgb_layer_without_colour_scale(tmp_path, rng):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rng.integers(0, 255, (8, 9, 3), dtype=np.uint8), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    [(_, kwargs, _)] = read_layers(str(path))
    assert kwargs["rgb"] is True
    assert kwargs["scale"] == pytest.approx((0.5, 0.5))
    assert kwargs["units"] == ("um", "um")
    assert kwargs["axis_labels"] == ("y", "x")


def test_bad_file_raises_one_sentence(tmp_path):
    path = tmp_path / "broken.tif"
    path.write_bytes(b"not a tiff at all")
    reader = napari_get_reader(str(path))
    with pytest.raises(InputError, match="broken.tif is not a readable TIFF file"):
        reader(str(path))


def test_napari_accepts_the_layer_data(tmp_path, rng):
    layers = pytest.importorskip("napari.layers")
    data = rng.integers(0, 255, (4, 16, 20), dtype=np.uint8)
    path = tmp_path / "lazy.tif"
    tifffile.imwrite(path, data, compression="zlib", imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"axes": "TYX", "unit": "micron"})
    layer_array, kwargs, kind = layer_data(read(path))
    assert isinstance(layer_array, LazyStack)

    layer = layers.Image(layer_array, **kwargs)

    assert layer.ndim == 3 and tuple(layer.data.shape) == data.shape
    assert tuple(layer.scale) == pytest.approx((1.0, 0.2, 0.2))
    assert [str(u) for u in layer.units] == ["pixel", "micrometer", "micrometer"]
    assert tuple(layer.axis_labels) == ("t", "y", "x")
    assert layer.metadata["unit"] == "um"
    np.testing.assert_array_equal(layer.data[2], data[2])
