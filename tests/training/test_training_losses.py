"""REPA-E loss terms against the formulas of SPEC sections 1, 5 and 6 written out independently here."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_repae.models.discriminator import PatchGANDiscriminator
from diffusers_repae.training.losses import (
    VAEReconstructionLoss,
    denoising_loss,
    hinge_d_loss,
    kl_loss,
    load_lpips,
    noisy_latents_and_target,
    repa_alignment_loss,
    sample_time,
)


def test_discriminator_layout_matches_original_keys_and_init():
    torch.manual_seed(0)
    disc = PatchGANDiscriminator()
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    expected = {
        "main.0.weight": (64, 3, 4, 4),
        "main.0.bias": (64,),
        "main.2.weight": (128, 64, 4, 4),
        "main.3.weight": (128,),
        "main.5.weight": (256, 128, 4, 4),
        "main.6.weight": (256,),
        "main.8.weight": (512, 256, 4, 4),
        "main.9.weight": (512,),
        "main.11.weight": (1, 512, 4, 4),
        "main.11.bias": (1,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape
    assert "main.2.bias" not in shapes  # BatchNorm follows: no conv bias
    assert abs(disc.main[8].weight.std().item() - 0.02) < 0.002
    assert abs(disc.main[9].weight.mean().item() - 1.0) < 0.005
    assert torch.all(disc.main[9].bias == 0)
    # 64 px -> 32 -> 16 -> 8 -> (k4 s1 p1) 7 -> 6
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_linear_interpolant_and_velocity():
    x, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.3, 1.0])
    x_t, v = noisy_latents_and_target(x, eps, t, "linear")
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tt) * x + tt * eps)
    torch.testing.assert_close(v, eps - x)
    torch.testing.assert_close(x_t[2], eps[2])  # t = 1 is pure noise


def test_cosine_interpolant():
    x, eps, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([0.2, 0.7])
    x_t, v = noisy_latents_and_target(x, eps, t, "cosine")
    tt = t.view(-1, 1, 1, 1)
    a, s = torch.cos(math.pi * tt / 2), torch.sin(math.pi * tt / 2)
    torch.testing.assert_close(x_t, a * x + s * eps)
    torch.testing.assert_close(v, -math.pi / 2 * s * x + math.pi / 2 * a * eps)


def test_time_sampling_formulas():
    t = sample_time(1000, "uniform", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, torch.rand(1000, generator=torch.Generator().manual_seed(0)))
    s = torch.randn(1000, generator=torch.Generator().manual_seed(1)).exp()
    t = sample_time(1000, "lognormal", "linear", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(t, s / (1 + s))
    t = sample_time(1000, "lognormal", "cosine", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(t, 2 / math.pi * torch.atan(s))
    with pytest.raises(ValueError, match="weighting"):
        sample_time(4, "cubic")


def test_denoising_mse():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    expected = sum(((pred[i] - target[i]) ** 2).mean() for i in range(3)) / 3
    torch.testing.assert_close(denoising_loss(pred, target), expected)


def test_repa_cosine_loss():
    zs = [torch.randn(2, 5, 7), torch.randn(2, 5, 3)]
    proj = [torch.randn(2, 5, 7), torch.randn(2, 5, 3)]
    total = 0.0
    for z, p in zip(zs, proj):
        per_sample = []
        for b in range(2):
            cos = [F.cosine_similarity(z[b, n], p[b, n], dim=0) for n in range(5)]
            per_sample.append(-sum(cos) / 5)
        total += sum(per_sample) / 2
    torch.testing.assert_close(repa_alignment_loss(zs, proj), total / 2)
    # half precision inputs are normalised in fp32
    assert repa_alignment_loss([zs[0].half()], [proj[0].half()]).dtype == torch.float32
    with pytest.raises(ValueError, match="token count"):
        repa_alignment_loss([torch.randn(2, 4, 7)], [torch.randn(2, 5, 7)])


def test_kl_and_hinge():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    var = torch.exp(logvar)
    expected = sum(0.5 * (mean[b] ** 2 + var[b] - 1 - logvar[b]).sum() for b in range(2)) / 2
    torch.testing.assert_close(kl_loss(mean, logvar), expected)
    real, fake = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)
    expected = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    torch.testing.assert_close(hinge_d_loss(real, fake), expected)


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return load_lpips(pretrained_backbone=False)  # random VGG: exercises the code path only, no download


def test_generator_loss_terms_and_lpips_range(random_lpips):
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(ndf=8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    mean, logvar = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8).clamp(-30, 20)
    loss_fn = VAEReconstructionLoss(random_lpips)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss turns autocast off
        terms = loss_fn(x, x_hat, mean, logvar, disc)
    # LPIPS expects [-1, 1] with normalize=False, i.e. the same as [0, 1] with normalize=True
    lp = random_lpips((x + 1) / 2, (x_hat + 1) / 2, normalize=True).mean()
    l1 = (x - x_hat).abs().mean()
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    gan = -disc(x_hat).mean()
    torch.testing.assert_close(terms["lpips"], lp)
    torch.testing.assert_close(terms["loss"], l1 + lp + 1e-6 * kl + 0.1 * gan)
    assert terms["loss"].dtype == torch.float32


def test_generator_loss_without_lpips_and_before_disc_start():
    x, x_hat = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mean, logvar = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    loss_fn = VAEReconstructionLoss(None, lpips_weight=0.0, disc_start=10)
    terms = loss_fn(x, x_hat, mean, logvar, PatchGANDiscriminator(ndf=8), global_step=3)
    torch.testing.assert_close(terms["loss"], (x - x_hat).abs().mean())
    with pytest.raises(ValueError, match="lpips_weight"):
        VAEReconstructionLoss(None, lpips_weight=1.0)


def test_lpips_loads_local_torchvision_vgg_weights(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save(state, tmp_path / "vgg16.pth")
    model = load_lpips(vgg_weights_path=tmp_path / "vgg16.pth")
    torch.testing.assert_close(getattr(model.net.slice1, "0").weight, features[0].weight)
    torch.testing.assert_close(getattr(model.net.slice5, "28").bias, features[28].bias)
    with pytest.raises(ValueError, match="lpips_vgg_path"):
        load_lpips(vgg_weights_path=tmp_path / "missing.pth")


def reference_lpips(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 written out on what VGG is fed (before the scaling layer): scale with the published shift/scale,
    unit-normalise each VGG stage's channels, squared difference, the learned 1x1 head, spatial mean, sum."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    feats_a, feats_b = model.net((a - shift) / scale), model.net((b - shift) / scale)
    total = 0.0
    for k, (fa, fb) in enumerate(zip(feats_a, feats_b)):
        fa = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        fb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        total = total + model.lins[k]((fa - fb) ** 2).mean(dim=(2, 3), keepdim=True)
    return total


@pytest.mark.parametrize("input_range", ["correct", "original"])
def test_lpips_input_range_against_the_lpips_formula(random_lpips, input_range):
    """Issue 13 item 6: 'correct' feeds VGG the [-1, 1] images LPIPS expects; 'original' reproduces REPA-E, whose
    LPIPS maps its [-1, 1] input by x * 2 - 1 again, so VGG sees [-3, 1]."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    mean, logvar = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    terms = VAEReconstructionLoss(random_lpips, lpips_input_range=input_range)(x, x_hat, mean, logvar, None)
    seen = (x, x_hat) if input_range == "correct" else (x * 2 - 1, x_hat * 2 - 1)
    assert seen[0].min() < -2.5 if input_range == "original" else seen[0].min() >= -1
    with torch.no_grad():
        expected = reference_lpips(random_lpips, *seen).mean()
    torch.testing.assert_close(terms["lpips"], expected, rtol=1e-5, atol=1e-6)
    other = "original" if input_range == "correct" else "correct"
    with torch.no_grad():
        assert (terms["lpips"] - VAEReconstructionLoss(random_lpips, lpips_input_range=other)(
            x, x_hat, mean, logvar, None
        )["lpips"]).abs() > 1e-4  # fmt: skip
    with pytest.raises(ValueError, match="lpips_input_range"):
        VAEReconstructionLoss(random_lpips, lpips_input_range="[0, 1]")
