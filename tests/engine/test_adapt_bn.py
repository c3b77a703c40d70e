import numpy as np
import pytest

from napari_microrestore.core.errors import InputError
from napari_microrestore.engine.adapt import adapt_bn, burst_batches

torch = pytest.importorskip("torch")


def test_adapt_bn_matches_new_statistics_and_leaves_original():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.Dropout(0.5)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = [torch.randn(4, 1, 16, 16) * 3 + 5 for _ in range(20)]
    adapted = adapt_bn(net, data)
    with torch.no_grad():
        feats = torch.cat([net[0](x) for x in data])
    bn = adapted[1]
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-3)
    assert not adapted.training and bn.momentum == net[1].momentum
    # weights untouched, original untouched
    assert torch.equal(adapted[0].weight, net[0].weight)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_adapt_bn_needs_batchnorm_and_burst_batches_shape():
    with pytest.raises(InputError, match="no BatchNorm"):
        adapt_bn(torch.nn.Conv2d(1, 1, 3), [torch.zeros(1, 1, 8, 8)])
    b = burst_batches(np.random.default_rng(0).random((5, 100, 90)), passes=3, batch=2,
                      patch=64, multiple=16)
    assert len(b) == 3 and tuple(b[0].shape) == (2, 5, 1, 64, 64)
    with pytest.raises(InputError):
        burst_batches(np.zeros((5, 8, 8)), multiple=16)
