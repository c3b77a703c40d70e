"""DeblurGAN-v2-style single-image baseline (FPN over a MobileNetV2-like backbone)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_microrestore.models._flops import count_parameters, gflops_per_megapixel
from napari_microrestore.models.deblurgan_v2 import DeblurGANv2


def _tiny(in_channels: int = 3, trained_last_conv: bool = True) -> DeblurGANv2:
    torch.manual_seed(0)
    net = DeblurGANv2(
        in_channels=in_channels,
        width=0.25,
        stage_repeats=(1, 1, 1, 1, 1, 1),
        fpn_channels=8,
        head_channels=4,
    )
    if trained_last_conv:  # the residual conv starts at zero; give it weights
        nn.init.normal_(net.final.weight, std=0.3)
    return net


def _frames(n: int, c: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_shape_and_attributes() -> None:
    net = _tiny()
    out = net(_frames(2, 3, 64))
    assert out.shape == (2, 1, 64, 64)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert net.task == "single-deblur" and net.scale == 1 and net.multiple == 32


@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_untrained_net_returns_the_centre_frame(in_channels: int) -> None:
    net = _tiny(in_channels, trained_last_conv=False)
    x = _frames(1, in_channels, 64)
    out = net(x)
    centre = in_channels // 2
    assert torch.equal(out, x[:, centre : centre + 1])
    (out - torch.randn_like(out)).square().mean().backward()
    assert net.final.weight.grad.abs().sum() > 0


def test_frame_order_matters() -> None:
    # three frames as channels: not permutation-invariant, by design
    net = _tiny().eval()
    x = _frames(1, 3, 64)
    with torch.no_grad():
        diff = net(x[:, [2, 1, 0]]) - net(x)
    assert diff.abs().max() > 1e-4


def test_receptive_radius_is_an_upper_bound() -> None:
    net = _tiny().eval()
    radius, size = net.receptive_radius, 352
    assert 2 * radius + 1 < size
    x = _frames(1, 3, size)
    cy, cx = size // 2 - 1, size // 2 + 3
    poked = x.clone()
    poked[0, 0, cy, cx] += 10.0
    with torch.no_grad():
        diff = (net(poked) - net(x))[0, 0].abs()
    ys, xs = torch.nonzero(diff > 0, as_tuple=True)
    reach = max((ys - cy).abs().max().item(), (xs - cx).abs().max().item())
    assert radius // 2 < reach <= radius


def test_receptive_radius_grows_with_depth() -> None:
    shallow = DeblurGANv2(stage_repeats=(1, 1, 1, 1, 1, 1)).receptive_radius
    assert shallow < DeblurGANv2().receptive_radius


def test_gradients_reach_every_parameter() -> None:
    net = _tiny().train()
    out = net(_frames(2, 3, 64))
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_batchnorm_statistics_adapt_in_train_mode() -> None:
    # what adapt_bn relies on: forward passes in train mode move the running statistics
    net = _tiny().train()
    bn = net.stem[1]
    before = bn.running_mean.clone()
    with torch.no_grad():
        net(_frames(2, 3, 64) * 3.0 + 2.0)
    assert not torch.allclose(bn.running_mean, before)


def test_default_config_size_and_cost() -> None:
    net = DeblurGANv2()
    assert count_parameters(net) < 12_000_000
    gflops = gflops_per_megapixel(net, torch.randn(1, 3, 128, 128))
    assert 60 < gflops < 100  # "about 80 GFLOP per megapixel"


def test_bad_inputs_raise_clear_errors() -> None:
    net = _tiny()
    with pytest.raises(ValueError, match="4-D tensor"):
        net(torch.zeros(1, 1, 3, 64, 64))
    with pytest.raises(ValueError, match="C = 3"):
        net(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.zeros(1, 3, 64, 48))


@pytest.mark.parametrize(
    "kwargs",
    [{"in_channels": 2}, {"stage_repeats": (1, 1, 1)}, {"width": 0.0}, {"head_channels": 1}],
)
def test_bad_configs_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DeblurGANv2(**kwargs)
