"""Batch restoration into OME-Zarr: planning, blocks, resume, failures, and a 2-worker Dask
LocalCluster on loopback (same result as one process, survives a killed worker)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from scipy import ndimage

from napari_microrestore.core import io
from napari_microrestore.core.errors import CancelToken, InputError
from napari_microrestore.engine import batch
from napari_microrestore.engine.restore import restore, run_net

zarr = pytest.importorskip("zarr")


def _scene(rng, shape):
    return ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 300 + 1000


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory):
    """10 frames of 32 x 40 px, a scene drifting by one pixel per frame, 0.8 nm pixels."""
    rng = np.random.default_rng(7)
    scene = _scene(rng, (60, 60))
    frames = np.stack([scene[10 + t // 2:42 + t // 2, 8 + t % 3:48 + t % 3] for t in range(10)])
    frames = rng.poisson(frames).astype(np.uint16)
    path = tmp_path_factory.mktemp("stream") / "stream.tif"
    io.write_tiff(path, frames, axes="TYX", pixel_size=(1.0, 0.8, 0.8), unit="nm")
    return path


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    """Tiny random nets saved as user model cards: a burst net and a 2x super-resolver."""
    import torch

    from napari_microrestore.models import build
    from napari_microrestore.models.zoo import save_model

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    kw = {"channels": [4, 4, 4], "head_channels": 4}
    burst_card = save_model(build("burst-fast", kw).eval(), {
        "id": "tiny-burst", "task": "burst-deblur", "architecture": "burst-fast", "kwargs": kw,
        "input": {"frames": {"min": 2, "max": 5, "default": 3}, "channels": 1, "multiple": 8,
                  "scale": 1}}, folder, dtype="float32")
    kw = {"nf": 8, "gc": 4, "n_blocks": 1}
    sr_card = save_model(build("rrdb", kw).eval(), {
        "id": "tiny-sr2x", "task": "sr2x", "architecture": "rrdb", "kwargs": kw,
        "input": {"frames": 1, "channels": 1, "multiple": 1, "scale": 2}}, folder,
        dtype="float32")
    return {"burst": str(burst_card.path), "sr": str(sr_card.path)}


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  silence_logs=logging.ERROR) as c:
        yield c


def _read(path):
    return zarr.open_array(str(path / "0"), mode="r")[...]


# ------------------------------------------------------------------------------ planning
def test_stream_windows_and_blocks():
    assert [batch.window_bounds(c, 10, 5) for c in (0, 1, 2, 5, 8, 9)] == [
        (0, 5), (0, 5), (0, 5), (3, 8), (5, 10), (5, 10)]
    assert batch.window_bounds(1, 3, 5) == (0, 3)  # shorter stream than the window
    blocks = batch.plan_stream(10, (8, 6), window=5, block=4)
    assert [b.out[0] for b in blocks] == [(0, 4), (4, 8), (8, 10)]
    assert [b.read[0] for b in blocks] == [(0, 6), (2, 10), (5, 10)]
    assert all(b.out[1:] == ((0, 8), (0, 6)) == b.read[1:] for b in blocks)


def test_stack_blocks_are_chunk_aligned_and_cover_once():
    blocks = batch.plan_stack((2, 100, 70), block=32, halo=8, scale=2)
    cover = np.zeros((2, 200, 140), int)
    for b in blocks:
        z, (y0, y1), (x0, x1) = b.out[0][0], b.out[1], b.out[2]
        assert y0 % 64 == 0 and x0 % 64 == 0  # starts on (1, 64, 64) chunk boundaries
        cover[z, y0:y1, x0:x1] += 1
        (ry0, ry1), (rx0, rx1) = b.read[1:]
        assert ry0 == max(0, y0 // 2 - 8) and ry1 == min(100, y1 // 2 + 8)
        assert rx0 == max(0, x0 // 2 - 8) and rx1 == min(70, x1 // 2 + 8)
    assert (cover == 1).all()
    assert len(batch.plan_stack((100, 70), 32, 8)) == 4 * 3


# ------------------------------------------------------------------------------ one process
def test_stream_equals_restore_per_window_and_reads_back(stream_file, tmp_path):
    out = tmp_path / "out.zarr"
    updates = []
    s = batch.run_batch([stream_file], out, "registered-mean", workers=0, block=4,
                        on_update=updates.append)
    assert s.complete and s.blocks_done == 3 and not s.failures and s.blocks_skipped == 0
    assert [u.done for u in updates] == [1, 2, 3] and all(u.total == 3 for u in updates)
    got = _read(out)
    frames = io.read_array(stream_file).astype(np.float32)
    assert got.shape == frames.shape and got.dtype == np.float32
    for c in (0, 4, 9):
        s0, s1 = batch.window_bounds(c, 10, 5)
        want = restore(frames[s0:s1], "registered-mean", reference=c - s0).image
        np.testing.assert_array_equal(got[c], want)
    # the output is OME-Zarr that core.io (and so napari's reader) opens lazily, calibrated
    img = io.read(out)
    assert img.axes == "TYX" and img.pixel_size == (1.0, 0.8, 0.8) and img.unit == "nm"
    assert isinstance(img.data, zarr.Array) and img.metadata["ome_zarr_version"] == "0.4"
    prov = img.metadata["microrestore"]["provenance"]
    assert prov["model"] == "registered-mean" and prov["parameters"]["window"] == 5
    recs = sorted((out / ".microrestore" / "blocks").iterdir())
    assert [json.loads(r.read_text())["block"] for r in recs] == [0, 1, 2]
    # napari's reader (this plugin's) opens it lazily as one calibrated image layer
    from napari_microrestore._napari._reader import napari_get_reader

    reader = napari_get_reader(str(out))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(out))
    assert kind == "image" and isinstance(data, zarr.Array) and kwargs["name"] == "out"
    assert kwargs["scale"] == (1.0, 0.8, 0.8) and kwargs["units"] == ("pixel", "nm", "nm")


def test_reads_ome_zarr_0_5_and_plain_arrays(tmp_path):
    g = zarr.open_group(str(tmp_path / "v5.zarr"), mode="w", zarr_format=3)
    g.create_array("s0", shape=(3, 16, 20), chunks=(1, 16, 20), dtype="uint16")[...] = 7
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "z", "type": "space", "unit": "micrometer"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [0.5, 0.25, 0.25]}]}]}]}
    assert io.is_ome_zarr(tmp_path / "v5.zarr")
    img = io.read(tmp_path / "v5.zarr")
    assert img.axes == "ZYX" and img.pixel_size == (0.5, 0.25, 0.25) and img.unit == "um"
    assert img.metadata["ome_zarr_version"] == "0.5" and img.data[0, 0, 0] == 7
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 8), dtype="float32",
                      fill_value=1.0)
    assert not io.is_ome_zarr(tmp_path / "plain.zarr")
    plain = io.read(tmp_path / "plain.zarr", lazy=False)
    assert plain.axes == "YX" and plain.pixel_size is None and (plain.data == 1).all()
    bare = tmp_path / "group.zarr"
    zarr.open_group(str(bare), mode="w")
    with pytest.raises(InputError, match="without OME-Zarr multiscales"):
        io.read(bare)


def test_stack_blocks_match_the_whole_image(cards, tmp_path):
    from napari_microrestore.engine.restore import _load_net
    from napari_microrestore.models.zoo import read_card

    rng = np.random.default_rng(3)
    stack = _scene(rng, (2, 40, 56)).astype(np.float32)
    src = tmp_path / "stack.tif"
    io.write_tiff(src, stack, axes="ZYX", pixel_size=(2.0, 1.0, 1.0), unit="nm")
    out = tmp_path / "sr.zarr"
    s = batch.run_batch([src], out, cards["sr"], workers=0, block=16, device="cpu")
    assert s.complete and s.blocks_total == 2 * 3 * 4
    got = _read(out)
    assert got.shape == (2, 80, 112)
    card = read_card(cards["sr"])
    mean, std = batch._sample_stats(stack)
    net = _load_net(card, "cpu")
    for z in range(2):
        whole, _ = run_net(net, ((stack[z] - mean) / std)[None], burst=False, device="cpu")
        np.testing.assert_allclose(got[z], whole[0] * std + mean, rtol=0, atol=2e-3)
    img = io.read(out)
    assert img.axes == "ZYX" and img.pixel_size == (2.0, 0.5, 0.5)
    zattrs = json.loads((out / ".zattrs").read_text())
    transforms = zattrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert transforms[1] == {"type": "translation", "translation": [0.0, -0.25, -0.25]}


def test_self_ensemble_in_blocks_and_part_of_the_settings(stream_file, cards, tmp_path):
    """Stack blocks with a dihedral ensemble equal the whole-image ensemble; a stream with
    flips equals restore() per window; an output made without an ensemble is not resumed
    with one; a burst net refuses transposes."""
    from napari_microrestore.engine.restore import _load_net
    from napari_microrestore.models.zoo import get_card

    sr2x = get_card("sr2x")   # trained: unlike the tiny random nets, not flip-equivariant
    rng = np.random.default_rng(4)
    image = _scene(rng, (40, 56)).astype(np.float32)
    src = tmp_path / "image.tif"
    io.write_tiff(src, image, axes="YX")
    out = tmp_path / "sr.zarr"
    s = batch.run_batch([src], out, sr2x, workers=0, block=16, device="cpu",
                        ensemble="dihedral")
    assert s.complete
    mean, std = batch._sample_stats(image)
    net = _load_net(sr2x, "cpu")
    whole, _ = run_net(net, ((image - mean) / std)[None], burst=False, device="cpu",
                       ensemble="dihedral")
    plain, _ = run_net(net, ((image - mean) / std)[None], burst=False, device="cpu")
    got = _read(out)
    assert got.shape == (80, 112) and np.abs(whole - plain).max() * std > 0.1
    np.testing.assert_allclose(got, whole[0] * std + mean, rtol=0, atol=2e-3)
    prov = io.read(out).metadata["microrestore"]["provenance"]
    assert prov["parameters"]["ensemble"] == "dihedral"
    with pytest.raises(InputError, match="other inputs or settings"):
        batch.run_batch([src], out, sr2x, workers=0, block=16, device="cpu")

    out = tmp_path / "stream.zarr"
    s = batch.run_batch([stream_file], out, cards["burst"], workers=0, block=5, window=3,
                        device="cpu", ensemble="flips")
    assert s.complete
    frames = io.read_array(stream_file).astype(np.float32)
    s0, s1 = batch.window_bounds(4, 10, 3)
    want = restore(frames[s0:s1], cards["burst"], device="cpu", reference=4 - s0,
                   ensemble="flips").image
    np.testing.assert_allclose(_read(out)[4], want, rtol=0, atol=1e-3 * np.abs(want).max())
    with pytest.raises(InputError, match="use 'flips'"):
        batch.run_batch([stream_file], tmp_path / "d.zarr", cards["burst"], workers=0,
                        ensemble="dihedral")


def test_resume_after_interruption_equals_uninterrupted_run(stream_file, tmp_path):
    full = tmp_path / "full.zarr"
    batch.run_batch([stream_file], full, "registered-mean", workers=0, block=2)
    out = tmp_path / "part.zarr"
    first = batch.run_batch([stream_file], out, "registered-mean", workers=0, block=2,
                            max_blocks=2)
    assert first.blocks_done == 2 and not first.complete and "run the same" in first.text()
    assert np.isnan(_read(out)[4:]).all()  # missing blocks read NaN, never plausible zeros
    # a cancel token stops a run between blocks
    token = CancelToken()
    cancelled = batch.run_batch([stream_file], out, "registered-mean", workers=0, block=2,
                                on_update=lambda u: token.cancel(), cancel=token)
    assert cancelled.interrupted and cancelled.blocks_done == 1
    # a crash between a block's data and its record: no record, so the block is redone
    (out / ".microrestore" / "blocks" / "0000001.json").unlink()
    second = batch.run_batch([stream_file], out, "registered-mean", workers=0, block=2)
    assert second.blocks_skipped == 2 and second.blocks_done == 3 and second.complete
    np.testing.assert_array_equal(_read(out), _read(full))
    third = batch.run_batch([stream_file], out, "registered-mean", workers=0, block=2)
    assert third.blocks_skipped == 5 and third.blocks_done == 0
    # --verify: a block whose data no longer match its record's sha256 is restored again
    arr = zarr.open_array(str(out / "0"), mode="r+")
    arr[6] = 0
    fixed = batch.run_batch([stream_file], out, "registered-mean", workers=0, block=2,
                            verify=True)
    assert fixed.blocks_done == 1 and fixed.blocks_skipped == 4
    np.testing.assert_array_equal(_read(out), _read(full))


def test_failing_block_is_retried_then_reported(stream_file, tmp_path):
    attempts = []

    def flaky(block):
        if block.index == 1:
            attempts.append(block.index)
            raise RuntimeError("disk full")

    out = tmp_path / "f.zarr"
    s = batch.run_batch([stream_file], out, "registered-mean", workers=0, block=4, retries=1,
                        before_block=flaky)
    assert attempts == [1, 1] and s.blocks_done == 2 and not s.complete
    assert [(f.index, f.reason) for f in s.failures] == [(1, "RuntimeError: disk full")]
    assert "block 1" in s.text() and "disk full" in s.text()
    assert np.isnan(_read(out)[4:8]).all()
    again = batch.run_batch([stream_file], out, "registered-mean", workers=0, block=4)
    assert again.blocks_done == 1 and again.complete and not np.isnan(_read(out)).any()


def test_bad_inputs(stream_file, cards, tmp_path):
    with pytest.raises(InputError, match="ending in .zarr"):
        batch.plan_batch([stream_file], tmp_path / "o.tif", "registered-mean")
    with pytest.raises(InputError, match="ssTEM"):
        batch.plan_batch([stream_file], tmp_path / "o.zarr", "sstem-restore")
    img = tmp_path / "one.tif"
    io.write_tiff(img, np.ones((32, 32), np.float32))
    with pytest.raises(InputError, match=r"\(T, Y, X\)"):
        batch.plan_batch([img], tmp_path / "o.zarr", "registered-mean")
    with pytest.raises(InputError, match="--window 9"):
        batch.plan_batch([stream_file], tmp_path / "o.zarr", cards["burst"], window=9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no TIFF"):
        batch.plan_batch([tmp_path / "empty"], tmp_path / "o.zarr", "registered-mean")
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("not ours")
    with pytest.raises(InputError, match="not a microrestore batch output"):
        batch.run_batch([stream_file], other, "registered-mean", workers=0, overwrite=True)
    assert (other / "keep.txt").exists()  # never deleted
    out = tmp_path / "o.zarr"
    batch.run_batch([stream_file], out, "registered-mean", workers=0, max_blocks=0)
    with pytest.raises(InputError, match="other inputs or settings"):
        batch.run_batch([stream_file], out, "registered-mean", workers=0, block=3)
    s = batch.run_batch([stream_file], out, "registered-mean", workers=0, block=3,
                        overwrite=True, max_blocks=1)
    assert s.blocks_done == 1 and s.blocks_total == 4


def test_missing_dask_names_the_extra(monkeypatch):
    import sys

    # a None entry in sys.modules makes any import of it fail, as if it were not installed
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(InputError, match=r'napari-microrestore\[batch\]'):
        batch._need("distributed")


# ------------------------------------------------------------------------------ Dask cluster
def test_cluster_equals_single_process_and_one_model_per_worker(stream_file, cards, cluster,
                                                                tmp_path):
    kw = {"block": 2, "register": False, "device": "cpu", "threads": 1}
    here = batch.run_batch([stream_file], tmp_path / "here.zarr", cards["burst"], workers=0,
                           **kw)
    dist = batch.run_batch([stream_file], tmp_path / "dist.zarr", cards["burst"],
                           scheduler=cluster.scheduler_address, **kw)
    assert here.complete and dist.complete and dist.workers == 2 and not dist.failures
    np.testing.assert_array_equal(_read(tmp_path / "dist.zarr"), _read(tmp_path / "here.zarr"))
    assert not np.isnan(_read(tmp_path / "dist.zarr")).any()
    # every worker process loaded the network once and reused it for all its blocks
    nets: dict[str, set] = {}
    for d in dist.done:
        nets.setdefault(d.worker, set()).add(d.net_id)
    assert all(len(ids) == 1 for ids in nets.values())
    assert os.getpid() not in {int(w.rsplit(":", 1)[1]) for w in nets}


def test_killed_worker_mid_run_still_gives_complete_output(stream_file, cards, cluster,
                                                           tmp_path):
    marker = tmp_path / "killed-once"

    def kill_once(block):
        if block.index == 2:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(1)  # the worker process dies in the middle of the run

    kw = {"block": 2, "register": False, "device": "cpu", "threads": 1}
    ref = batch.run_batch([stream_file], tmp_path / "ref.zarr", cards["burst"], workers=0,
                          **kw)
    s = batch.run_batch([stream_file], tmp_path / "k.zarr", cards["burst"],
                        scheduler=cluster.scheduler_address, before_block=kill_once, **kw)
    assert marker.exists()  # a worker really died
    assert s.complete and not s.failures and s.blocks_done == ref.blocks_done == 5
    np.testing.assert_array_equal(_read(tmp_path / "k.zarr"), _read(tmp_path / "ref.zarr"))
