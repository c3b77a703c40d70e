"""Burst networks (BurstUNet, BurstDenseUNet, BurstFastNet) and the shared model helpers."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from napari_microrestore.models._flops import Span, count_parameters, gflops_per_megapixel
from napari_microrestore.models.burst_dense_unet import BurstDenseUNet
from napari_microrestore.models.burst_fast import BurstFastNet
from napari_microrestore.models.burst_unet import BurstUNet


def _tiny_unet() -> nn.Module:
    return BurstUNet(channels=(4, 6, 8, 8, 8))


def _tiny_dense() -> nn.Module:
    return BurstDenseUNet(stem_channels=6, growth_rate=3, layers_per_block=2)


def _tiny_fast() -> nn.Module:
    net = BurstFastNet(channels=(4, 8, 8), head_channels=4)
    # the residual conv starts at zero (output = mean of the frames); give it weights so that
    # the properties below are tested on a net whose output depends on all its layers
    nn.init.normal_(net.head.weight, std=0.3)
    return net


TINY: dict[str, Callable[[], nn.Module]] = {
    "unet": _tiny_unet,
    "dense": _tiny_dense,
    "fast": _tiny_fast,
}


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return TINY[name]()


def _burst(n: int, t: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, t, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_shape_and_attributes(name: str) -> None:
    net = _make(name)
    out = net(_burst(2, 3, 32))
    assert out.shape == (2, 1, 32, 32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert net.task == "burst-deblur" and net.scale == 1
    assert 32 % net.multiple == 0
    assert isinstance(net.receptive_radius, int) and net.receptive_radius > 0


@pytest.mark.parametrize("name", TINY)
def test_permutation_invariance(name: str) -> None:
    net = _make(name).eval()
    x = _burst(1, 5, 32)
    with torch.no_grad():
        ref = net(x)
        shuffled = net(x[:, [3, 0, 4, 2, 1]])
        changed = x.clone()
        changed[:, 2] = torch.randn_like(changed[:, 2])
        other = net(changed)
    torch.testing.assert_close(shuffled, ref, atol=1e-5, rtol=0)
    # invariance is not indifference: every frame counts
    assert (other - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("frames", [1, 3, 7])
def test_any_number_of_frames(name: str, frames: int) -> None:
    net = _make(name).eval()
    x = _burst(1, frames, 32)
    with torch.no_grad():
        out = net(x)
        # the burst is a set: repeating every frame (max and mean unchanged) changes nothing
        doubled = net(torch.cat([x, x], dim=1))
    assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(doubled, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "size"), [("unet", 224), ("dense", 288), ("fast", 160)])
def test_receptive_radius_is_an_upper_bound(name: str, size: int) -> None:
    net = _make(name).eval()
    radius = net.receptive_radius
    assert 2 * radius + 1 < size  # the whole reach fits in the image: the test is not vacuous
    x = _burst(1, 2, size)
    cy, cx = size // 2 + 1, size // 2 - 2
    poked = x.clone()
    poked[0, 1, 0, cy, cx] += 10.0
    with torch.no_grad():
        diff = (net(poked) - net(x))[0, 0].abs()
    ys, xs = torch.nonzero(diff > 0, as_tuple=True)
    reach = max((ys - cy).abs().max().item(), (xs - cx).abs().max().item())
    assert reach <= radius
    assert reach > radius // 2  # and the bound is not wildly loose


def test_receptive_radii_of_tiny_configs_follow_the_structure() -> None:
    # fewer dense layers -> smaller reach; widths do not matter
    assert BurstDenseUNet(layers_per_block=2).receptive_radius < BurstDenseUNet().receptive_radius
    assert BurstUNet(channels=(1, 1, 1, 1, 1)).receptive_radius == BurstUNet().receptive_radius


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name: str) -> None:
    net = _make(name).train()
    out = net(_burst(2, 3, 32))
    (out - torch.zeros_like(out)).square().mean().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("frames", [1, 4])
def test_untrained_fast_net_returns_the_mean_exactly(frames: int) -> None:
    torch.manual_seed(0)
    net = BurstFastNet(channels=(4, 8, 8), head_channels=4)
    x = _burst(2, frames, 32, seed=3)
    out = net(x)
    assert torch.equal(out, x.mean(dim=1))
    # ... and still learns: the zero-initialised last conv receives a gradient
    (out - torch.randn_like(out)).square().mean().backward()
    assert net.head.weight.grad.abs().sum() > 0


def test_fast_net_icnr_start_is_nearest_upsampling() -> None:
    torch.manual_seed(0)
    net = BurstFastNet(channels=(4, 8, 8), head_channels=4)
    shuffled = torch.nn.functional.pixel_shuffle(net.head_up(torch.randn(1, 4, 8, 8)), 2)
    blocks = shuffled.unflatten(2, (8, 2)).unflatten(4, (8, 2))  # (1, C, 8, 2, 8, 2)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))


@pytest.mark.parametrize("cls", [BurstUNet, BurstDenseUNet, BurstFastNet])
def test_default_configs_fit_the_weight_budget(cls: type) -> None:
    # <= 12 M parameters: <= ~25 MB as fp16 safetensors
    assert 0 < count_parameters(cls()) < 12_000_000


def test_fast_net_default_cost_is_interactive() -> None:
    torch.manual_seed(0)
    gflops = gflops_per_megapixel(BurstFastNet(), torch.randn(1, 5, 1, 128, 128))
    assert 100 < gflops < 260


@pytest.mark.parametrize("name", TINY)
def test_bad_inputs_raise_clear_errors(name: str) -> None:
    net = _make(name)
    with pytest.raises(ValueError, match="5-D tensor"):
        net(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of"):
        net(torch.zeros(1, 3, 1, 32, 36))
    with pytest.raises(ValueError, match="C = 1"):
        net(torch.zeros(1, 3, 2, 32, 32))
    with pytest.raises(ValueError, match="empty"):
        net(torch.zeros(1, 0, 1, 32, 32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: BurstUNet(channels=(4, 4, 4)),
        lambda: BurstDenseUNet(growth_rate=0),
        lambda: BurstDenseUNet(dropout=1.0),
        lambda: BurstFastNet(channels=(4, 8)),
    ],
)
def test_bad_configs_raise(make: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError):
        make()


# --------------------------------------------------------------------------------------------
# shared helpers (_flops.py)
# --------------------------------------------------------------------------------------------
def test_gflops_per_megapixel_counts_multiply_adds_twice_per_input_pixel() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1).train()
    small = gflops_per_megapixel(conv, torch.randn(1, 2, 32, 32))
    large = gflops_per_megapixel(conv, torch.randn(1, 2, 64, 48))
    assert small == pytest.approx(2 * 2 * 3 * 9 / 1e3)
    assert large == pytest.approx(small)
    assert conv.training  # the mode is restored
    # a stride-2 conv is charged per INPUT megapixel: a quarter of the outputs
    down = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    assert gflops_per_megapixel(down, torch.randn(1, 2, 32, 32)) == pytest.approx(small / 4)


def test_count_parameters() -> None:
    assert count_parameters(nn.Conv2d(2, 3, 3)) == 2 * 3 * 9 + 3
    assert count_parameters(nn.BatchNorm2d(5)) == 10  # running stats are buffers


def test_span_bounds_a_bilinear_path_exactly_enough() -> None:
    torch.manual_seed(0)
    down = nn.Conv2d(1, 2, 3, stride=2, padding=1)
    conv = nn.Conv2d(2, 1, 5, padding=2)

    def path(x: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(down(x), scale_factor=2.0, mode="bilinear")
        return conv(up)

    radius = Span().conv(stride=2).up("bilinear").conv(kernel=5).radius
    for cy, cx in [(20, 20), (21, 20), (20, 23)]:
        x = torch.randn(1, 1, 48, 48)
        poked = x.clone()
        poked[0, 0, cy, cx] += 5.0
        with torch.no_grad():
            diff = (path(poked) - path(x))[0, 0].abs()
        ys, xs = torch.nonzero(diff > 0, as_tuple=True)
        reach = max((ys - cy).abs().max().item(), (xs - cx).abs().max().item())
        assert radius - 2 <= reach <= radius


def test_span_rejects_misuse() -> None:
    with pytest.raises(ValueError, match="level 0"):
        _ = Span().down().radius
    with pytest.raises(ValueError, match="levels"):
        Span().merge(Span().down())
    with pytest.raises(ValueError, match="up-sample"):
        Span().up()
    with pytest.raises(ValueError, match="mode"):
        Span().down().up("cubic")


@pytest.mark.parametrize("frames", [1, 3])
def test_fast_net_inference_forward_equals_the_batched_one(frames: int) -> None:
    # without autograd the net runs frame by frame and without concatenations (smaller
    # tensors: a worker thread's malloc arena can reuse them); same numbers
    torch.manual_seed(0)
    net = _tiny_fast()
    for p in net.parameters():
        nn.init.normal_(p, std=0.3)
    x = _burst(2, frames, 32)
    batched = net(x)
    assert batched.requires_grad  # autograd on: the batched path
    with torch.no_grad():
        lean = net(x)
    batched = batched.detach()
    assert float((lean - batched).abs().max()) <= 1e-5 * float(batched.abs().max())
    # the head in bands of 8 rows at 1/2 resolution (forced) joins without a seam
    with torch.no_grad():
        out = torch.randn(2, 4, 40, 16, generator=torch.Generator().manual_seed(3))
        whole = net._head_rows(out, max_bytes=1 << 30)
        bands = net._head_rows(out, max_bytes=1)  # 8-row bands
    assert bands.shape == whole.shape == (2, 1, 80, 32)
    assert float((bands - whole).abs().max()) <= 1e-5 * float(whole.abs().max())
