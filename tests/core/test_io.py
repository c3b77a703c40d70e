"""core/io.py: reading TIFF / MRC / EM files with pixel size, lazily; atomic writers."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from _shared import shared_file
from napari_microrestore.core.errors import InputError
from napari_microrestore.core.io import (
    SUPPORTED_SUFFIXES,
    LazyStack,
    find_tiff_frames,
    natural_key,
    read,
    read_array,
    read_frames,
    write_json,
    write_tiff,
)


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return (rng.random(shape) * 1000).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def _single_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and len(message) < 400


# ------------------------------------------------------------------------------ TIFF


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("compression", [None, "lzw"])
def test_single_frame_tiff_keeps_values_and_dtype(tmp_path, rng, dtype, compression):
    data = _random(rng, (37, 53), dtype)
    path = tmp_path / "frame.tif"
    tifffile.imwrite(path, data, compression=compression)

    image = read(path)

    assert image.axes == "YX"
    assert image.data.dtype == dtype
    np.testing.assert_array_equal(np.asarray(image.data), data)
    assert image.pixel_size is None and image.unit is None
    assert image.scale == (1.0, 1.0)
    assert image.metadata["compression"] == ("LZW" if compression else "NONE")
    assert image.metadata["source_path"] == str(path) == image.path


def test_compressed_multipage_tiff_is_read_lazily_frame_by_frame(tmp_path, rng):
    data = _random(rng, (40, 64, 48), np.uint16)
    path = tmp_path / "burst.tif"
    tifffile.imwrite(path, data, compression="lzw", photometric="minisblack")

    image = read(path)

    assert isinstance(image.data, LazyStack) and not isinstance(image.data, np.ndarray)
    assert image.data.shape == data.shape and image.data.dtype == data.dtype
    assert image.axes == "ZYX"  # a plain stack: ImageJ's convention, see io's docstring
    decoded: list[int] = []
    read_frame = image.data.frame
    image.data.frame = lambda i: decoded.append(i) or read_frame(i)  # type: ignore[method-assign]
    np.testing.assert_array_equal(image.data[7], data[7])
    assert decoded == [7]
    np.testing.assert_array_equal(image.data[-1, 10:20, ::3], data[-1, 10:20, ::3])
    assert decoded == [7, 39]
    np.testing.assert_array_equal(read_array(path), data)


def test_uncompressed_stack_is_memory_mapped_and_eager_read_is_in_memory(tmp_path, rng):
    data = _random(rng, (6, 32, 40), np.float32)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack")

    lazy = read(path)
    eager = read(path, lazy=False)

    assert isinstance(lazy.data, np.memmap) and not lazy.data.flags.writeable
    assert type(eager.data) is np.ndarray
    np.testing.assert_array_equal(lazy.data, data)
    np.testing.assert_array_equal(eager.data, data)


def test_imagej_hyperstack_gives_axes_pixel_size_and_spacing(tmp_path, rng):
    data = _random(rng, (2, 3, 2, 16, 20), np.uint16)  # T Z C Y X
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(
        path, data, imagej=True, resolution=(1 / 0.25, 1 / 0.125),
        metadata={"axes": "TZCYX", "unit": "micron", "spacing": 0.5},
    )

    image = read(path)

    assert image.axes == "TZCYX"
    assert image.unit == "um"
    assert image.pixel_size == pytest.approx((1.0, 0.5, 1.0, 0.125, 0.25))
    assert image.yx_pixel_size == pytest.approx((0.125, 0.25))
    assert image.metadata["format"] == "imagej-tiff"
    assert image.metadata["imagej"]["spacing"] == 0.5
    assert "z_spacing_assumed" not in image.metadata
    np.testing.assert_array_equal(np.asarray(image.data), data)


def test_imagej_stack_without_spacing_assumes_isotropic_voxels(tmp_path, rng):
    path = tmp_path / "nm.tif"
    tifffile.imwrite(path, _random(rng, (4, 8, 8), np.uint8), imagej=True,
                     resolution=(1 / 4.6, 1 / 4.6), metadata={"axes": "ZYX", "unit": "nm"})
    image = read(path)
    assert image.unit == "nm"
    assert image.pixel_size == (4.6, 4.6, 4.6)
    assert image.metadata["z_spacing_assumed"] is True


@pytest.mark.parametrize(
    ("size", "unit", "expected", "expected_unit"),
    [(0.1625, "µm", 0.1625, "um"), (2.5, "nm", 2.5, "nm"), (12.0, "Å", 1.2, "nm")],
)
def test_ome_tiff_physical_size_is_normalised(tmp_path, rng, size, unit, expected, expected_unit):
    data = _random(rng, (3, 24, 32), np.uint16)
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
        "PhysicalSizeY": size, "PhysicalSizeYUnit": unit,
        "PhysicalSizeZ": 4 * size, "PhysicalSizeZUnit": unit,
    })

    image = read(path)

    assert image.metadata["format"] == "ome-tiff"
    assert image.axes == "ZYX"
    assert image.unit == expected_unit
    assert image.pixel_size == pytest.approx((4 * expected, expected, expected))
    np.testing.assert_array_equal(np.asarray(image.data), data)


def test_ome_tiff_default_unit_is_micrometre(tmp_path, rng):
    path = tmp_path / "default.ome.tif"
    tifffile.imwrite(path, _random(rng, (8, 8), np.uint8), ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3})
    image = read(path)
    assert image.unit == "um" and image.pixel_size == pytest.approx((0.3, 0.3))


def test_fei_tiff_pixel_size_in_metres_becomes_nm(tmp_path, rng):
    ini = "[User]\r\nUser=test\r\n[Scan]\r\nPixelWidth=2.5e-09\r\nPixelHeight=3e-09\r\n"
    path = tmp_path / "fei.tif"
    tifffile.imwrite(path, _random(rng, (16, 16), np.uint16),
                     extratags=[(34682, "s", 0, ini, True)])
    image = read(path)
    assert image.unit == "nm" and image.pixel_size == pytest.approx((3.0, 2.5))
    assert image.metadata["fei"]["Scan"]["PixelWidth"] == pytest.approx(2.5e-9)


def test_centimetre_resolution_is_used_but_print_dpi_is_ignored(tmp_path, rng):
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, _random(rng, (8, 8), np.uint8),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, _random(rng, (8, 8), np.uint8),
                     resolution=(72, 72), resolutionunit="INCH")
    assert read(cm).pixel_size == pytest.approx((0.5, 0.5)) and read(cm).unit == "um"
    assert read(inch).pixel_size is None and read(inch).unit is None


def test_rgb_tiff_has_trailing_channel_axis(tmp_path, rng):
    data = _random(rng, (12, 14, 3), np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    image = read(path)
    assert image.axes == "YXC"
    np.testing.assert_array_equal(np.asarray(image.data), data)


# ------------------------------------------------------------------------------ folders


def test_folder_of_frames_is_one_stream_in_natural_order(tmp_path, rng):
    folder = tmp_path / "stream"
    folder.mkdir()
    frames = {i: np.full((10, 12), i, np.uint16) for i in (1, 2, 10, 11, 100)}
    for i, frame in frames.items():
        tifffile.imwrite(folder / f"frame_{i}.tif", frame, imagej=True,
                         resolution=(1 / 2.0, 1 / 2.0), metadata={"unit": "nm"})
    (folder / "notes.txt").write_text("not a frame")
    (folder / "._frame_3.tif").write_bytes(b"macOS resource fork, not a TIFF")

    image = read(folder)

    assert [p.name for p in find_tiff_frames(folder)] == [
        "frame_1.tif", "frame_2.tif", "frame_10.tif", "frame_11.tif", "frame_100.tif"
    ]
    assert isinstance(image.data, LazyStack)
    assert image.axes == "TYX" and image.data.shape == (5, 10, 12)
    assert [int(image.data[t, 0, 0]) for t in range(5)] == [1, 2, 10, 11, 100]
    assert image.pixel_size == pytest.approx((1.0, 2.0, 2.0)) and image.unit == "nm"
    assert image.metadata["format"] == "tiff-frames"
    assert image.metadata["frames"][2] == "frame_10.tif"
    assert image.path == str(folder)
    assert type(read(folder, lazy=False).data) is np.ndarray


def test_read_frames_keeps_the_given_order(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"f{i}.tif")
        tifffile.imwrite(paths[-1], np.full((4, 5), i, np.uint8))
    image = read_frames(paths[::-1])
    assert np.asarray(image.data)[:, 0, 0].tolist() == [2, 1, 0]


def test_natural_key_orders_numbers_by_value():
    names = ["img10.tif", "img2.tif", "Img1.tif", "img2b.tif", "img_0100.tif", "img_99.tif"]
    assert sorted(names, key=natural_key) == [
        "Img1.tif", "img2.tif", "img2b.tif", "img10.tif", "img_99.tif", "img_0100.tif"
    ]


def test_folder_without_tiffs_is_rejected(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(InputError, match="contains no TIFF files") as info:
        read(tmp_path)
    _single_line(str(info.value))


def test_folder_with_frames_of_different_shapes_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "a_1.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "a_2.tif", np.zeros((8, 9), np.uint8))
    with pytest.raises(InputError, match="a_1.tif is 8x8 uint8 but a_2.tif is 8x9 uint8"):
        read(tmp_path)


def test_folder_with_frames_of_different_dtypes_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "a_1.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "a_2.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(InputError, match="differ in shape or type"):
        read(tmp_path)


def test_folder_of_stacks_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "s1.tif", np.zeros((3, 8, 8), np.uint8),
                     photometric="minisblack")
    with pytest.raises(InputError, match="single-frame TIFFs"):
        read(tmp_path)


def test_read_frames_rejects_non_tiff_and_empty_lists(tmp_path):
    other = tmp_path / "a.mrc"
    other.write_bytes(b"x")
    with pytest.raises(InputError, match="is not a TIFF"):
        read_frames([other])
    with pytest.raises(InputError, match="No TIFF frames"):
        read_frames([])


# ------------------------------------------------------------------------------ MRC


def _write_mrc(path: Path, data: np.ndarray, voxel_size, *, stack: bool = False) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if stack:
            mrc.set_image_stack()
        if voxel_size is not None:
            mrc.voxel_size = voxel_size


def test_mrc_volume_is_memory_mapped_with_voxel_size_in_nm(tmp_path, rng):
    data = _random(rng, (5, 16, 24), np.float32)
    path = tmp_path / "vol.mrc"
    _write_mrc(path, data, (3.4, 3.4, 12.0))  # x, y, z in Angstrom

    image = read(path)

    assert isinstance(image.data, np.memmap)
    assert image.axes == "ZYX" and image.unit == "nm"
    assert image.pixel_size == pytest.approx((1.2, 0.34, 0.34))
    assert image.pixel_size[1] == 0.34  # float32 header noise rounded away
    assert image.metadata["mrc"]["voxel_size_angstrom"] == pytest.approx([3.4, 3.4, 12.0])
    np.testing.assert_array_equal(image.data, data)
    assert type(read(path, lazy=False).data) is np.ndarray


@pytest.mark.parametrize("suffix", [".mrcs", ".st"])
def test_mrc_image_stack_is_a_t_stack(tmp_path, rng, suffix):
    data = _random(rng, (4, 8, 10), np.int16)
    path = tmp_path / f"movie{suffix}"
    _write_mrc(path, data, 1.06, stack=True)
    image = read(path)
    assert image.axes == "TYX"
    assert image.pixel_size == pytest.approx((1.0, 0.106, 0.106))
    np.testing.assert_array_equal(image.data, data)


def test_mrc_2d_image_without_voxel_size_is_uncalibrated(tmp_path, rng):
    data = _random(rng, (9, 7), np.uint16)
    path = tmp_path / "image.map"
    _write_mrc(path, data, None)
    image = read(path)
    assert image.axes == "YX" and image.pixel_size is None and image.unit is None
    np.testing.assert_array_equal(image.data, data)


def test_truncated_mrc_is_rejected_up_front(tmp_path, rng):
    path = tmp_path / "cut.mrc"
    _write_mrc(path, _random(rng, (4, 16, 16), np.float32), 1.0)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="cut.mrc is truncated") as info:
        read(path)
    _single_line(str(info.value))


def test_corrupt_mrc_header_is_rejected(tmp_path):
    path = tmp_path / "junk.mrc"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="junk.mrc is not a readable MRC file") as info:
        read(path)
    _single_line(str(info.value))


def test_unsupported_mrc_mode_is_rejected(tmp_path, rng):
    path = tmp_path / "packed.mrc"
    _write_mrc(path, _random(rng, (8, 8), np.uint8), None)
    raw = bytearray(path.read_bytes())
    raw[12:16] = np.int32(101).tobytes()  # MODE word: 4-bit packed, no numpy dtype
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="101"):
        read(path)


# ------------------------------------------------------------------------------ real data


@pytest.mark.data
def test_real_lzw_tem_exposure():
    path = shared_file("tem_stream/lowdose_pairs/train_0001.tif")
    image = read(path)
    assert image.axes == "YX" and image.data.shape == (512, 512)
    assert image.data.dtype == np.uint16
    assert image.metadata["compression"] == "LZW"
    assert image.pixel_size is None  # the file only has a 72 dpi print resolution
    np.testing.assert_array_equal(np.asarray(image.data), tifffile.imread(path))
    assert np.asarray(image.data).std() > 0


@pytest.mark.data
def test_real_sstem_volume_reads_one_section_on_demand():
    path = shared_file("sstem/isbi2012_train_volume.tif")
    image = read(path)
    assert image.axes == "ZYX" and image.data.shape == (30, 512, 512)
    assert image.data.dtype == np.uint8
    assert not isinstance(image.data, np.ndarray)
    np.testing.assert_array_equal(image.data[17], tifffile.imread(path, key=17))


# ------------------------------------------------------------------------------ [em] extra


def _fake_rsciio(monkeypatch, module: str, signals: list[dict]) -> None:
    fake = types.ModuleType(f"rsciio.{module}")
    fake.file_reader = lambda filename, lazy=False: signals  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, f"rsciio.{module}", fake)


def _axis(name, size, scale, units, navigate):
    return {"name": name, "size": size, "scale": scale, "offset": 0.0, "units": units,
            "navigate": navigate}


def test_dm_image_stack_from_rosettasciio_gets_axes_and_nm(monkeypatch, tmp_path, rng):
    data = _random(rng, (3, 6, 8), np.float32)
    spectrum = {"data": np.zeros(50), "axes": [_axis("Energy loss", 50, 0.1, "eV", False)],
                "metadata": {"General": {"title": "EELS"}}}
    stack = {
        "data": data,
        "axes": [_axis("time", 3, 0.5, "s", True), _axis("y", 6, 12.0, "Å", False),
                 _axis("x", 8, 0.0011, "µm", False)],
        "metadata": {"General": {"title": "HRTEM series"}, "Acquisition_instrument":
                     {"TEM": {"beam_energy": np.float64(300.0)}}},
    }
    _fake_rsciio(monkeypatch, "digitalmicrograph", [spectrum, stack])
    path = tmp_path / "series.dm4"
    path.write_bytes(b"stand-in; the fake reader does not look at it")

    image = read(path)

    assert image.data is data
    assert image.axes == "TYX"
    assert image.unit == "um"  # X's unit wins; Y (Angstrom) is converted to it
    assert image.pixel_size == pytest.approx((1.0, 0.0012, 0.0011))
    assert image.metadata["format"] == "dm"
    assert image.metadata["signal_titles"] == ["EELS", "HRTEM series"]
    json.dumps(image.metadata)  # JSON-friendly (numpy scalars converted)


def test_rosettasciio_uncalibrated_image_and_no_image(monkeypatch, tmp_path):
    image_signal = {"data": np.zeros((4, 5)), "axes": [
        _axis("y", 4, 1.0, "<undefined>", False), _axis("x", 5, 1.0, "<undefined>", False)]}
    _fake_rsciio(monkeypatch, "tia", [image_signal])
    path = tmp_path / "a.ser"
    path.write_bytes(b"x")
    image = read(path)
    assert image.axes == "YX" and image.pixel_size is None and image.unit is None

    spectrum_only = {"data": np.zeros(10), "axes": [_axis("E", 10, 1.0, "eV", False)]}
    _fake_rsciio(monkeypatch, "tia", [spectrum_only])
    with pytest.raises(InputError, match="contains no 2D image"):
        read(path)


def test_missing_em_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rsciio.digitalmicrograph", None)  # import fails
    path = tmp_path / "image.dm3"
    path.write_bytes(b"x" * 100)
    with pytest.raises(InputError) as info:
        read(path)
    assert 'pip install "napari-microrestore[em]"' in str(info.value)
    _single_line(str(info.value))


def _write_dm3(path: Path, data: np.ndarray, scales, units) -> None:
    """A minimal DigitalMicrograph 3 file (float32 image or stack) written from scratch.

    ``scales`` and ``units`` are in array order (slowest axis first); DM stores X first.
    Layout: big-endian header and tag structure, little-endian values; see the
    DigitalMicrograph file format notes (tag groups 0x14, data tags 0x15 + "%%%%").
    """
    def name(n):
        return struct.pack(">h", len(n)) + n.encode("ascii")

    def group(n, children):
        return b"\x14" + name(n) + b"\x00\x00" + struct.pack(">i", len(children)) + b"".join(
            children)

    def value(n, etype, fmt, v):  # etype 3 = int32, 6 = float32
        header = b"\x15" + name(n) + b"%%%%" + struct.pack(">ii", 1, etype)
        return header + struct.pack("<" + fmt, v)

    def array(n, etype, payload, count):
        return b"\x15" + name(n) + b"%%%%" + struct.pack(">iiii", 3, 20, etype, count) + payload

    def text(n, t):  # DM strings are arrays of uint16 characters (type 4)
        return array(n, 4, np.array([ord(c) for c in t], "<u2").tobytes(), len(t))

    def calibration(scale, unit):
        return group("", [value("Origin", 6, "f", 0.0), value("Scale", 6, "f", scale),
                          text("Units", unit)])

    image = group("", [
        group("ImageData", [
            group("Calibrations", [
                group("Brightness", [value("Origin", 6, "f", 0.0), value("Scale", 6, "f", 1.0),
                                     text("Units", "")]),
                group("Dimension", [calibration(s, u) for s, u in zip(scales[::-1], units[::-1])]),
            ]),
            array("Data", 6, data.astype("<f4").tobytes(), data.size),
            value("DataType", 3, "i", 2),  # float32
            group("Dimensions", [value("", 3, "i", n) for n in data.shape[::-1]]),
        ]),
        group("ImageTags", []),
        text("Name", "synthetic"),
    ])
    body = b"\x00\x00" + struct.pack(">i", 1) + group("ImageList", [image])
    path.write_bytes(struct.pack(">iii", 3, len(body) + 12, 1) + body + bytes(8))


def test_real_dm3_image_through_rosettasciio(tmp_path, rng):
    pytest.importorskip("rsciio.digitalmicrograph")
    data = _random(rng, (6, 8), np.float32)
    path = tmp_path / "hrtem.dm3"
    _write_dm3(path, data, (0.5, 0.25), ("nm", "nm"))

    image = read(path)

    assert image.axes == "YX" and image.unit == "nm"
    assert image.pixel_size == pytest.approx((0.5, 0.25))
    assert image.metadata["format"] == "dm"
    assert image.metadata["signal_titles"] == ["synthetic"]
    np.testing.assert_array_equal(np.asarray(image.data), data)
    assert type(read(path, lazy=False).data) is np.ndarray
    json.dumps(image.metadata)


def test_real_dm3_stack_in_angstrom_through_rosettasciio(tmp_path, rng):
    pytest.importorskip("rsciio.digitalmicrograph")
    data = _random(rng, (3, 6, 8), np.float32)
    path = tmp_path / "stack.dm3"
    _write_dm3(path, data, (1.0, 4.6, 4.6), ("", "Å", "Å"))  # stored as float32
    image = read(path)
    assert image.axes == "ZYX"  # RosettaSciIO names a DM stack axis "z"
    assert image.unit == "nm" and image.pixel_size == (0.46, 0.46, 0.46)  # no float32 noise
    assert image.metadata["z_spacing_assumed"] is True
    np.testing.assert_array_equal(np.asarray(image.data), data)


@pytest.mark.parametrize("damage", ["truncated", "junk"])
def test_corrupt_dm3_gives_a_clean_error(tmp_path, rng, damage):
    pytest.importorskip("rsciio.digitalmicrograph")
    path = tmp_path / "broken.dm3"
    _write_dm3(path, _random(rng, (6, 8), np.float32), (1.0, 1.0), ("nm", "nm"))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else raw[:12] + bytes(100))
    with pytest.raises(InputError, match="broken.dm3 could not be read") as info:
        read(path)
    _single_line(str(info.value))


# ------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read(tmp_path / "nothing.tif")


@pytest.mark.parametrize("name", ["empty.tif", "empty.mrc", "empty.dm3"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).touch()
    with pytest.raises(InputError, match=r"is empty \(0 bytes\)"):
        read(tmp_path / name)


def test_unsupported_suffix_names_the_supported_ones(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="unsupported file type '.png'") as info:
        read(path)
    assert all(s in str(info.value) for s in SUPPORTED_SUFFIXES)
    _single_line(str(info.value))


def test_not_a_tiff(tmp_path):
    path = tmp_path / "fake.tif"
    path.write_bytes(b"this is a text file with a .tif name")
    with pytest.raises(InputError, match="fake.tif is not a readable TIFF file") as info:
        read(path)
    _single_line(str(info.value))


def _stack_file(tmp_path: Path, rng, **kwargs) -> tuple[Path, np.ndarray]:
    data = _random(rng, (5, 32, 32), np.float32)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack", **kwargs)
    return path, data


@pytest.mark.parametrize("kwargs", [{"compression": "zlib"}, {}, {"imagej": True}])
def test_tiff_cut_inside_the_last_frame_is_rejected_up_front(tmp_path, rng, kwargs):
    path, _ = _stack_file(tmp_path, rng, **kwargs)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(InputError, match="stack.tif is truncated or corrupt") as info:
        read(path)
    _single_line(str(info.value))


def test_shaped_tiff_cut_in_the_middle_is_rejected(tmp_path, rng):
    path, _ = _stack_file(tmp_path, rng, compression="zlib")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read(path)


def test_plain_tiff_cut_between_pages_is_rejected(tmp_path, rng):
    path, _ = _stack_file(tmp_path, rng, compression="zlib", metadata=None)
    with tifffile.TiffFile(path) as tif:
        third_ifd = tif.pages[2].offset
    path.write_bytes(path.read_bytes()[:third_ifd])  # pages 0 and 1 intact, chain dangles
    with pytest.raises(InputError, match="truncated or corrupt"):
        read(path)


def test_tiff_with_fewer_pages_than_its_metadata_declares_is_rejected(tmp_path, rng):
    # a writer that stopped after 3 of 5 pages: the IFD chain ends cleanly at page 2
    path, _ = _stack_file(tmp_path, rng, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        ifd = tif.pages[2].offset
        ntags = len(tif.pages[2].tags)
    raw = bytearray(path.read_bytes())
    next_ifd = ifd + 2 + 12 * ntags  # classic little-endian TIFF: uint16 count, 12-byte tags
    raw[next_ifd : next_ifd + 4] = bytes(4)
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="truncated or corrupt"):
        read(path)


def test_corrupt_frame_data_fails_cleanly_when_the_frame_is_read(tmp_path, rng):
    path, data = _stack_file(tmp_path, rng, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[2].dataoffsets[0]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))

    image = read(path)  # sizes are consistent: only decoding can tell

    np.testing.assert_array_equal(image.data[1], data[1])
    with pytest.raises(InputError, match="frame 2 could not be decoded") as info:
        image.data[2]
    _single_line(str(info.value))
    with pytest.raises(InputError, match="stack.tif could not be decoded") as info:
        read(path, lazy=False)
    _single_line(str(info.value))


# ------------------------------------------------------------------------------ LazyStack


def _lazy(array: np.ndarray, n_lead: int) -> LazyStack:
    frames = array.reshape((-1,) + array.shape[n_lead:])
    return LazyStack(lambda i: frames[i].copy(), array.shape[:n_lead], array.shape[n_lead:],
                     array.dtype, name="test")


@pytest.mark.parametrize(
    "key",
    [
        0, -1, (1, 2), (slice(None), 0), (1, slice(1, 3), slice(None, None, 2)),
        Ellipsis, (Ellipsis, 3), (0, Ellipsis, slice(2, 4)), [2, 0], np.array([True, False, True]),
        (slice(None), [1, 0]), (0, 1, [0, 3], [1, 2]), (slice(None, None, -1), -2, 1),
        np.int64(2), np.arange(12).reshape(3, 4) % 5 == 0,
    ],
)
def test_lazy_stack_indexes_like_numpy(rng, key):
    array = rng.random((3, 4, 5, 6)).astype(np.float32)
    stack = _lazy(array, 2)
    result = stack[key]
    expected = array[key]
    assert result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)


def test_lazy_stack_array_protocol_and_errors(rng):
    array = rng.integers(0, 9, (4, 3, 2)).astype(np.uint8)
    stack = _lazy(array, 1)
    assert stack.shape == (4, 3, 2) and stack.ndim == 3 and len(stack) == 4
    assert stack.size == array.size and stack.nbytes == array.nbytes
    np.testing.assert_array_equal(np.asarray(stack), array)
    assert np.asarray(stack, dtype=np.float32).dtype == np.float32
    np.testing.assert_array_equal(np.stack(list(stack)), array)
    with pytest.raises(IndexError):
        stack[4]
    with pytest.raises(IndexError):
        stack[0, 0, 0, 0]
    with pytest.raises(ValueError):
        np.array(stack, copy=False)


def test_lazy_stack_rejects_frames_that_changed(rng):
    stack = LazyStack(lambda i: np.zeros((3, 3), np.uint16), (2,), (3, 4), np.uint16, name="s")
    with pytest.raises(InputError, match="frame 0 is 3x3 uint16 but 3x4 uint16 was expected"):
        stack[0]


# ------------------------------------------------------------------------------ writers


@pytest.mark.parametrize(
    ("dtype", "axes", "shape", "fmt"),
    [
        (np.float32, "TYX", (3, 16, 20), "imagej-tiff"),
        (np.uint16, "ZYX", (4, 16, 20), "imagej-tiff"),
        (np.uint8, "YXC", (16, 20, 3), "imagej-tiff"),
        (np.float64, "ZYX", (4, 16, 20), "tiff"),     # no float64 in ImageJ
        (np.uint16, "ZTYX", (2, 3, 8, 10), "tiff"),   # not ImageJ's axis order
        (np.int32, "CYX", (2, 8, 10), "tiff"),
    ],
)
def test_write_tiff_round_trip(tmp_path, rng, dtype, axes, shape, fmt):
    data = _random(rng, shape, dtype)
    sizes = {"T": 1.0, "C": 1.0, "Z": 40.0, "Y": 0.46, "X": 0.5}
    pixel_size = tuple(sizes[a] for a in axes)
    extra = {"transforms": np.eye(2, 3), "ecc": [np.float32(0.9)], "model": "x"}
    path = write_tiff(tmp_path / "out.tif", data, axes=axes, pixel_size=pixel_size,
                      unit="nm", metadata=extra)

    image = read(path)

    assert image.metadata["format"] == fmt
    assert image.axes == axes and image.unit == "nm"
    assert image.pixel_size == pytest.approx(pixel_size, rel=1e-6)
    assert image.data.dtype == dtype
    np.testing.assert_array_equal(np.asarray(image.data), data)
    assert image.metadata["microrestore"] == json.loads(json.dumps(
        {"transforms": np.eye(2, 3).tolist(), "ecc": [0.8999999761581421], "model": "x"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


def test_write_tiff_sets_calibration_that_other_software_reads(tmp_path, rng):
    ij = write_tiff(tmp_path / "ij.tif", _random(rng, (2, 8, 8), np.uint16), axes="ZYX",
                    pixel_size=(50.0, 2.0, 2.0), unit="nm")
    plain = write_tiff(tmp_path / "plain.tif", _random(rng, (8, 8), np.float64), axes="YX",
                       pixel_size=2.0, unit="nm")
    micron = write_tiff(tmp_path / "um.tif", _random(rng, (8, 8), np.uint8), pixel_size=0.1,
                        unit="µm")
    with tifffile.TiffFile(micron) as tif:  # ImageJ's own spelling
        assert tif.imagej_metadata["unit"] == "micron"
    with tifffile.TiffFile(ij) as tif:  # what Fiji reads
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "nm"
        assert tif.imagej_metadata["spacing"] == pytest.approx(50.0)
        assert tif.pages[0].resolution == pytest.approx((0.5, 0.5))
    with tifffile.TiffFile(plain) as tif:  # standard TIFF tags, centimetres
        assert tif.pages[0].resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert tif.pages[0].resolution == pytest.approx((1e4 / 2e-3,) * 2)


def test_write_tiff_converts_units_and_leaves_unknown_z_unknown(tmp_path, rng):
    path = write_tiff(tmp_path / "a.tif", _random(rng, (3, 8, 8), np.float32), axes="ZYX",
                      pixel_size=4.6, unit="Å")
    image = read(path)
    assert image.unit == "nm" and image.pixel_size == (0.46, 0.46, 0.46)
    assert image.metadata["z_spacing_assumed"] is True


def test_write_tiff_replaces_an_existing_file(tmp_path, rng):
    path = tmp_path / "x.tif"
    write_tiff(path, np.zeros((4, 4), np.uint8))
    write_tiff(path, np.ones((5, 5), np.uint8))
    np.testing.assert_array_equal(read_array(path), np.ones((5, 5), np.uint8))


def _failing_imwrite(file, *args, **kwargs):
    file.write(b"II*\x00 half a TIFF")
    raise OSError("disk full")


def test_failed_tiff_write_keeps_the_old_file_and_leaves_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "result.tif"
    write_tiff(path, np.arange(16, dtype=np.uint16).reshape(4, 4))
    before = path.read_bytes()
    monkeypatch.setattr(tifffile, "imwrite", _failing_imwrite)

    with pytest.raises(OSError, match="disk full"):
        write_tiff(path, np.zeros((8, 8), np.uint16))
    with pytest.raises(OSError, match="disk full"):
        write_tiff(tmp_path / "new.tif", np.zeros((8, 8), np.uint16))

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.tif"]


def test_write_json_is_atomic_and_converts_numpy(tmp_path):
    path = tmp_path / "transforms.json"
    write_json(path, {"matrix": np.eye(2, 3, dtype=np.float32), "n": np.int64(3),
                      "source": tmp_path / "in.tif"})
    assert json.loads(path.read_text()) == {
        "matrix": [[1, 0, 0], [0, 1, 0]], "n": 3, "source": str(tmp_path / "in.tif")}
    before = path.read_bytes()

    with pytest.raises(InputError, match="cannot be written as JSON") as info:
        write_json(path, {"bad": object()})

    _single_line(str(info.value))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["transforms.json"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "out.png"}, "needs a .tif or .tiff path"),
        ({"data": np.zeros(5)}, "at least Y and X"),
        ({"axes": "YXZ"}, "do not fit data"),
        ({"axes": "TT"}, "do not fit data"),
        ({"axes": "XYZ", "data": np.zeros((2, 4, 4))}, "do not fit data"),
        ({"axes": "YXC", "data": np.zeros((4, 4, 5))}, "trailing C axis"),
        ({"pixel_size": 1.0}, "without a unit"),
        ({"pixel_size": 1.0, "unit": "parsec"}, "Unknown length unit"),
        ({"pixel_size": (1.0, 2.0, 3.0), "unit": "nm"}, "need 1, 2"),
        ({"pixel_size": -1.0, "unit": "nm"}, "finite and positive"),
        ({"pixel_size": float("nan"), "unit": "nm"}, "finite and positive"),
        ({"metadata": {"a": {1, 2}}}, "cannot be written as JSON"),
        ({"path": "missing/out.tif"}, "does not exist"),
    ],
)
def test_write_tiff_bad_input(tmp_path, kwargs, message):
    args = {"path": "out.tif", "data": np.zeros((4, 4), np.uint8), **kwargs}
    args["path"] = tmp_path / args["path"]
    with pytest.raises(InputError, match=message) as info:
        write_tiff(args.pop("path"), args.pop("data"), **args)
    _single_line(str(info.value))
    assert list(tmp_path.iterdir()) == []


def test_importing_io_loads_no_file_readers_or_torch():
    import subprocess

    code = (
        "import sys, napari_microrestore.core.io; "
        "loaded = {'tifffile', 'mrcfile', 'rsciio', 'torch'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
