"""Self-ensembles (geometric test-time augmentation) in run_net / restore / evaluate / CLI."""

import json

import numpy as np
import pytest
import tifffile

from napari_microrestore import cli
from napari_microrestore.core.errors import InputError
from napari_microrestore.engine.restore import ENSEMBLES, _load_net, restore, run_net
from napari_microrestore.models.zoo import ENSEMBLE_NAMES, get_card, read_card


def _manual(net, x, members, **kw):
    """The ensemble spelled out in numpy: run each flipped / transposed copy, undo, average."""
    outs = []
    for transpose, fy, fx in members:
        a = x[..., ::-1, :] if fy else x
        a = a[..., ::-1] if fx else a
        a = np.swapaxes(a, -1, -2) if transpose else a
        y, _ = run_net(net, np.ascontiguousarray(a), device="cpu", **kw)
        y = np.swapaxes(y, -1, -2) if transpose else y
        y = y[..., ::-1] if fx else y
        y = y[..., ::-1, :] if fy else y
        outs.append(y)
    return np.mean(outs, axis=0)


def test_names_agree():
    assert tuple(ENSEMBLES) == ENSEMBLE_NAMES == cli._ENSEMBLES
    assert len(ENSEMBLES["flips"]) == 4 and len(ENSEMBLES["dihedral"]) == 8
    assert len(set(ENSEMBLES["dihedral"])) == 8


def test_burst_net_flips_average_the_flipped_answers():
    net = _load_net(get_card("tem-burst-fast"), "cpu")
    x = np.random.default_rng(0).normal(size=(5, 64, 48)).astype(np.float32)
    plain, info = run_net(net, x, burst=True, device="cpu")
    ens, info_ens = run_net(net, x, burst=True, device="cpu", ensemble="flips")
    assert "ensemble" not in info and info_ens["ensemble"] == {"name": "flips", "members": 4}
    expected = _manual(net, x, ENSEMBLES["flips"], burst=True)
    assert np.abs(ens - expected).max() < 1e-4
    # the net is not flip-equivariant, so the ensemble is a different answer
    assert np.abs(ens - plain).max() > 1e-3


def test_dihedral_on_a_2x_net_undoes_transposes_at_the_output_scale():
    net = _load_net(get_card("sr2x"), "cpu")
    x = np.random.default_rng(1).normal(size=(1, 40, 28)).astype(np.float32)
    ens, info = run_net(net, x, burst=False, device="cpu", ensemble="dihedral")
    assert ens.shape == (1, 80, 56) and info["ensemble"]["members"] == 8
    expected = _manual(net, x, ENSEMBLES["dihedral"], burst=False)
    assert np.abs(ens - expected).max() < 1e-4


def test_tiled_ensemble_equals_whole_image():
    net = _load_net(get_card("tem-burst-fast"), "cpu")
    x = np.random.default_rng(2).normal(size=(5, 200, 184)).astype(np.float32)
    whole, _ = run_net(net, x, burst=True, device="cpu", tile=256, ensemble="flips")
    tiled, info = run_net(net, x, burst=True, device="cpu", tile=160, ensemble="flips")
    assert info["tile"] < 200
    assert np.abs(tiled - whole).max() < 1e-4


def _user_card(tmp_path, model_id, ensemble):
    import yaml

    card = get_card(model_id)
    d = yaml.safe_load(card.path.read_text())
    d["weights"]["file"] = str(card.weights_path)
    d["input"]["ensemble"] = ensemble
    p = tmp_path / f"{model_id}-{ensemble}.yaml"
    p.write_text(yaml.safe_dump(d))
    return read_card(p, source="user")


def test_restore_takes_the_cards_ensemble_and_an_override(tmp_path):
    card = _user_card(tmp_path, "sr2x", "flips")
    assert card.ensemble == "flips"
    img = np.random.default_rng(3).random((32, 40)).astype(np.float32) * 100
    res = restore(img, card, device="cpu")
    assert res.provenance["parameters"]["ensemble"] == "flips"
    assert res.provenance["tiling"]["ensemble"]["members"] == 4
    plain = restore(img, card, device="cpu", ensemble="none")
    assert plain.provenance["parameters"]["ensemble"] == "none"
    assert "ensemble" not in plain.provenance["tiling"]
    assert not np.allclose(res.image, plain.image)
    assert get_card("sr2x").ensemble == "none"


def test_bad_ensembles_are_refused(tmp_path):
    frames = np.random.default_rng(4).random((5, 48, 48)).astype(np.float32)
    with pytest.raises(InputError, match="along the columns.*flips"):
        restore(frames, "tem-burst-fast", device="cpu", ensemble="dihedral")
    with pytest.raises(InputError, match="classical"):
        restore(frames, "registered-mean", ensemble="flips")
    with pytest.raises(InputError, match="unknown self-ensemble 'rot'"):
        restore(frames, "tem-burst-fast", device="cpu", ensemble="rot")
    card = _user_card(tmp_path, "sr2x", "sometimes")
    with pytest.raises(InputError, match="input.ensemble must be one of"):
        card.ensemble


def test_cli_ensemble(tmp_path, capsys):
    img = np.random.default_rng(5).random((32, 40)).astype(np.float32)
    path = tmp_path / "in.tif"
    tifffile.imwrite(path, img)
    out = tmp_path / "out.tif"
    assert cli.main(["restore", str(path), "-o", str(out), "--model", "sr2x", "--device", "cpu",
                     "--ensemble", "dihedral"]) == 0
    prov = json.loads((tmp_path / "out.json").read_text())
    assert prov["parameters"]["ensemble"] == "dihedral"
    assert tifffile.imread(out).shape == (64, 80)
    # the card's metrics are for its own set-up: no --write-card with another ensemble
    before = get_card("sr2x").path.read_bytes()
    assert cli.main(["evaluate", "sr2x", "--ensemble", "flips", "--write-card"]) == 2
    assert "set input.ensemble" in capsys.readouterr().err
    assert get_card("sr2x").path.read_bytes() == before


def test_cancel_is_checked_between_members():
    from napari_microrestore.core.errors import Cancelled, CancelToken

    token = CancelToken()
    calls = []

    def net(x):
        calls.append(1)
        token.cancel()   # cancelled while the first member runs
        return x

    x = np.zeros((1, 32, 32), np.float32)
    with pytest.raises(Cancelled):
        run_net(net, x, burst=False, device="cpu", ensemble="dihedral", cancel=token)
    assert len(calls) == 1
