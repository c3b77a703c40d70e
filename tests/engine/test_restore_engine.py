import json

import numpy as np
import pytest
import tifffile

from napari_microrestore import cli
from napari_microrestore.core import degrade, metrics, phantoms, probes
from napari_microrestore.core.errors import CancelToken, Cancelled, InputError
from napari_microrestore.engine.restore import missing_sections, resolve_device, restore
from napari_microrestore.models.classical import (MIN_BLUR, restore_classical, richardson_lucy,
                                                  wiener)


@pytest.fixture(scope="module")
def burst():
    rng = np.random.default_rng(0)
    scene = probes.make_probe("spots-lines", (260, 260), rng=rng) * 100 + 10
    return degrade.simulate_burst(scene, 5, shape=(160, 160), blur_length=8, dose=40, rng=rng)


def test_registered_mean_beats_one_frame(burst):
    res = restore(burst.frames, "registered-mean", device="cpu")
    assert res.image.shape == burst.frames.shape[1:] and res.image.dtype == np.float32
    mask = res.registration.coverage
    one = metrics.compare(burst.frames[burst.reference], burst.ground_truth, mask=mask, fit=True)
    mean = metrics.compare(res.image, burst.ground_truth, mask=mask, fit=True)
    assert mean["psnr"] > one["psnr"] + 3  # 5 frames: noise down by sqrt(5)
    prov = res.provenance
    assert prov["model"] == "registered-mean" and prov["device"] == "cpu"
    assert len(prov["registration"]["transforms"]) == 5
    json.dumps(prov)  # provenance is JSON-safe


@pytest.mark.parametrize("name", ["line-pairs", "siemens-star"])
def test_deconvolution_sharpens_a_known_blur(name):
    # noisy, as TEM data are (GCV-chosen Wiener under-regularises at very high SNR)
    rng = np.random.default_rng(1)
    truth = probes.make_probe(name, (128, 128), rng=rng) * 100 + 10
    psf = degrade.motion_psf(9, 90)
    noisy = degrade.convolve_psf(truth, psf) + rng.normal(scale=3.0, size=truth.shape)
    base = metrics.psnr(noisy, truth, border=12)
    assert metrics.psnr(richardson_lucy(noisy, psf, iterations=30), truth, border=12) > base + 1
    assert metrics.psnr(wiener(noisy, psf), truth, border=12) > base + 1


@pytest.fixture(scope="module")
def tem_burst():
    rng = np.random.default_rng(3)
    scene = phantoms.tem_section((320, 320), rng=rng)
    scene = (scene - scene.min()) / np.ptp(scene) + 0.1
    return degrade.simulate_burst(scene, 5, shape=(192, 192), blur_length=10, blur_angle=50,
                                  dose=30, rng=rng)


@pytest.mark.parametrize("method", ["richardson-lucy", "wiener"])
def test_classical_psf_is_measured_on_the_frames_as_recorded(tem_burst, method):
    # registration warps with sub-pixel interpolation, which smooths the noise: measured on
    # the registered frames this burst reads as unblurred and nothing was deconvolved
    res = restore(tem_burst.frames, method, device="cpu")
    info = res.provenance["method"]
    assert info["deconvolved"] is True
    assert abs(info["blur_length"] - 10) < 2
    assert abs((info["blur_angle"] - 50 + 90) % 180 - 90) < 15  # frames jitter by 10
    mean = restore(tem_burst.frames, "registered-mean", device="cpu").image
    cov = res.registration.coverage
    gain = (metrics.compare(res.image, tem_burst.ground_truth, mask=cov, fit=True)["psnr"]
            - metrics.compare(mean, tem_burst.ground_truth, mask=cov, fit=True)["psnr"])
    assert gain > 0.3


def test_classical_without_measured_blur_returns_the_mean(burst):
    # a burst with no motion blur: no PSF to undo, the registered mean comes back as it is
    rng = np.random.default_rng(0)
    scene = phantoms.tem_section((200, 200), rng=rng)
    still = degrade.simulate_burst(scene - scene.min() + 0.1, 4, shape=(128, 128),
                                   blur_length=0, step=2, dose=50, rng=rng)
    mean = restore(still.frames, "registered-mean", device="cpu").image
    for method in ("richardson-lucy", "wiener"):
        res = restore(still.frames, method, device="cpu")
        info = res.provenance["method"]
        assert info["deconvolved"] is False and info["blur_length"] < MIN_BLUR
        assert "not deconvolved" in info["note"]
        np.testing.assert_array_equal(res.image, mean)


def test_cancel_and_progress(burst):
    token = CancelToken()
    seen = []

    def progress(f, msg):
        seen.append(f)
        if f > 0.2:
            token.cancel()

    with pytest.raises(Cancelled):
        restore(burst.frames, "richardson-lucy", progress=progress, cancel=token)
    assert seen and max(seen) < 1.0


def test_bad_input(burst):
    with pytest.raises(InputError, match="3-D"):
        restore(burst.frames[0], "registered-mean")
    with pytest.raises(InputError, match="at least 2 frames"):
        restore(burst.frames[:1], "registered-mean")
    with pytest.raises(InputError, match="outside"):
        restore(burst.frames, "registered-mean", reference=7)
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="unknown classical"):
        restore_classical("magic", burst.frames)


def test_missing_section_detection():
    stack = np.random.default_rng(0).normal(size=(5, 32, 32)).astype(np.float32)
    stack[2] = 0
    assert missing_sections(stack) == [2]


def test_cli_restore_and_models(tmp_path, burst, capsys):
    path = tmp_path / "b.tif"
    tifffile.imwrite(path, burst.frames, photometric="minisblack")
    out = tmp_path / "r.tif"
    assert cli.main(["restore", str(path), "-o", str(out), "--model", "registered-mean"]) == 0
    img = tifffile.imread(out)
    assert img.shape == burst.frames.shape[1:]
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "registered-mean"
    out = tmp_path / "n.tif"
    assert cli.main(["restore", str(path), "-o", str(out), "--model", "tem-burst-fast",
                     "--motion-angle", "0"]) == 0
    assert json.loads((tmp_path / "n.json").read_text())["motion_direction"] == {
        "angle_deg": 0.0, "source": "given", "rotation_deg": -90.0}
    assert cli.main(["models"]) == 0
    assert "registered-mean" in capsys.readouterr().out
    bad = tmp_path / "x.tif"
    assert cli.main(["restore", str(path), "-o", str(bad), "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err and not bad.exists()


def test_zoo_net_tiled_equals_whole_image():
    """The shipped fast burst net, run tile by tile (halo = its receptive radius), equals the
    whole-image result."""
    from napari_microrestore.engine.restore import _load_net, run_net
    from napari_microrestore.models.zoo import get_card

    net = _load_net(get_card("tem-burst-fast"), "cpu")
    x = np.random.default_rng(3).normal(size=(5, 200, 184)).astype(np.float32)
    whole, info_whole = run_net(net, x, burst=True, device="cpu", tile=256)
    tiled, info = run_net(net, x, burst=True, device="cpu", tile=160)
    assert info_whole["tile"] >= 200 and info["tile"] < 200
    assert np.abs(tiled - whole).max() < 1e-4


# ------------------------------------------------------------------ stage-motion orientation
@pytest.fixture(scope="module")
def sideways_burst():
    """A burst whose stage moves along the rows (0 degrees), unlike the training bursts."""
    rng = np.random.default_rng(4)
    scene = probes.make_probe("spots-lines", (200, 200), rng=rng) * 100 + 10
    return degrade.simulate_burst(scene, 5, shape=(96, 112), blur_length=8, blur_angle=0.0,
                                  angle_jitter=3.0, dose=40, rng=rng)


def test_a_sideways_burst_is_turned_for_the_net_and_back(sideways_burst):
    pytest.importorskip("torch")
    from napari_microrestore.core.orient import net_rotation

    frames = sideways_burst.frames
    side = restore(frames, "tem-burst-fast", device="cpu")
    md = side.provenance["motion_direction"]
    assert md["source"] == "registration" and abs(md["rotation_deg"]) > 80
    assert md["rotation_deg"] == round(net_rotation(md["angle_deg"]), 2)
    assert min(md["angle_deg"], 180 - md["angle_deg"]) < 10
    assert side.image.shape == frames.shape[1:]
    # a quarter turn is exact: the burst turned by hand gives the turned answer (registered
    # frames, so that ECC's own small asymmetries between rows and columns do not enter)
    aligned = side.registration.aligned
    by_angle = restore(aligned, "tem-burst-fast", device="cpu", register=False, motion_angle=0)
    upright = restore(np.ascontiguousarray(np.rot90(aligned, -1, axes=(1, 2))),
                      "tem-burst-fast", device="cpu", register=False, motion_angle=90)
    assert by_angle.provenance["motion_direction"]["rotation_deg"] == -90.0
    assert upright.provenance["motion_direction"]["rotation_deg"] == 0.0
    np.testing.assert_allclose(by_angle.image, np.rot90(upright.image), rtol=0,
                               atol=1e-5 * float(np.ptp(upright.image)))
    # the registration of the turned burst finds the turned motion
    turned = restore(np.ascontiguousarray(frames.transpose(0, 2, 1)), "tem-burst-fast",
                     device="cpu")
    md = turned.provenance["motion_direction"]
    assert abs(md["rotation_deg"]) < 10 and abs(md["angle_deg"] - 90) < 10
    # a given direction wins over the registration's
    told = restore(frames, "tem-burst-fast", device="cpu", motion_angle=90)
    assert told.provenance["motion_direction"] == {"angle_deg": 90.0, "source": "given",
                                                   "rotation_deg": 0.0}
    assert not np.allclose(told.image, side.image)


@pytest.mark.parametrize("angle", [0.0, 30.0, 60.0, 150.0])
def test_the_net_sees_the_stage_move_along_the_columns(angle, monkeypatch):
    """Whatever the direction, the frames reach the net moving along the columns (the shift
    between the first and last frame, on the net's canvas, is vertical), and the answer comes
    back on the input's grid."""
    pytest.importorskip("torch")
    from napari_microrestore.core.registration import phase_correlation
    from napari_microrestore.engine import restore as engine

    rng = np.random.default_rng(7)
    scene = probes.make_probe("spots-lines", (320, 320), rng=rng) * 100 + 10
    burst = degrade.simulate_burst(scene, 5, shape=(128, 144), blur_length=2, blur_angle=angle,
                                   angle_jitter=0.0, step=3.0, position_jitter=0.0, dose=500,
                                   rng=rng)
    seen = {}
    real = engine.run_net

    def spy(net, x, **kw):
        seen["x"] = x
        return real(net, x, **kw)

    monkeypatch.setattr(engine, "run_net", spy)
    res = restore(burst.frames, "tem-burst-fast", device="cpu", register=False,
                  motion_angle=angle)
    x = seen["x"]
    dy, dx = phase_correlation(x[0], x[-1])[:2]
    assert abs(dx) < 0.1 * abs(dy) and abs(dy) > 10  # 12 px along the motion
    assert res.image.shape == burst.frames.shape[1:] and np.isfinite(res.image).all()
    # a slanted motion needs a larger canvas, a quarter turn swaps the sides
    assert (np.prod(x.shape[1:]) > burst.frames[0].size) == (angle % 90 != 0)


def test_burst_orientation_rules(sideways_burst):
    from napari_microrestore.engine.restore import burst_orientation
    from napari_microrestore.models.zoo import get_card

    net, mean = get_card("tem-burst-fast"), get_card("registered-mean")
    frames = sideways_burst.frames
    assert burst_orientation(mean, frames.shape, None, 0.0) == {
        "angle_deg": None, "source": "not needed", "rotation_deg": 0.0}
    assert burst_orientation(net, frames.shape, None, 200.0)["angle_deg"] == 20.0  # modulo 180
    for angle, turn in ((0.0, -90.0), (44.0, -46.0), (90.0, 0.0), (135.0, 45.0),
                        (179.996, -90.0), (136.5, 46.5)):
        assert burst_orientation(net, frames.shape, None, angle)["rotation_deg"] == turn
    with pytest.raises(InputError, match="motion_angle"):
        burst_orientation(net, frames.shape, None, "sideways")
    # frames that did not move, or were registered before, and no frames to read the blur of
    still = np.tile(np.eye(2, 3), (5, 1, 1))
    for reg in (still, None):
        assert burst_orientation(net, frames.shape, reg) == {"angle_deg": None, "source": "unknown",
                                                       "rotation_deg": 0.0}
        # the blur in the frames says the stage moved along the rows
        by_blur = burst_orientation(net, frames.shape, reg, frames=frames)
        assert by_blur["source"] == "blur" and abs(by_blur["rotation_deg"]) > 75
        assert min(by_blur["angle_deg"], 180 - by_blur["angle_deg"]) < 15
        upright = burst_orientation(net, frames.shape, reg,
                                    frames=np.ascontiguousarray(frames.transpose(0, 2, 1)))
        assert upright["source"] == "blur" and abs(upright["rotation_deg"]) < 15
        # pure noise has no blur to read: unknown, not a guess
        noise = np.random.default_rng(0).poisson(30.0, frames.shape).astype(np.float32)
        assert burst_orientation(net, frames.shape, reg, frames=noise) == {
            "angle_deg": None, "source": "unknown", "rotation_deg": 0.0}
    # the registration's direction comes before the blur's
    assert burst_orientation(net, frames.shape, None, 90.0, frames=frames)["source"] == "given"


def test_a_stream_holds_its_direction_until_the_stage_turns(sideways_burst):
    """``prior``: a reading within HOLD_DEG of the previous window's direction keeps it, a
    turn is followed, and a burst that tells no direction takes it without reading blur."""
    from napari_microrestore.engine.restore import HOLD_DEG, burst_orientation
    from napari_microrestore.models.zoo import get_card

    net = get_card("tem-burst-fast")
    frames = sideways_burst.frames

    def moving(angle):  # offsets of 5 frames 4 px apart along ``angle``
        t = np.tile(np.eye(2, 3), (5, 1, 1))
        rad = np.radians(angle)
        for i in range(5):
            t[i, 0, 2], t[i, 1, 2] = 4 * (i - 2) * np.cos(rad), 4 * (i - 2) * np.sin(rad)
        return t

    read = burst_orientation(net, frames.shape, moving(31.0))
    assert read["source"] == "registration" and read["angle_deg"] == pytest.approx(31.0)
    held = burst_orientation(net, frames.shape, moving(31.0), prior=28.0)
    assert held == {"angle_deg": 28.0, "source": "previous window",
                    "rotation_deg": -62.0, "read_deg": pytest.approx(31.0)}
    # modulo 180: 178 and 2 degrees are 4 apart
    assert burst_orientation(net, frames.shape, moving(2.0), prior=178.0)["angle_deg"] == 178.0
    turned = burst_orientation(net, frames.shape, moving(31.0 + HOLD_DEG + 1), prior=31.0)
    assert turned["source"] == "registration"
    assert turned["angle_deg"] == pytest.approx(31.0 + HOLD_DEG + 1)
    # a window whose stage did not move keeps the direction, though its frames are blurred
    # sideways
    still = np.tile(np.eye(2, 3), (5, 1, 1))
    assert burst_orientation(net, frames.shape, still, frames=frames, prior=95.0) == {
        "angle_deg": 95.0, "source": "previous window", "rotation_deg": 5.0, "read_deg": None}
    # a given direction wins over the prior
    assert burst_orientation(net, frames.shape, moving(31.0), 90.0, prior=28.0)["source"] == "given"
    with pytest.raises(InputError, match="motion_prior"):
        burst_orientation(net, frames.shape, moving(31.0), prior=float("nan"))


def test_a_pre_registered_sideways_burst_is_turned_by_its_blur():
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    scene = probes.make_probe("spots-lines", (420, 420), rng=rng) * 100 + 10
    burst = degrade.simulate_burst(scene, 5, shape=(192, 192), blur_length=8, blur_angle=0.0,
                                   angle_jitter=3.0, dose=40, rng=rng)
    aligned = restore(burst.frames, "tem-burst-fast", device="cpu").registration.aligned
    # registered elsewhere: the blur of the reference frame (not warped) tells the direction
    unsaid = restore(aligned, "tem-burst-fast", device="cpu", register=False)
    md = unsaid.provenance["motion_direction"]
    assert md["source"] == "blur" and abs(md["rotation_deg"]) > 75
    told = restore(aligned, "tem-burst-fast", device="cpu", register=False,
                   motion_angle=md["angle_deg"])
    np.testing.assert_array_equal(unsaid.image, told.image)
    upright = restore(np.ascontiguousarray(aligned.transpose(0, 2, 1)), "tem-burst-fast",
                      device="cpu", register=False).provenance["motion_direction"]
    assert upright["source"] == "blur" and abs(upright["rotation_deg"]) < 15


def test_a_card_can_take_any_direction(tmp_path):
    import yaml

    from napari_microrestore.models.zoo import get_card, read_card

    card = get_card("tem-burst-fast")
    assert card.motion_axis == "vertical"
    d = yaml.safe_load(card.path.read_text())
    d["weights"]["file"] = str(card.weights_path)
    for axis, expected in (("any", None), ("diagonal", InputError)):
        d["input"]["motion_axis"] = axis
        p = tmp_path / f"{axis}.yaml"
        p.write_text(yaml.safe_dump(d))
        c = read_card(p, source="user")
        if expected is None:
            assert c.motion_axis is None
        else:
            with pytest.raises(InputError, match="motion_axis"):
                c.motion_axis
