"""Training losses: values on known inputs, invariances, gradients and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from napari_microrestore.core.errors import InputError
from napari_microrestore.models.losses import (
    CompositeLoss,
    VGGPerceptualLoss,
    cycle_loss,
    gan_loss,
    gradient_loss,
    l1_loss,
    ragan_d_loss,
    ragan_g_loss,
    ssim_loss,
)


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 1, 32, 40, generator=gen)
    pred = target + 0.3 * torch.randn(2, 1, 32, 40, generator=gen)
    return pred, target


# --------------------------------------------------------------------------------------------
# image losses
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [l1_loss, gradient_loss, ssim_loss, cycle_loss])
def test_image_losses_vanish_for_identical_images_only(fn, images):
    pred, target = images
    assert float(fn(target.clone(), target)) == pytest.approx(0.0, abs=1e-6)
    assert float(fn(pred, target)) > 1e-3


def test_l1_of_a_constant_difference():
    target = torch.zeros(1, 1, 8, 8)
    assert float(l1_loss(target + 2.5, target)) == pytest.approx(2.5)
    assert float(cycle_loss(target - 1.5, target)) == pytest.approx(1.5)


def test_gradient_loss_sees_edges_not_offsets(images):
    _, target = images
    assert float(gradient_loss(torch.full((1, 1, 9, 9), 3.0), torch.zeros(1, 1, 9, 9))) == 0
    assert float(gradient_loss(target + 7.0, target)) == pytest.approx(0.0, abs=1e-6)
    # a horizontal ramp of slope 1 against a flat image: |dx| = 1, dy = 0 -> (0 + 1) / 2
    ramp = torch.arange(16.0).expand(1, 1, 8, 16)
    assert float(gradient_loss(ramp, torch.zeros_like(ramp))) == pytest.approx(0.5)
    assert float(gradient_loss(ramp.transpose(-1, -2), torch.zeros(1, 1, 16, 8))) == \
        pytest.approx(0.5)


def test_ssim_loss_uses_each_targets_data_range(images):
    pred, target = images
    base = ssim_loss(pred, target)
    # counts in any units give the same loss: the data range follows the target
    assert float(ssim_loss(pred * 1000, target * 1000)) == pytest.approx(
        float(base), rel=1e-4)
    # per sample: scaling one sample alone leaves the batch loss unchanged
    scale = torch.tensor([1.0, 100.0]).view(2, 1, 1, 1)
    assert float(ssim_loss(pred * scale, target * scale)) == pytest.approx(float(base), rel=1e-4)
    # more noise, higher loss
    assert float(ssim_loss(target + 2 * (pred - target), target)) > float(base)
    # a constant target has no NaN
    flat = torch.full((1, 1, 16, 16), 5.0)
    assert float(ssim_loss(flat, flat)) == pytest.approx(0.0, abs=1e-6)


def test_image_losses_pass_gradients_to_the_prediction(images):
    pred, target = images
    for fn in (l1_loss, gradient_loss, ssim_loss):
        p = pred.clone().requires_grad_(True)
        fn(p, target).backward()
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_image_losses_reject_bad_input():
    with pytest.raises(InputError, match="same shape"):
        l1_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        gradient_loss(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(InputError, match="at least 2x2"):
        gradient_loss(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))
    with pytest.raises(InputError, match="at least 11x11"):
        ssim_loss(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8))


# --------------------------------------------------------------------------------------------
# CompositeLoss
# --------------------------------------------------------------------------------------------
def test_composite_loss_is_the_weighted_sum_of_its_terms(images):
    pred, target = images
    pred = pred.clone().requires_grad_(True)
    half_l1 = (0.5, lambda p, t: 2 * l1_loss(p, t))
    loss = CompositeLoss({"l1": 1.0, "ssim": 0.2, "gradient": 0.1, "mine": half_l1,
                          "unused": (0.0, l1_loss)})
    total, parts = loss(pred, target)
    assert set(parts) == {"l1", "ssim", "gradient", "mine"}  # weight 0 is not computed
    expected = {"l1": l1_loss(pred, target), "ssim": ssim_loss(pred, target),
                "gradient": gradient_loss(pred, target), "mine": 2 * l1_loss(pred, target)}
    expected = {name: float(value.detach()) for name, value in expected.items()}
    for name, value in expected.items():
        assert parts[name] == pytest.approx(value, rel=1e-5)
    want = sum(loss.weights[name] * value for name, value in expected.items())
    assert float(total.detach()) == pytest.approx(want, rel=1e-5)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_composite_loss_rejects_bad_terms():
    with pytest.raises(InputError, match="unknown loss term 'l3'"):
        CompositeLoss({"l3": 1.0})
    with pytest.raises(InputError, match="must be >= 0"):
        CompositeLoss({"l1": -1.0})
    with pytest.raises(InputError, match="at least one term"):
        CompositeLoss({})
    with pytest.raises(InputError, match="needs a VGG19 state dict"):
        CompositeLoss({"l1": 1.0, "perceptual": 0.1})


# --------------------------------------------------------------------------------------------
# adversarial losses
# --------------------------------------------------------------------------------------------
def test_lsgan_and_vanilla_gan_losses():
    ones, zeros = torch.ones(2, 1, 6, 6), torch.zeros(2, 1, 6, 6)
    assert float(gan_loss(ones, True)) == 0.0
    assert float(gan_loss(ones, False)) == pytest.approx(1.0)
    assert float(gan_loss(zeros, False, "lsgan")) == 0.0
    # vanilla: BCE with logits; logit 0 is a coin flip, large logits are confident
    assert float(gan_loss(zeros, True, "vanilla")) == pytest.approx(math.log(2))
    assert float(gan_loss(ones * 30, True, "vanilla")) < 1e-9
    assert float(gan_loss(ones * 30, False, "vanilla")) == pytest.approx(30.0, rel=1e-6)
    with pytest.raises(InputError, match="'lsgan' or 'vanilla'"):
        gan_loss(ones, True, "wgan")


def test_ragan_losses_are_mirror_images():
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(8, 1, generator=gen) + 1, torch.randn(8, 1, generator=gen)
    assert float(ragan_g_loss(real, fake)) == pytest.approx(float(ragan_d_loss(fake, real)))
    assert float(ragan_d_loss(real, fake)) == pytest.approx(float(ragan_g_loss(fake, real)))
    # indistinguishable real and fake: both sides at log 2
    same = torch.full((8, 1), 0.7)
    assert float(ragan_d_loss(same, same)) == pytest.approx(math.log(2))
    assert float(ragan_g_loss(same, same)) == pytest.approx(math.log(2))
    # a discriminator that ranks real above fake has the lower loss, the generator the higher
    assert float(ragan_d_loss(real, fake)) < math.log(2) < float(ragan_g_loss(real, fake))
    # it is relativistic: shifting all logits together changes nothing
    assert float(ragan_d_loss(real + 5, fake + 5)) == pytest.approx(float(ragan_d_loss(real, fake)))


def test_ragan_gradients_push_the_right_way():
    real = torch.zeros(4, 1, requires_grad=True)
    fake = torch.zeros(4, 1, requires_grad=True)
    ragan_d_loss(real, fake).backward()
    assert bool((real.grad < 0).all()) and bool((fake.grad > 0).all())  # D: real up, fake down
    fake.grad = None
    ragan_g_loss(real.detach(), fake).backward()
    assert bool((fake.grad < 0).all())  # G: fake up
    with pytest.raises(InputError, match="same shape"):
        ragan_d_loss(torch.zeros(4, 1), torch.zeros(3, 1))


# --------------------------------------------------------------------------------------------
# VGG19 perceptual loss
# --------------------------------------------------------------------------------------------
def _vgg_state_dict(prefix: str = "features.") -> dict[str, torch.Tensor]:
    """Random weights of torchvision vgg19().features[:9] (conv1_1 .. relu2_2), its keys."""
    gen = torch.Generator().manual_seed(3)
    shapes = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128)}
    sd = {}
    for i, (cout, cin) in shapes.items():
        sd[f"{prefix}{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
        sd[f"{prefix}{i}.bias"] = torch.zeros(cout)
    return sd


def test_perceptual_loss_without_weights_raises_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"needs a VGG19 state dict file \(weights=...\)"):
        VGGPerceptualLoss()
    with pytest.raises(InputError, match="VGG19 weights file not found"):
        VGGPerceptualLoss(tmp_path / "vgg19.pth")


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "features-only"])
def test_perceptual_loss_with_a_saved_state_dict(tmp_path, images, fmt):
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "vgg19.safetensors"
        save_file(_vgg_state_dict(), str(path))
    else:
        path = tmp_path / "vgg19.pth"
        torch.save(_vgg_state_dict("" if fmt == "features-only" else "features."), path)
    loss = VGGPerceptualLoss(path, layer=8)
    pred, target = (im[:, :, :16, :16] for im in images)
    assert float(loss(target, target)) == 0.0
    p = pred.clone().requires_grad_(True)
    value = loss(p, target)
    assert float(value.detach()) > 0
    value.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(q.grad is None and not q.requires_grad for q in loss.parameters())
    loss.train()
    assert not loss.features.training  # the frozen extractor stays in eval mode
    # as a term of a composite loss
    total, parts = CompositeLoss({"l1": 1.0, "perceptual": 0.5}, vgg_weights=path,
                                 vgg_layer=8)(pred, target)
    assert parts["perceptual"] == pytest.approx(float(loss(pred, target)), rel=1e-5)


def test_perceptual_loss_rejects_wrong_weights(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(_vgg_state_dict(), path)
    with pytest.raises(InputError, match="lacks VGG19 feature weights up to layer 12"):
        VGGPerceptualLoss(path, layer=12)
    sd = _vgg_state_dict()
    sd["features.2.weight"] = torch.zeros(32, 64, 3, 3)
    torch.save(sd, path)
    with pytest.raises(InputError, match="is not a VGG19: '2.weight' has shape"):
        VGGPerceptualLoss(path, layer=8)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read VGG19 weights"):
        VGGPerceptualLoss(path, layer=8)
    with pytest.raises(InputError, match="layer must be in 0..36"):
        VGGPerceptualLoss(path, layer=40)
