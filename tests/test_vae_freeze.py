"""`--vae_freeze_step`: after it, a step leaves the VAE alone and makes exactly the SiT half of a REPA-E step."""

import pytest
import torch
from accelerate import Accelerator
from test_train_repae import _batch, _models, _params, _reset_accelerate, _same

from diffusers_repae.training.repae_step import FrozenTargetCache, RepaEHyperParameters, train_step


def _trained(vae_freeze_step, global_step):
    """Fresh identical models after one step at ``global_step`` (GAN off, generator seed 3)."""
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    models.vae_loss.disc_start = 10**9
    hp = RepaEHyperParameters(encoder_depth=1, vae_freeze_step=vae_freeze_step)
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


def test_steps_before_the_freeze_are_joint():
    models, before, logs = _trained(vae_freeze_step=5, global_step=4)
    assert "vae/proj_loss" in logs and "sit/denoising_loss" in logs
    assert not _same(before["vae"], _params(models.vae))


@pytest.mark.parametrize("flags", [["--vae_freeze_step", "0"], ["--vae_warmup_steps", "3", "--vae_freeze_step", "3"]])
def test_a_freeze_step_not_after_the_warmup_is_refused(flags, capsys):
    import sys

    from test_train_repae import SCRIPT

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_repae
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as exit_info:
        train_repae.parse_args(["--output_dir", "unused", *flags])
    assert exit_info.value.code == 2
    assert "--vae_freeze_step must be >" in capsys.readouterr().err


def test_caching_without_a_freeze_step_is_refused(capsys):
    import sys

    from test_train_repae import SCRIPT

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_repae
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit):
        train_repae.parse_args(["--output_dir", "unused", "--cache_frozen_targets"])
    assert "--cache_frozen_targets needs --vae_freeze_step" in capsys.readouterr().err


def test_the_model_card_says_when_the_vae_was_frozen():
    import sys
    from types import SimpleNamespace

    from test_train_repae import SCRIPT

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_repae
    finally:
        sys.path.pop(0)
    args = SimpleNamespace(
        output_dir="out", recipe="emoji-cpu", resolution=32, enc_type="efficientnet-lite0", encoder_depth=2,
        lpips_weight=1.0, disc_start=0, vae_warmup_steps=0, vae_freeze_step=300,
    )  # fmt: skip
    data = SimpleNamespace(source="folder", num_classes=2, attribution=None)
    card = train_repae.model_card(args, data, {"sit": 1}, global_step=1000, global_batch=16)
    assert "first 300 steps only" in card and "remaining 700 steps" in card
    args.vae_freeze_step = None
    assert "frozen" not in train_repae.model_card(args, data, {"sit": 1}, global_step=1000, global_batch=16)
