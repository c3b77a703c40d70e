"""The `microrestore` command, run in-process through cli.main (as the console script does)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_microrestore import cli


def _texture(rng, shape, sigma=2.0):
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma) * 200 + 1000


@pytest.fixture
def burst_file(tmp_path, rng):
    """A 4-frame burst: one textured scene shifted by known integer amounts."""
    scene = _texture(rng, (140, 140))
    shifts = [(-6, 3), (-3, 1), (0, 0), (4, -2)]
    frames = [scene[20 + dy:120 + dy, 20 + dx:120 + dx] for dy, dx in shifts]
    path = tmp_path / "burst.tif"
    tifffile.imwrite(path, np.stack(frames).astype(np.uint16), photometric="minisblack")
    return path, shifts


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_register_writes_stack_and_transforms(burst_file, tmp_path, capsys):
    path, shifts = burst_file
    out = tmp_path / "reg.tif"
    code, stdout, err = _run(["register", path, "-o", out], capsys)
    assert code == 0, err
    reg = tifffile.imread(out)
    assert reg.shape == (4, 100, 100) and reg.dtype == np.float32
    rec = json.loads((tmp_path / "reg.json").read_text())
    assert rec["reference"] == 2 and rec["motion"] == "translation"
    assert len(rec["transforms"]) == 4 and len(rec["ecc"]) == 4
    got = np.array(rec["shifts"])
    want = np.array(shifts, float)
    # frame t(y, x) = reference(y + dy, x + dx), so the transform that maps reference pixels
    # to frame pixels translates by (-dy, -dx): recovered within 0.2 px
    assert np.abs(got + want).max() < 0.2
    # registered frames agree with the reference inside the covered region
    inner = reg[:, 10:-10, 10:-10]
    assert np.abs(inner - inner[2]).max() < 30
    assert "registered 4 frames" in stdout


def test_register_options(burst_file, tmp_path, capsys):
    path, _ = burst_file
    out = tmp_path / "reg.tif"
    code, _, err = _run(["register", path, "-o", out, "--reference", "0", "--motion",
                         "euclidean", "--json", tmp_path / "t.json"], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "t.json").read_text())
    assert rec["reference"] == 0 and rec["motion"] == "euclidean"
    assert np.allclose(rec["transforms"][0], [[1, 0, 0], [0, 1, 0]])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: tifffile.imwrite(p, np.zeros((50, 50), np.uint8)), "3 dimensions"),
        (lambda p: tifffile.imwrite(p, np.zeros((1, 50, 50), np.uint8)), "one frame|at least 2"),
        (lambda p: tifffile.imwrite(p, np.full((3, 40, 40), np.nan, np.float32), photometric="minisblack"), "NaN"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"II*\x00" + b"\x00" * 20), "."),
    ],
    ids=["2d", "one-frame", "nan", "empty", "truncated"],
)
def test_register_bad_input_exits_nonzero_and_writes_nothing(tmp_path, capsys, make, match):
    bad = tmp_path / "bad.tif"
    make(bad)
    out = tmp_path / "out" / "reg.tif"
    out.parent.mkdir()
    code, stdout, err = _run(["register", bad, "-o", out], capsys)
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and "error" in lines[0], err
    import re
    assert re.search(match, lines[0]), lines[0]
    assert list(out.parent.iterdir()) == []


def test_register_bad_reference_and_output(burst_file, tmp_path, capsys):
    path, _ = burst_file
    code, _, err = _run(["register", path, "-o", tmp_path / "r.tif", "--reference", "9"], capsys)
    assert code != 0 and "reference" in err
    code, _, err = _run(["register", path, "-o", tmp_path / "r.png"], capsys)
    assert code != 0 and ".tif" in err
    code, _, err = _run(["register", tmp_path / "missing.tif", "-o", tmp_path / "r.tif"], capsys)
    assert code != 0 and "missing.tif" in err
    assert not (tmp_path / "r.tif").exists() and not (tmp_path / "r.json").exists()


def test_probe_writes_burst_truth_and_params(tmp_path, capsys):
    out = tmp_path / "p.tif"
    code, stdout, err = _run(["probe", "lines-2d", "-o", out, "--shape", "96", "128",
                              "--frames", "3", "--seed", "5", "--blur-length", "8",
                              "--dose", "20"], capsys)
    assert code == 0, err
    burst = tifffile.imread(out)
    truth = tifffile.imread(tmp_path / "p_truth.tif")
    assert burst.shape[0] == 3 and burst.shape[1:] == truth.shape
    rec = json.loads((tmp_path / "p.json").read_text())
    assert rec["probe"] == "lines-2d" and rec["frames"] == 3
    # same seed, same burst
    code, _, _ = _run(["probe", "lines-2d", "-o", tmp_path / "q.tif", "--shape", "96", "128",
                       "--frames", "3", "--seed", "5", "--blur-length", "8", "--dose", "20"],
                      capsys)
    assert np.array_equal(tifffile.imread(tmp_path / "q.tif"), burst)


def test_probe_list_clean_and_like(tmp_path, capsys, burst_file):
    code, stdout, _ = _run(["probe", "--list"], capsys)
    names = stdout.split()
    assert code == 0 and {"spots-lines", "lines-1d", "lines-2d", "siemens-star", "line-pairs"} <= set(names)
    code, _, err = _run(["probe", "siemens-star", "-o", tmp_path / "s.tif", "--clean",
                         "--shape", "64", "64"], capsys)
    assert code == 0, err
    assert tifffile.imread(tmp_path / "s.tif").shape == (64, 64)
    path, _ = burst_file
    code, _, err = _run(["probe", "spots-lines", "-o", tmp_path / "l.tif", "--like", path,
                         "--shape", "96", "96"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "l.json").read_text())["estimate"] is not None
    code, _, err = _run(["probe", "nonsense", "-o", tmp_path / "n.tif"], capsys)
    assert code != 0 and "unknown probe" in err and not (tmp_path / "n.tif").exists()


def test_probe_with_model_replays_the_probes_widget(tmp_path, capsys):
    from napari_microrestore.engine.probe import run_probe

    out = tmp_path / "r.tif"
    code, stdout, err = _run(["probe", "lines-2d", "-o", out, "--model", "registered-mean",
                              "--shape", "96", "96", "--seed", "3", "--dose", "30"], capsys)
    assert code == 0, err
    assert "restored" in stdout and "invented" in stdout
    restored = tifffile.imread(out)
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["metrics"]["restored"]["psnr"] > rec["metrics"]["degraded"]["psnr"]
    assert tifffile.imread(tmp_path / "r_degraded.tif").ndim == 3
    # the same experiment through the engine (the widget's call) gives the same image
    res = run_probe("lines-2d", "registered-mean", shape=(96, 96), seed=3, dose=30)
    np.testing.assert_allclose(restored, res.restored, rtol=1e-5, atol=1e-5)
    code, _, err = _run(["probe", "lines-2d", "-o", tmp_path / "x.tif", "--model",
                         "sstem-restore"], capsys)
    assert code != 0 and "sstem" in err and not (tmp_path / "x.tif").exists()


def test_metrics_table_and_json(tmp_path, capsys, rng):
    ref = _texture(rng, (64, 64)).astype(np.float32)
    noisy = ref + rng.normal(scale=20, size=ref.shape).astype(np.float32)
    tifffile.imwrite(tmp_path / "ref.tif", ref)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy)
    code, out, err = _run(["metrics", tmp_path / "noisy.tif", tmp_path / "ref.tif", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    from napari_microrestore.core import metrics
    assert row["psnr"] == pytest.approx(metrics.psnr(noisy, ref))
    assert row["ssim"] == pytest.approx(metrics.ssim(noisy, ref))
    code, out, _ = _run(["metrics", tmp_path / "noisy.tif"], capsys)
    assert code == 0 and "noise" in out and "sharpness" in out
    code, out, _ = _run(["metrics", tmp_path / "ref.tif", "--reference", tmp_path / "ref.tif"], capsys)
    assert code == 0 and "inf" in out
    tifffile.imwrite(tmp_path / "small.tif", ref[:32])
    code, _, err = _run(["metrics", tmp_path / "small.tif", tmp_path / "ref.tif"], capsys)
    assert code != 0 and "shape" in err


def test_console_script_entry_point(tmp_path):
    """The installed `python -m napari_microrestore` runs and fails cleanly on bad input."""
    r = subprocess.run([sys.executable, "-m", "napari_microrestore", "metrics",
                        str(tmp_path / "nope.tif")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "nope.tif" in r.stderr
    assert "Traceback" not in r.stderr


def test_napari_command_starts_napari_with_one_malloc_arena(monkeypatch):
    import os
    import shutil

    calls = []
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    assert cli.main(["napari", "stack.tif", "--plugin", "napari-microrestore"]) == 0
    (exe, argv, env), = calls
    assert exe == "/opt/bin/napari"
    assert argv == [exe, "stack.tif", "--plugin", "napari-microrestore"]
    assert env["MALLOC_ARENA_MAX"] == "1"
    # a user's own setting wins
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    cli.main(["napari"])
    assert calls[-1][2]["MALLOC_ARENA_MAX"] == "4"
