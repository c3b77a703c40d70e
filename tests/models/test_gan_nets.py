"""ResnetGenerator / PatchDiscriminator (defocus), RRDBNet / RelativisticDiscriminator (2x SR)
and SectionRestorer (ssTEM): shapes, documented properties, receptive radius, gradients and
the size of the default configurations."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_microrestore.core.errors import InputError
from napari_microrestore.models._flops import count_parameters, gflops_per_megapixel
from napari_microrestore.models.defocus_gan import PatchDiscriminator, ResnetGenerator
from napari_microrestore.models.rrdb import RelativisticDiscriminator, RRDBNet
from napari_microrestore.models.sstem_net import SectionRestorer

# fp16 weights of at most 25 MB
MAX_PARAMS = 12_500_000


def _randomise_zero_convs(model: nn.Module) -> None:
    """Give the zero-initialised output convolutions random weights, so that every parameter
    influences the output (otherwise the layers before them get exactly zero gradients)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.1)


def _assert_all_grads(model: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def _reach(model: nn.Module, x: torch.Tensor, y0: int, x0: int,
           perturb: Callable[[torch.Tensor], None], scale: int = 1) -> float:
    """Farthest distance (Chebyshev, input pixels) from (y0, x0) of an output pixel that
    changes when ``perturb`` alters the input at (y0, x0); output pixel p of a ``scale``-fold
    net sits at input coordinate (p + 0.5) / scale - 0.5."""
    model = model.double().eval()
    x = x.double()
    x2 = x.clone()
    perturb(x2)
    with torch.no_grad():
        diff = (model(x) - model(x2)).abs().amax(dim=(0, 1))
    ys, xs = torch.nonzero(diff > 0, as_tuple=True)
    assert len(ys) > 0, "the perturbation changed nothing"
    cy = (ys.double() + 0.5) / scale - 0.5
    cx = (xs.double() + 0.5) / scale - 0.5
    return float(torch.maximum((cy - y0).abs(), (cx - x0).abs()).max())


# --------------------------------------------------------------------------------------------
# ResnetGenerator / PatchDiscriminator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("shape", [(2, 1, 32, 48), (1, 1, 8, 12)])
def test_resnet_generator_shapes(norm, shape):
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=4, n_blocks=2, norm=norm)
    assert net.multiple == 4 and net.scale == 1 and net.task == "defocus"
    assert net(torch.randn(shape)).shape == shape


def test_resnet_generator_rejects_bad_input():
    net = ResnetGenerator(ngf=4, n_blocks=1)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.randn(1, 1, 32, 30))
    with pytest.raises(ValueError, match="C = 1"):
        net(torch.randn(1, 2, 32, 32))
    with pytest.raises(InputError, match="norm must be one of"):
        ResnetGenerator(norm="group")
    with pytest.raises(InputError, match="in_channels must equal out_channels"):
        ResnetGenerator(in_channels=2, out_channels=1, residual=True)


def test_resnet_generator_tile_safety_follows_the_norm():
    assert ResnetGenerator(ngf=4, n_blocks=1, norm="instance").tile_safe is False
    assert ResnetGenerator(ngf=4, n_blocks=1, norm="batch").tile_safe is True
    assert ResnetGenerator(ngf=4, n_blocks=1, norm="none").tile_safe is True


def test_resnet_generator_residual_starts_as_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(ResnetGenerator(ngf=4, n_blocks=2, residual=True)(x), x)
    # without the residual the output is the (random) generator's, not the input
    assert not torch.allclose(ResnetGenerator(ngf=4, n_blocks=2, residual=False)(x), x)


def test_resnet_generator_skips_carry_full_resolution_detail():
    """With ``skips`` the encoder's full- and half-resolution features reach the decoder, so
    pixel-scale detail need not squeeze through the 1/4-resolution bottleneck: a small
    generator learns to copy white noise far better with them (without them a CPU-sized
    generator stayed at the identity on the defocus pairs)."""
    def fit(skips: bool) -> float:
        torch.manual_seed(0)
        net = ResnetGenerator(ngf=4, n_blocks=1, norm="none", residual=False, skips=skips)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        x = torch.randn(2, 1, 16, 16)
        for _ in range(40):
            loss = (net(x) - x).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    with_skips, without = fit(True), fit(False)
    assert with_skips < 0.5 * without, (with_skips, without)
    net = ResnetGenerator(ngf=4, n_blocks=2, norm="batch", skips=True)
    assert torch.equal(net(torch.ones(1, 1, 16, 16)), torch.ones(1, 1, 16, 16))  # identity
    _randomise_zero_convs(net)
    _assert_all_grads(net, (net(torch.randn(2, 1, 32, 32)) ** 2).mean())


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_resnet_generator_gradients_reach_every_parameter(norm):
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=4, n_blocks=2, norm=norm)
    _randomise_zero_convs(net)
    out = net(torch.randn(2, 1, 32, 32))
    _assert_all_grads(net, (out ** 2).mean())


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_resnet_generator_receptive_radius_is_a_tight_bound(n_blocks):
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=4, n_blocks=n_blocks, norm="batch")  # InstanceNorm is global
    _randomise_zero_convs(net)
    r = net.receptive_radius
    assert r == 15 + 8 * n_blocks
    size = 2 * r + 26
    y0, x0 = size // 2, size // 2 + 1

    def bump(t):
        t[0, 0, y0, x0] += 1.0

    reach = _reach(net, torch.randn(1, 1, size, size), y0, x0, bump)
    assert reach <= r
    assert reach >= r - 4  # an honest bound, not a generous one


def test_patch_discriminator_is_the_70px_patchgan():
    torch.manual_seed(0)
    d = PatchDiscriminator(ndf=4)
    assert d.receptive_field == 70
    assert d(torch.randn(1, 1, 256, 256)).shape == (1, 1, 30, 30)  # as CycleGAN's
    assert d(torch.randn(2, 1, 64, 96)).shape == (2, 1, 6, 10)
    # the footprint of one logit on the input is the 70x70 patch
    d = PatchDiscriminator(ndf=4, norm="none").double()
    x = torch.randn(1, 1, 128, 128, dtype=torch.float64, requires_grad=True)
    out = d(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1))
    cols = torch.nonzero(x.grad[0, 0].abs().sum(0))
    assert int(rows.max() - rows.min()) + 1 == 70
    assert int(cols.max() - cols.min()) + 1 == 70


def test_patch_discriminator_gradients_and_bad_input():
    torch.manual_seed(0)
    d = PatchDiscriminator(in_channels=2, ndf=4, n_layers=2, norm="batch")
    _assert_all_grads(d, d(torch.randn(2, 2, 64, 64)).mean())
    with pytest.raises(ValueError, match="C = 2"):
        d(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputError, match="n_layers must be >= 1"):
        PatchDiscriminator(n_layers=0)


# --------------------------------------------------------------------------------------------
# RRDBNet / RelativisticDiscriminator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 1, 20, 28), (1, 1, 17, 9)])
def test_rrdb_doubles_the_size(shape):
    torch.manual_seed(0)
    net = RRDBNet(nf=8, gc=4, n_blocks=1)
    assert net.scale == 2 and net.multiple == 1 and net.task == "sr2x"
    n, c, h, w = shape
    assert net(torch.randn(shape)).shape == (n, c, 2 * h, 2 * w)


def test_rrdb_residual_starts_as_bilinear_upsampling():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 24)
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(RRDBNet(nf=8, gc=4, n_blocks=1)(x), up)
    assert not torch.allclose(RRDBNet(nf=8, gc=4, n_blocks=1, residual=False)(x), up, atol=1e-3)


def test_rrdb_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = RRDBNet(nf=8, gc=4, n_blocks=2)
    _randomise_zero_convs(net)
    _assert_all_grads(net, (net(torch.randn(2, 1, 16, 16)) ** 2).mean())


def test_rrdb_receptive_radius_is_a_tight_bound():
    torch.manual_seed(0)
    net = RRDBNet(nf=8, gc=4, n_blocks=1)
    # full-size weights: with ESRGAN's 0.1-scaled start, what reaches far is below the
    # rounding of the residual sums, even in float64
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0.2)
    r = net.receptive_radius
    assert r == 19
    y0, x0 = 31, 34

    def bump(t):
        t[0, 0, y0, x0] += 1.0

    reach = _reach(net, torch.randn(1, 1, 64, 64), y0, x0, bump, scale=2)
    assert r - 1 <= reach <= r


def test_rrdb_rejects_bad_config_and_input():
    with pytest.raises(InputError, match="in_channels must equal out_channels"):
        RRDBNet(in_channels=1, out_channels=3)
    with pytest.raises(ValueError, match="C = 1"):
        RRDBNet(nf=8, gc=4, n_blocks=1)(torch.randn(1, 3, 16, 16))


def test_relativistic_discriminator():
    torch.manual_seed(0)
    d = RelativisticDiscriminator(nf=4, patch_size=64)
    out = d(torch.randn(3, 1, 64, 64))
    assert out.shape == (3, 1)
    _assert_all_grads(d, out.mean())
    with pytest.raises(InputError, match=r"needs \(N, 1, 64, 64\) patches; got \(3, 1, 96, 96\)"):
        d(torch.randn(3, 1, 96, 96))
    with pytest.raises(InputError, match="multiple of 32"):
        RelativisticDiscriminator(patch_size=100)


# --------------------------------------------------------------------------------------------
# SectionRestorer
# --------------------------------------------------------------------------------------------
def _sections(n: int = 2, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, h, w, generator=gen)
    mask = torch.zeros(n, h, w)
    mask[:, h // 4: h // 2, w // 3: w // 2] = 1.0  # a damaged block
    x[:, 3] = mask
    return x


def _tiny_restorer(**kw) -> SectionRestorer:
    torch.manual_seed(0)
    return SectionRestorer(base=4, depth=2, fusion_channels=4, **kw)


def test_section_restorer_shapes_and_branches():
    net = _tiny_restorer()
    assert net.task == "sstem" and net.scale == 1 and net.multiple == 4
    x = _sections(h=32, w=48)
    out, branches = net(x, return_branches=True)
    assert out.shape == (2, 1, 32, 48)
    assert set(branches) == {"interpolation", "correction", "weight"}
    assert all(b.shape == (2, 1, 32, 48) for b in branches.values())
    assert torch.equal(net(x), out)
    assert net(_sections(1, 8, 12)).shape == (1, 1, 8, 12)  # sizes at the multiple


@pytest.mark.parametrize("train", [False, True])
def test_section_restorer_ignores_current_when_the_mask_is_all_ones(train):
    net = _tiny_restorer()
    _randomise_zero_convs(net)  # so that the correction branch really depends on its input
    net.train(train)
    x = _sections()
    x[:, 3] = 1.0
    y = x.clone()
    y[:, 1] = torch.randn(y[:, 1].shape) * 10
    assert torch.equal(net(x), net(y))
    # while a partly damaged section does influence the output
    x[:, 3], y[:, 3] = 0.0, 0.0
    assert not torch.allclose(net(x), net(y))


def test_section_restorer_starts_from_keep_or_interpolate():
    net = _tiny_restorer(mask_prior=4.0).eval()
    x = _sections()
    prev, cur, nxt, mask = x.split(1, dim=1)
    out, br = net(x, return_branches=True)
    w = br["weight"]
    assert torch.allclose(br["interpolation"], 0.5 * (prev + nxt))
    assert torch.allclose(br["correction"], cur * (1 - mask))
    assert bool((w[mask == 0] < 0.02).all()) and bool((w[mask == 1] > 0.98).all())
    intact = mask == 0
    # intact pixels keep the section (up to the 2 % prior weight of the interpolation)
    err = (out - cur).abs()[intact]
    assert bool((err <= 0.02 * (0.5 * (prev + nxt) - cur).abs()[intact] + 1e-6).all())
    # damaged pixels come from the interpolation
    assert torch.allclose(out[~intact], 0.5 * (prev + nxt)[~intact], atol=0.02 * 10)


def test_section_restorer_gradients_reach_every_parameter():
    net = _tiny_restorer()
    _randomise_zero_convs(net)
    out, br = net(_sections(), return_branches=True)
    loss = (out ** 2).mean() + (br["interpolation"] ** 2).mean() + (br["correction"] ** 2).mean()
    _assert_all_grads(net, loss)


def test_section_restorer_receptive_radius_is_a_tight_bound():
    net = _tiny_restorer()
    _randomise_zero_convs(net)
    r = net.receptive_radius
    assert r == 26
    size = 2 * r + 28
    x = _sections(1, size, size)
    x[:, 3] = 0.0
    y0, x0 = size // 2, size // 2 - 1

    def bump(t):
        t[0, :3, y0, x0] += 1.0
        t[0, 3, y0, x0] = 1.0

    reach = _reach(net, x, y0, x0, bump)
    assert r - 4 <= reach <= r


def test_section_restorer_rejects_bad_input():
    net = _tiny_restorer()
    with pytest.raises(ValueError, match="C = 4"):
        net(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(1, 4, 30, 32))
    x = _sections()
    x[0, 3, 0, 0] = 2.0
    with pytest.raises(InputError, match=r"mask \(channel 3\) must lie in \[0, 1\]"):
        net(x)
    with pytest.raises(InputError, match="norm must be one of"):
        SectionRestorer(norm="instance")


# --------------------------------------------------------------------------------------------
# default configurations: size and cost
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, example", [
    (ResnetGenerator, (1, 1, 64, 64)),
    (RRDBNet, (1, 1, 32, 32)),
    (SectionRestorer, (1, 4, 64, 64)),
])
def test_default_configs_fit_the_weight_budget(make, example):
    net = make()
    params = count_parameters(net)
    gflops = gflops_per_megapixel(net, torch.zeros(example))
    print(f"{make.__name__}: {params / 1e6:.2f} M parameters, {gflops:.0f} GFLOP/MP")
    assert params <= MAX_PARAMS
    assert gflops > 0
    assert net.receptive_radius < 256  # the engine caps its tiling halo there
