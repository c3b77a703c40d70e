import pytest
import yaml

from napari_microrestore.core.errors import InputError
from napari_microrestore.models import zoo

torch = pytest.importorskip("torch")


class Tiny(torch.nn.Module):
    task, scale, multiple, receptive_radius = "defocus", 1, 1, 1

    def __init__(self, ch: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(1)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.fixture
def tiny_arch(monkeypatch):
    import napari_microrestore.models as models

    monkeypatch.setattr(models, "architecture_class", lambda name: Tiny)
    return Tiny


def _card(model_id="my-model"):
    return {"id": model_id, "task": "defocus", "architecture": "tiny", "kwargs": {"ch": 4},
            "input": {"channels": 1}, "training": {"data": ["test"], "licence": "none"}}


def test_shipped_cards_are_valid():
    cards = zoo.list_cards()
    ids = [c.id for c in cards]
    assert len(ids) == len(set(ids)) and "registered-mean" in ids
    for c in cards:
        assert c.task in zoo.TASKS
        if not c.is_classical:
            assert zoo.verify_weights(c).is_file()


def test_save_and_load_roundtrip(tmp_path, tiny_arch, monkeypatch):
    monkeypatch.setenv("MICRORESTORE_MODELS", str(tmp_path))
    torch.manual_seed(0)
    net = Tiny()
    card = zoo.save_model(net, _card(), tmp_path, dtype="float32")
    assert card.source == "user" and card.weights["sha256"] == zoo.sha256_file(card.weights_path)
    # it appears in the zoo listing at once, and loads to the same weights
    assert "my-model" in [c.id for c in zoo.list_cards()]
    loaded = zoo.load_model(zoo.get_card("my-model"))
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert not loaded.training


def test_checksum_mismatch_is_refused(tmp_path, tiny_arch):
    card = zoo.save_model(Tiny(), _card(), tmp_path)
    data = bytearray(card.weights_path.read_bytes())
    data[-1] ^= 0xFF
    card.weights_path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum"):
        zoo.load_model(card)


def test_bad_cards(tmp_path, monkeypatch):
    monkeypatch.setenv("MICRORESTORE_MODELS", str(tmp_path))
    (tmp_path / "broken.yaml").write_text("id: [unclosed")
    (tmp_path / "noweights.yaml").write_text(yaml.safe_dump(_card("x")))
    with pytest.raises(InputError, match="YAML|cannot read"):
        zoo.read_card(tmp_path / "broken.yaml")
    with pytest.raises(InputError, match="weights"):
        zoo.read_card(tmp_path / "noweights.yaml")
    # broken user cards do not hide the shipped zoo
    assert "registered-mean" in [c.id for c in zoo.list_cards()]
    with pytest.raises(InputError, match="unknown model"):
        zoo.get_card("does-not-exist")
    with pytest.raises(InputError, match="plain name"):
        zoo.save_model(Tiny(), _card("../evil"), tmp_path)
