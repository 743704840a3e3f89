"""`--vae_freeze_step`: after it, a step leaves the VAE alone and makes exactly the SiT half of a REPA-E step."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from diffusers_repae.training.ema import ModelEMA
from diffusers_repae.training.repae_step import (
    FrozenTargetCache,
    RepaEHyperParameters,
    decoder_pass,
    ema_target,
    images_to_vae_range,
    perturbed_latents,
    train_step,
)
from test_fidelity import _train_repae
from test_train_repae import _batch, _models, _params, _reset_accelerate, _same


def _trained(vae_freeze_step, global_step, **hp_kwargs):
    """Fresh identical models after one step at ``global_step`` (GAN off, generator seed 3)."""
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    models.vae_loss.disc_start = 10**9
    hp = RepaEHyperParameters(encoder_depth=1, vae_freeze_step=vae_freeze_step, **hp_kwargs)
    before = {name: _params(getattr(models, name)) for name in ("vae", "transformer", "projector", "discriminator")}
    logs = train_step(accelerator, models, hp, _batch(), torch.Generator().manual_seed(3), global_step)
    return models, before, logs


def test_frozen_step_trains_only_the_sit():
    models, before, logs = _trained(vae_freeze_step=2, global_step=2)
    assert set(logs) == {"sit/denoising_loss", "sit/proj_loss", "sit/loss", "grad_norm/sit"}
    assert _same(before["vae"], _params(models.vae))
    assert _same(before["discriminator"], _params(models.discriminator))
    assert not _same(before["transformer"], _params(models.transformer))
    assert not _same(before["projector"], _params(models.projector))


def test_frozen_step_equals_the_sit_half_of_the_joint_step():
    # Same models and generator: the joint step samples the posterior, then t / noise / label dropout, and trains
    # the SiT on those latents; the frozen step must draw the same values and make the same SiT update.
    joint, _, joint_logs = _trained(vae_freeze_step=None, global_step=0)
    frozen, _, frozen_logs = _trained(vae_freeze_step=1, global_step=1)
    for key in ("sit/denoising_loss", "sit/proj_loss"):
        torch.testing.assert_close(frozen_logs[key], joint_logs[key], rtol=1e-5, atol=1e-6)
    for name in ("transformer", "projector"):
        after_joint, after_frozen = _params(getattr(joint, name)), _params(getattr(frozen, name))
        for key in after_joint:
            torch.testing.assert_close(after_frozen[key], after_joint[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(frozen.latent_norm.running_mean, joint.latent_norm.running_mean)
    torch.testing.assert_close(frozen.latent_norm.running_var, joint.latent_norm.running_var)


def _frozen_run(cache, batches):
    """Frozen steps on ``batches`` from identical fresh models; returns the SiT parameters and the models."""
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    models.frozen_cache = cache
    hp = RepaEHyperParameters(encoder_depth=1, vae_freeze_step=0)
    generator = torch.Generator().manual_seed(3)
    for step, batch in enumerate(batches):
        train_step(accelerator, models, hp, batch, generator, step)
    return _params(models.transformer), models


def test_cached_targets_give_the_same_steps_as_recomputing_them():
    # second and third batches repeat images of the first (in another order): they come from the cache
    first = _batch()
    order = torch.tensor([2, 0, 3, 1])
    fresh_images = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    batches = [
        first,
        {"pixel_values": first["pixel_values"][order], "labels": first["labels"][order]},
        {"pixel_values": torch.cat([first["pixel_values"][:2], fresh_images]), "labels": torch.tensor([0, 1, 2, 0])},
    ]
    cache = FrozenTargetCache()
    cached, _ = _frozen_run(cache, batches)
    recomputed, _ = _frozen_run(None, batches)
    assert len(cache) == 6  # 4 distinct images, then 2 new ones
    for key in recomputed:
        torch.testing.assert_close(cached[key], recomputed[key], rtol=1e-4, atol=5e-5)  # Adam amplifies fp noise


def test_the_cache_computes_each_image_once_and_keeps_batch_order():
    calls = []

    def compute(rows):  # "posterior" = the image's first pixel, "tokens" = its row in the batch it came from
        calls.append(rows.tolist())
        return pixels[rows, 0, 0, 0].float(), rows.float()

    cache = FrozenTargetCache(max_images=3)
    pixels = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    first, rows = cache.lookup(pixels, compute)
    assert first.tolist() == [0, 1, 2, 3] and calls == [[0, 1, 2, 3]] and len(cache) == 3  # capped at 3
    pixels = pixels.flip(0)
    values, rows = cache.lookup(pixels, compute)
    assert values.tolist() == [3, 2, 1, 0]
    assert calls[1] == [0]  # only the image past the cap is computed again (it is row 0 of the flipped batch)
    assert rows.tolist() == [0, 2, 1, 0]  # cached images keep the rows they were first computed at


def _split_vae(params):
    encoder = {k: v for k, v in params.items() if ".encoder." in k or ".quant_conv." in k and "post_" not in k}
    decoder = {k: v for k, v in params.items() if ".decoder." in k or ".post_quant_conv." in k}
    assert encoder and decoder and len(encoder) + len(decoder) == len(params)
    return encoder, decoder


def test_decoder_training_after_the_freeze_leaves_the_encoder_and_the_sit_step_alone():
    sit_only, _, _ = _trained(vae_freeze_step=1, global_step=1)
    models, before, logs = _trained(vae_freeze_step=1, global_step=1, train_decoder_after_freeze=True)
    assert {"decoder/l1", "grad_norm/decoder", "sit/denoising_loss"} <= set(logs)
    encoder_before, decoder_before = _split_vae(before["vae"])
    encoder_after, decoder_after = _split_vae(_params(models.vae))
    assert _same(encoder_before, encoder_after)  # the SiT's latent space does not move
    assert all(not torch.equal(decoder_before[k], decoder_after[k]) for k in ("vae.decoder.conv_out.weight",))
    for name in ("transformer", "projector"):  # the decoder pass comes after the SiT's and does not change it
        assert _same(_params(getattr(sit_only, name)), _params(getattr(models, name)))


def test_decoder_pass_minimises_the_reconstruction_of_the_given_latents():
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    models.vae_loss.disc_start = 10**9
    vae = models.vae.vae
    images = images_to_vae_range(_batch()["pixel_values"])
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + 0.3
        expected_l1 = (vae.decode(latents).sample - images).abs().mean()
        expected_kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum(dim=(1, 2, 3)).mean()
    hp = RepaEHyperParameters(encoder_depth=1, train_decoder_after_freeze=True)
    logs = decoder_pass(accelerator, models, hp, images, latents, posterior.mean, posterior.std, None, 5)
    torch.testing.assert_close(logs["decoder/l1"], expected_l1)
    kl_weight = models.vae_loss.kl_weight
    torch.testing.assert_close(logs["decoder/loss"], expected_l1 + kl_weight * expected_kl, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert (vae.decode(latents).sample - images).abs().mean() < expected_l1  # one Adam step downhill


def test_the_decoders_adam_moments_restart_at_the_freeze():
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    models.vae_loss.disc_start = 10**9
    hp = RepaEHyperParameters(encoder_depth=1, vae_freeze_step=2, train_decoder_after_freeze=True)
    generator = torch.Generator().manual_seed(3)
    for step in range(3):  # two joint steps, then the first frozen one
        train_step(accelerator, models, hp, _batch(), generator, step)
    vae = models.vae.vae
    steps_taken = {name: int(models.optimizer_vae.state[p]["step"]) for name, p in vae.named_parameters()}
    assert {steps_taken[k] for k in steps_taken if k.startswith(("decoder.", "post_quant_conv."))} == {1}
    assert {steps_taken[k] for k in steps_taken if k.startswith(("encoder.", "quant_conv."))} == {2}


def test_decoder_only_steps_make_the_decoder_half_of_a_frozen_step_and_nothing_else():
    # Without latent noise the decoder's update depends only on the posterior sample, which both steps draw first
    # from the same generator: the decoder must end the same, while the SiT, its EMA and the BN stay untouched.
    frozen, _, _ = _trained(vae_freeze_step=1, global_step=2, train_decoder_after_freeze=True)
    models, before, logs = _trained(
        vae_freeze_step=1, global_step=2, train_decoder_after_freeze=True, decoder_only_step=2
    )
    assert logs and all(key.startswith(("decoder/", "grad_norm/decoder", "disc/")) for key in logs)
    encoder_before, _ = _split_vae(before["vae"])
    encoder_after, decoder_after = _split_vae(_params(models.vae))
    assert _same(encoder_before, encoder_after)
    _, decoder_frozen_step = _split_vae(_params(frozen.vae))
    for key in decoder_after:
        torch.testing.assert_close(decoder_after[key], decoder_frozen_step[key], rtol=1e-5, atol=1e-6)
    for name in ("transformer", "projector", "discriminator"):
        assert _same(before[name], _params(getattr(models, name)))
    assert models.latent_norm.num_batches_tracked.item() == 0  # the SiT pass (which updates the BN) did not run


def test_decoder_only_steps_stop_the_sits_ema():
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    models.vae_loss.disc_start = 10**9
    models.ema = ModelEMA(ema_target(accelerator, models), decay=0.5)
    hp = RepaEHyperParameters(encoder_depth=1, vae_freeze_step=1, train_decoder_after_freeze=True, decoder_only_step=2)
    generator = torch.Generator().manual_seed(3)
    snapshots = [{k: v.clone() for k, v in models.ema.model.state_dict().items()}]
    for step in (1, 2):  # SiT + decoder, then decoder only
        train_step(accelerator, models, hp, _batch(), generator, step)
        snapshots.append({k: v.clone() for k, v in models.ema.model.state_dict().items()})
    assert not _same(snapshots[0], snapshots[1])
    assert _same(snapshots[1], snapshots[2])


def test_decoder_only_steps_read_the_posterior_from_the_cache():
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    models.vae_loss.disc_start = 10**9
    models.frozen_cache = FrozenTargetCache()
    hp = RepaEHyperParameters(encoder_depth=1, vae_freeze_step=1, train_decoder_after_freeze=True, decoder_only_step=2)
    batch = _batch()
    train_step(accelerator, models, hp, batch, torch.Generator().manual_seed(3), 2)
    assert len(models.frozen_cache) == len({image.numpy().tobytes() for image in batch["pixel_values"]})
    mean, std, *tokens = next(iter(models.frozen_cache.entries.values()))
    with torch.no_grad():
        posterior = models.vae.vae.encode(images_to_vae_range(batch["pixel_values"][:1])).latent_dist
    # the encoder is frozen, so the cached posterior is still the encoder's
    torch.testing.assert_close(mean, posterior.mean[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, posterior.std[0], rtol=1e-5, atol=1e-6)


def test_perturbed_latents_add_noise_up_to_the_given_fraction_of_each_channels_spread():
    latents = torch.randn(400, 2, 16, 16)
    spread = torch.tensor([0.5, 4.0])
    assert perturbed_latents(latents, spread, 0.0, None) is latents
    kick = (perturbed_latents(latents, spread, 0.3, torch.Generator().manual_seed(0)) - latents) / spread.view(
        1, 2, 1, 1
    )
    per_sample = kick.flatten(1).std(dim=1)  # ~ U(0, 0.3) each, the same fraction for both channels
    assert per_sample.max() < 0.3 * 1.1 and per_sample.min() < 0.03
    torch.testing.assert_close(per_sample.mean(), torch.tensor(0.15), atol=0.02, rtol=0)
    by_channel = kick.transpose(0, 1).flatten(1).std(dim=1)
    torch.testing.assert_close(by_channel[0], by_channel[1], rtol=0.05, atol=0)


def test_steps_before_the_freeze_are_joint():
    models, before, logs = _trained(vae_freeze_step=5, global_step=4)
    assert "vae/proj_loss" in logs and "sit/denoising_loss" in logs
    assert not _same(before["vae"], _params(models.vae))


@pytest.mark.parametrize("flags", [["--vae_freeze_step", "0"], ["--vae_warmup_steps", "3", "--vae_freeze_step", "3"]])
def test_a_freeze_step_not_after_the_warmup_is_refused(flags, capsys):
    train_repae = _train_repae()
    with pytest.raises(SystemExit) as exit_info:
        train_repae.parse_args(["--output_dir", "unused", *flags])
    assert exit_info.value.code == 2
    assert "--vae_freeze_step must be >" in capsys.readouterr().err


def test_frozen_phase_flags_without_a_freeze_step_are_refused(capsys):
    train_repae = _train_repae()
    with pytest.raises(SystemExit):
        train_repae.parse_args(["--output_dir", "unused", "--cache_frozen_targets"])
    assert "--cache_frozen_targets needs --vae_freeze_step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_repae.parse_args(["--output_dir", "unused", "--train_decoder_after_freeze"])
    assert "--train_decoder_after_freeze needs --vae_freeze_step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_repae.parse_args(["--output_dir", "unused", "--vae_freeze_step", "5", "--decoder_latent_noise", "0.2"])
    assert "needs --train_decoder_after_freeze, got 0.2" in capsys.readouterr().err
    decoder = ["--vae_freeze_step", "5", "--train_decoder_after_freeze"]
    for flags in (["--vae_freeze_step", "5", "--decoder_only_step", "8"], [*decoder, "--decoder_only_step", "5"]):
        with pytest.raises(SystemExit):
            train_repae.parse_args(["--output_dir", "unused", *flags])
        assert "--decoder_only_step must be > --vae_freeze_step (5)" in capsys.readouterr().err
    assert (
        train_repae.parse_args(["--output_dir", "unused", *decoder, "--decoder_only_step", "6"]).decoder_only_step == 6
    )


def test_the_model_card_says_from_when_the_gan_was_active():
    train_repae = _train_repae()
    args = SimpleNamespace(
        output_dir="out", recipe="emoji-cpu", resolution=32, enc_type="efficientnet-lite0", encoder_depth=2,
        lpips_weight=0.0, disc_start=600, disc_weight=0.5, adaptive_disc_weight=True, vae_warmup_steps=0,
        vae_freeze_step=None, max_train_steps=1000,
    )  # fmt: skip
    data = SimpleNamespace(source="folder", num_classes=2, attribution=None)
    card = train_repae.model_card(args, data, {"sit": 1}, global_step=1000, global_batch=16)
    assert "active from step 600 on" in card and "adaptively" in card and "never became active" not in card
    assert "never became active" in train_repae.model_card(args, data, {"sit": 1}, global_step=600, global_batch=16)
    args.disc_start = 0  # from the start, as REPA-E: nothing to say
    assert "GAN" not in train_repae.model_card(args, data, {"sit": 1}, global_step=1000, global_batch=16)


def test_the_model_card_says_when_the_vae_was_frozen():
    train_repae = _train_repae()
    args = SimpleNamespace(
        output_dir="out", recipe="emoji-cpu", resolution=32, enc_type="efficientnet-lite0", encoder_depth=2,
        lpips_weight=1.0, disc_start=0, vae_warmup_steps=0, vae_freeze_step=300, max_train_steps=1000,
    )  # fmt: skip
    data = SimpleNamespace(source="folder", num_classes=2, attribution=None)
    card = train_repae.model_card(args, data, {"sit": 1}, global_step=1000, global_batch=16)
    assert "first 300 steps only" in card and "for 700 more steps" in card and "decoder alone" not in card
    args.train_decoder_after_freeze, args.decoder_only_step = True, 800
    card = train_repae.model_card(args, data, {"sit": 1}, global_step=1000, global_batch=16)
    assert "for 500 more steps" in card and "The last 200 steps trained the decoder alone" in card
    args.vae_freeze_step = None
    assert "frozen" not in train_repae.model_card(args, data, {"sit": 1}, global_step=1000, global_batch=16)


def test_the_sits_learning_rate_decays_to_zero_at_the_last_step_it_trains():
    train_repae = _train_repae()
    base = ["--output_dir", "unused", "--max_train_steps", "10", "--sit_lr_decay_start", "2"]
    decoder_only = ["--vae_freeze_step", "1", "--train_decoder_after_freeze", "--decoder_only_step", "6"]
    to_the_end = train_repae.lr_factors(train_repae.parse_args(base))
    assert set(to_the_end) == {"sit"}
    assert [to_the_end["sit"](s) for s in range(11)] == pytest.approx(
        [1, 1, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0]
    )
    factors = train_repae.lr_factors(train_repae.parse_args(base + decoder_only))
    assert [factors["sit"](s) for s in range(11)] == pytest.approx([1, 1, 1, 3 / 4, 2 / 4, 1 / 4, 0, 0, 0, 0, 0])
    assert [factors["vae"](s) for s in range(11)] == pytest.approx([1, 1, 1, 1, 1, 1, 1, 3 / 4, 2 / 4, 1 / 4, 0])


@pytest.mark.parametrize("start", ["-1", "6", "7"])
def test_a_sit_lr_decay_that_starts_too_late_is_refused(start, capsys):
    train_repae = _train_repae()
    decoder_only = ["--vae_freeze_step", "1", "--train_decoder_after_freeze", "--decoder_only_step", "6"]
    with pytest.raises(SystemExit):
        train_repae.parse_args(["--output_dir", "unused", *decoder_only, "--sit_lr_decay_start", start])
    assert "--sit_lr_decay_start must be >= 0 and before the SiT's last step (6: " in capsys.readouterr().err


def test_the_model_card_says_when_the_sits_learning_rate_decayed():
    train_repae = _train_repae()
    args = SimpleNamespace(
        output_dir="out", recipe="emoji-cpu", resolution=32, enc_type="efficientnet-lite0", encoder_depth=2,
        lpips_weight=1.0, disc_start=0, vae_warmup_steps=0, vae_freeze_step=300, max_train_steps=1000,
        train_decoder_after_freeze=True, decoder_only_step=800, sit_lr_decay_start=300,
    )  # fmt: skip
    data = SimpleNamespace(source="folder", num_classes=2, attribution=None)
    card = train_repae.model_card(args, data, {"sit": 1}, global_step=1000, global_batch=16)
    assert "decayed linearly from step 300 towards 0 at step 800 (`--sit_lr_decay_start`)" in card
    args.sit_lr_decay_start = None
    assert "sit_lr_decay_start" not in train_repae.model_card(
        args, data, {"sit": 1}, global_step=1000, global_batch=16
    )
