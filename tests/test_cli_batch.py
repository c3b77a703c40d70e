"""`microrestore batch`: a folder or list of frames into OME-Zarr, resume, bad input, and the
embedded Dask LocalCluster."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_microrestore import cli
from napari_microrestore.core import io

zarr = pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    """A folder of 8 single-frame TIFFs (a drifting textured scene), 1.2 nm pixels."""
    rng = np.random.default_rng(11)
    scene = ndimage.gaussian_filter(rng.normal(size=(50, 50)), 1.5) * 300 + 1000
    folder = tmp_path_factory.mktemp("frames")
    for t in range(8):
        frame = rng.poisson(scene[8 + t // 2:40 + t // 2, 6 + t % 2:38 + t % 2])
        io.write_tiff(folder / f"frame_{t}.tif", frame.astype(np.uint16), pixel_size=1.2,
                      unit="nm")
    return folder


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_batch_folder_of_frames_then_resume(frames_dir, tmp_path, capsys):
    out = tmp_path / "out.zarr"
    argv = ["batch", frames_dir, "-o", out, "--model", "registered-mean", "--workers", "0",
            "--block", "3"]
    code, stdout, err = _run(argv + ["--max-blocks", "2"], capsys)
    assert code == 1, err  # incomplete: one block left for later
    assert "2 blocks restored" in stdout and "run the same command again" in stdout
    assert "[" in err and "block" in err  # the progress bar on stderr
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "1 blocks restored, 2 already done (skipped), 0 failed, of 3" in stdout
    img = io.read(out)
    assert img.axes == "TYX" and img.data.shape == (8, 32, 32)
    assert img.pixel_size == (1.0, 1.2, 1.2) and img.unit == "nm"
    assert not np.isnan(img.data[...]).any()


@pytest.mark.parametrize(
    "args, match",
    [
        (["-o", "{tmp}/o.tif"], "must be a folder name ending in .zarr"),
        (["-o", "{tmp}/missing/o.zarr"], "does not exist"),
        (["-o", "{tmp}/o.zarr", "--block", "0"], "--block must be at least 1"),
        (["-o", "{tmp}/o.zarr", "--workers", "-1"], "--workers must be 0"),
    ],
    ids=["suffix", "folder", "block", "workers"],
)
def test_batch_bad_input_exits_2_with_one_line(frames_dir, tmp_path, capsys, args, match):
    argv = ["batch", frames_dir, "--model", "registered-mean"]
    argv += [a.format(tmp=tmp_path) for a in args]
    code, stdout, err = _run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("microrestore batch: error:")
    assert match in err
    assert not (tmp_path / "o.zarr").exists()


def test_batch_unknown_model_and_missing_input(frames_dir, tmp_path, capsys):
    code, _, err = _run(["batch", frames_dir, "-o", tmp_path / "o.zarr", "--model", "nope"],
                        capsys)
    assert code == 2 and "unknown model 'nope'" in err
    code, _, err = _run(["batch", tmp_path / "none.tif", "-o", tmp_path / "o.zarr", "--model",
                         "registered-mean"], capsys)
    assert code == 2 and "does not exist" in err


def test_batch_embedded_local_cluster_equals_one_process(frames_dir, tmp_path, capsys):
    files = sorted(frames_dir.iterdir(), key=io.natural_key)
    common = ["--model", "registered-mean", "--block", "4", "--quiet"]
    code, _, err = _run(["batch", *files, "-o", tmp_path / "one.zarr", "--workers", "0",
                         *common], capsys)
    assert code == 0, err
    code, stdout, err = _run(["batch", *files, "-o", tmp_path / "two.zarr", "--workers", "1",
                              "--threads", "1", *common], capsys)
    assert code == 0, err
    assert "2 blocks restored" in stdout and "(stream, 1 worker)" in stdout
    two = zarr.open_array(str(tmp_path / "two.zarr" / "0"), mode="r")[...]
    one = zarr.open_array(str(tmp_path / "one.zarr" / "0"), mode="r")[...]
    np.testing.assert_array_equal(two, one)
