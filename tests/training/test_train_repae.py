"""End-to-end REPA-E training: one step's stop-gradients and losses, resume equivalence, 2 processes, the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from diffusers_repae import LatentBatchNorm, REPAProjector, SiTTransformer2DModel
from diffusers_repae.models.discriminator import PatchGANDiscriminator
from diffusers_repae.training.ablation_steps import naive_end_to_end_step
from diffusers_repae.training.ema import ModelEMA
from diffusers_repae.training.losses import VAEReconstructionLoss
from diffusers_repae.training.repae_step import (
    RepaEHyperParameters,
    RepaEModels,
    VAEWithPosterior,
    discriminator_pass,
    ema_target,
    images_to_vae_range,
    sit_pass,
    train_step,
    vae_alignment_pass,
)
from tiny_setup import write_tiny_setup
from training_helpers import reset_accelerate

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "training" / "train_repae.py"


class TinyEncoder(torch.nn.Module):
    """A frozen random conv net standing in for a vision encoder: uint8 16 px -> 16 tokens of width 6."""

    z_dim = 6

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, kernel_size=4, stride=4)
        self.requires_grad_(False)

    def forward(self, images):
        return self.conv(images.float() / 255).flatten(2).transpose(1, 2)


def _models(accelerator, ema_decay=0.5):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    )
    sit = SiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2, num_classes=3
    )
    with torch.no_grad():  # leave the zero init: zero gates would hide a wrong pass
        for p in sit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    projector = REPAProjector(hidden_size=32, z_dims=[6], projector_dim=16, encoder_depth=1)
    disc = PatchGANDiscriminator(ndf=8, n_layers=2)
    norm = LatentBatchNorm(4)
    adam = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    vae_module = VAEWithPosterior(vae)
    opts = [
        torch.optim.AdamW(vae_module.parameters(), **adam),
        torch.optim.AdamW(disc.parameters(), **adam),
        torch.optim.AdamW(list(sit.parameters()) + list(projector.parameters()), **adam),
    ]
    vae_module, sit, projector, disc, *opts = accelerator.prepare(vae_module, sit, projector, disc, *opts)
    models = RepaEModels(
        vae=vae_module,
        transformer=sit,
        projector=projector,
        discriminator=disc,
        latent_norm=norm,
        encoders=[TinyEncoder()],
        vae_loss=VAEReconstructionLoss(None, lpips_weight=0.0),
        optimizer_vae=opts[0],
        optimizer_disc=opts[1],
        optimizer_sit=opts[2],
    )
    models.ema = ModelEMA(ema_target(accelerator, models), decay=ema_decay)
    return models


def _batch():
    g = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8),
        "labels": torch.tensor([0, 1, 2, 1]),
    }


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _cos_loss(z, z_tilde):
    return -F.cosine_similarity(z, z_tilde, dim=-1).mean()


def test_one_step_stop_gradients_and_losses():
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    hp = RepaEHyperParameters(encoder_depth=1, cfg_prob=0.5)
    batch = _batch()
    images = images_to_vae_range(batch["pixel_values"])
    zs = [enc(batch["pixel_values"]) for enc in models.encoders]
    sit, proj, vae, disc, norm = (
        models.transformer,
        models.projector,
        models.vae,
        models.discriminator,
        models.latent_norm,
    )
    sit0, proj0, vae0, disc0 = _params(sit), _params(proj), _params(vae), _params(disc)
    running0 = (norm.running_mean.clone(), norm.running_var.clone())

    # 1. VAE pass: the SiT (frozen, eval) receives no gradient and does not move; the BN does not update.
    generator = torch.Generator().manual_seed(0)
    logs, z, x_hat, noise = vae_alignment_pass(accelerator, models, hp, images, batch["labels"], zs, generator, 0)
    assert _same(sit0, _params(sit)) and _same(proj0, _params(proj)) and _same(disc0, _params(disc))
    assert all(p.grad is None for p in list(sit.parameters()) + list(proj.parameters()) + list(disc.parameters()))
    assert not _same(vae0, _params(vae))
    assert torch.equal(norm.running_mean, running0[0]) and torch.equal(norm.running_var, running0[1])
    # its alignment loss: eval BN (running stats), x_t = (1 - t) x + t eps, align-only SiT, -cos
    z_eval = (z - running0[0].view(1, -1, 1, 1)) / torch.sqrt(running0[1].view(1, -1, 1, 1) + 1e-4)
    t = noise.t.view(-1, 1, 1, 1)
    with torch.no_grad():
        sit_ref = SiTTransformer2DModel.from_config(sit.config)
        sit_ref.load_state_dict(sit.state_dict())
        h = sit_ref.eval()((1 - t) * z_eval + t * noise.noise, noise.t, batch["labels"], return_hidden_states_at=1)
        torch.testing.assert_close(logs["vae/proj_loss"], _cos_loss(zs[0], proj(h.hidden_states)[0]))
    assert logs["vae/gan"] != 0  # the discriminator is active from step 0

    # 2. discriminator pass: only D moves.
    vae1 = _params(vae)
    discriminator_pass(accelerator, models, hp, images, x_hat, 0)
    assert _same(vae1, _params(vae)) and _same(sit0, _params(sit)) and not _same(disc0, _params(disc))

    # 3. SiT pass on the detached latents with the same t and noise: the denoising loss never reaches the VAE.
    mean_b, var_b = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)
    z_train = (z - mean_b.view(1, -1, 1, 1)) / torch.sqrt(var_b.view(1, -1, 1, 1) + 1e-4)
    labels = torch.where(noise.drop_labels, torch.full_like(batch["labels"], 3), batch["labels"])
    with torch.no_grad():
        out = sit_ref.train()((1 - t) * z_train + t * noise.noise, noise.t, labels, return_hidden_states_at=1)
        expected_denoise = ((out.sample - (noise.noise - z_train)) ** 2).mean()
        expected_proj = _cos_loss(zs[0], proj(out.hidden_states)[0])
    sit_logs = sit_pass(accelerator, models, hp, z, batch["labels"], zs, noise)
    torch.testing.assert_close(sit_logs["sit/denoising_loss"], expected_denoise)
    torch.testing.assert_close(sit_logs["sit/proj_loss"], expected_proj)
    torch.testing.assert_close(sit_logs["sit/loss"], expected_denoise + 0.5 * expected_proj)
    assert all(p.grad is None for p in vae.parameters()) and _same(vae1, _params(vae))
    assert not _same(sit0, _params(sit))
    # training-mode BN: running stats follow the momentum rule with the unbiased batch variance
    torch.testing.assert_close(norm.running_mean, 0.9 * running0[0] + 0.1 * mean_b)
    torch.testing.assert_close(norm.running_var, 0.9 * running0[1] + 0.1 * z.var(dim=(0, 2, 3), unbiased=True))


def _naive_step_from_fresh_models(proj_coeff: float, vae_loss: VAEReconstructionLoss | None = None):
    """One ablation step from the same initial models and randomness; returns the models before and after."""
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    if vae_loss is not None:
        models.vae_loss = vae_loss
    before = {name: _params(getattr(models, name)) for name in ("vae", "transformer", "projector")}
    hp = RepaEHyperParameters(encoder_depth=1, cfg_prob=0.5, proj_coeff=proj_coeff)
    naive_end_to_end_step(accelerator, models, hp, _batch(), torch.Generator().manual_seed(0), 0)
    after = {name: _params(getattr(models, name)) for name in before}
    return models, before, after


def test_naive_e2e_ablation_sends_the_denoising_loss_into_the_vae_and_not_the_alignment():
    # the alignment weight changes the SiT's update but never the VAE's
    _, start, low = _naive_step_from_fresh_models(proj_coeff=0.5)
    _, _, high = _naive_step_from_fresh_models(proj_coeff=50.0)
    assert not _same(start["vae"], low["vae"]) and _same(low["vae"], high["vae"])
    assert not _same(low["projector"], high["projector"])

    # with the VAE's own loss at zero, the VAE still moves: against the gradient of the denoising loss through the
    # BatchNorm (batch statistics), the noisy latents and the velocity target, computed here by hand
    silent = VAEReconstructionLoss(None, l1_weight=0.0, lpips_weight=0.0, kl_weight=0.0, disc_weight=0.0)
    models, start, after = _naive_step_from_fresh_models(proj_coeff=0.5, vae_loss=silent)
    reference = _models(Accelerator(cpu=True))  # the same initial weights (seeded), never stepped
    generator = torch.Generator().manual_seed(0)
    batch = _batch()
    _, _, z, _ = reference.vae(images_to_vae_range(batch["pixel_values"]), generator=generator)
    t = torch.rand(4, generator=generator)  # uniform weighting, linear path: t ~ U(0, 1), as draw_step_noise
    eps = torch.randn(z.shape, generator=generator)
    drop = torch.rand(4, generator=generator) < 0.5
    mean, var = z.mean(dim=(0, 2, 3), keepdim=True), z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    z_n = (z - mean) / torch.sqrt(var + 1e-4)
    x_t = (1 - t.view(-1, 1, 1, 1)) * z_n + t.view(-1, 1, 1, 1) * eps
    labels = torch.where(drop, torch.full_like(batch["labels"], 3), batch["labels"])
    velocity = reference.transformer.train()(x_t, t, labels).sample
    denoise = ((velocity - (eps - z_n)) ** 2).mean()
    names = [name for name, p in reference.vae.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(denoise, [dict(reference.vae.named_parameters())[n] for n in names], allow_unused=True)
    moved = 0
    for name, grad in zip(names, grads):
        if grad is None:
            continue
        change = after["vae"][name] - start["vae"][name]
        clear = grad.abs() > 1e-6  # AdamW's first step moves each weight by about -lr * sign(grad)
        assert torch.equal(torch.sign(change[clear]), -torch.sign(grad[clear])), name
        moved += int(clear.sum())
    assert moved > 100


def test_train_step_updates_ema_with_bn_buffers():
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator, ema_decay=0.5)
    before = {k: v.clone() for k, v in models.ema.model.state_dict().items()}
    logs = train_step(accelerator, models, RepaEHyperParameters(encoder_depth=1), _batch(), None, 0)
    assert {"vae/loss", "disc/loss", "sit/denoising_loss", "grad_norm/sit", "grad_norm/vae"} <= set(logs)
    current = ema_target(accelerator, models).state_dict()
    after = models.ema.model.state_dict()
    keys = ("transformer.proj_out.weight", "projector.projectors.0.4.weight", "latent_norm.running_mean")
    for key in (*keys, "latent_norm.running_var"):  # the projector too: the original's EMA covers the whole SiT
        torch.testing.assert_close(after[key], 0.5 * before[key] + 0.5 * current[key])
    assert not torch.equal(after["projector.projectors.0.4.weight"], before["projector.projectors.0.4.weight"])
    assert after["latent_norm.num_batches_tracked"] == 1


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A 2-class image folder (12 images: 3 batches of 4) and a shrunken tiny-cpu recipe (32 px, 16 tokens)."""
    return write_tiny_setup(tmp_path_factory.mktemp("repae"))


def _argv(setup, output_dir, steps, *extra):
    return [
        "--recipe", str(setup / "recipe"), "--train_data_dir", str(setup / "images"), "--resolution", "32",
        "--enc_type", "efficientnet-lite0", "--no_lpips", "--mixed_precision", "no", "--train_batch_size", "4",
        "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--validation_steps", "0",
        "--output_dir", str(output_dir), "--dataloader_num_workers", "0", "--disc_ndf", "8",
        "--report_to", "none", "--ema_decay", "0.9", "--random_flip", *extra,
    ]  # fmt: skip


def _run(argv):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_repae
    finally:
        sys.path.pop(0)
    reset_accelerate()
    return train_repae.main(argv)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    assert not list(folder.glob("custom_checkpoint_*.pkl"))  # project state is safetensors + JSON, not pickled
    return out


def test_resume_is_bit_identical_and_export_loads(tiny_setup, tmp_path, caplog):
    from diffusers_repae import RepaEPipeline

    straight, split = tmp_path / "straight", tmp_path / "split"
    with caplog.at_level("WARNING"):
        _run(_argv(tiny_setup, straight, 4))  # 3 batches per epoch: the resumed half crosses an epoch boundary
    assert "NO --vae: the VAE starts from RANDOM weights" in caplog.text  # no --vae in _argv: a loud warning
    _run(_argv(tiny_setup, split, 2))
    _run(_argv(tiny_setup, split, 4, "--resume_from_checkpoint", "latest"))
    a, b = _tensors(straight / "checkpoint-4"), _tensors(split / "checkpoint-4")
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for component in ("transformer", "vae"):
        x = load_file(straight / component / "diffusion_pytorch_model.safetensors")
        y = load_file(split / component / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(x[k], y[k]) for k in x)
    sit_ckpt = load_file(straight / "checkpoint-4" / "model_1.safetensors")
    sit_init = load_file(straight / "checkpoint-2" / "model_1.safetensors")
    assert any(not torch.equal(sit_ckpt[k], sit_init[k]) for k in sit_ckpt)  # it did train

    # the exported folder is a complete pipeline: EMA SiT + VAE with the EMA BN statistics
    pipe = RepaEPipeline.from_pretrained(straight)
    ema = load_file(straight / "checkpoint-4" / "project_state.safetensors")
    ema = {k.removeprefix("ema.model."): v for k, v in ema.items() if k.startswith("ema.model.")}
    torch.testing.assert_close(
        torch.tensor(pipe.vae.config.latents_std, dtype=torch.float64),
        ema["latent_norm.running_var"].double().sqrt(),
    )
    torch.testing.assert_close(pipe.transformer.proj_out.weight, ema["transformer.proj_out.weight"])
    projector = load_file(straight / "projector" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(projector["projectors.0.4.weight"], ema["projector.projectors.0.4.weight"])  # EMA projector
    images = pipe(
        class_labels=["red", 0], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert (straight / "loss_curves.png").is_file() and (straight / "discriminator" / "config.json").is_file()
    assert "without the LPIPS perceptual term" in (straight / "README.md").read_text()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_setup, tmp_path):
    out = tmp_path / "run"
    _run(_argv(tiny_setup, out, 2))
    before = _tensors(out / "checkpoint-2")
    with pytest.raises(RuntimeError, match="non-finite loss at step 3.*checkpoint-2"):
        _run(_argv(tiny_setup, out, 4, "--resume_from_checkpoint", "latest", "--kl_weight", "inf"))
    after = _tensors(out / "checkpoint-2")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in out.glob("*checkpoint*")) == ["checkpoint-2"]


def test_an_ablation_run_resumes_only_as_the_ablation(tiny_setup, tmp_path):
    from diffusers_repae.training.checkpointing import CheckpointError

    out = tmp_path / "naive"
    _run(_argv(tiny_setup, out, 2, "--ablation", "naive_e2e"))
    with pytest.raises(CheckpointError, match="ablation 'naive_e2e' in the checkpoint, None now"):
        _run(_argv(tiny_setup, out, 4, "--resume_from_checkpoint", "latest"))
    _run(_argv(tiny_setup, out, 4, "--resume_from_checkpoint", "latest", "--ablation", "naive_e2e"))
    assert (out / "checkpoint-4").is_dir()


def test_bad_flags_are_rejected(tiny_setup, tmp_path):
    with pytest.raises(ValueError, match="train_batch_size"):
        _run(_argv(tiny_setup, tmp_path, 2, "--train_batch_size", "0"))
    with pytest.raises(ValueError, match="discriminator_checkpoint"):
        _run(_argv(tiny_setup, tmp_path, 2, "--discriminator_checkpoint", str(tmp_path / "nope.bin")))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_processes(argv):
    """``accelerate launch --multi_gpu`` with 2 CPU processes (gloo): ACCELERATE_USE_CPU makes accelerate use them."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(SCRIPT), *argv,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_processes(tiny_setup, tmp_path):
    out = tmp_path / "ddp"
    _launch_two_processes(_argv(tiny_setup, out, 2))
    assert (out / "model_index.json").is_file() and (out / "checkpoint-2").is_dir()
    state = load_file(out / "checkpoint-2" / "project_state.safetensors")
    rng = state["generators.states"]
    assert rng.shape[0] == 2 and not torch.equal(rng[0], rng[1])  # per-process noise streams
    # per-process batch 2: each process saw its own shard, and the synchronised BN counted one batch per step
    assert state["latent_norm.num_batches_tracked"].item() == 2


def test_options_that_became_stages_say_where_they_live(tiny_setup, tmp_path):
    from diffusers_repae.cli import UserError

    with pytest.raises(
        UserError, match="--vae_freeze_step is no longer an option of train_repae.py: stage 2.*train_ldm"
    ):
        _run(_argv(tiny_setup, tmp_path, 2, "--vae_freeze_step", "1"))
    with pytest.raises(UserError, match="--decoder_latent_noise .*train_vae.py --vae RUN --freeze_encoder"):
        _run(_argv(tiny_setup, tmp_path, 2, "--decoder_latent_noise=0.5"))
    assert not tmp_path.joinpath("model_index.json").exists()


class _ExplodingState:
    """A registered object whose state cannot be saved: a crash in the middle of ``save_state``."""

    def state_dict(self):
        raise OSError("disk full")

    def load_state_dict(self, state):
        pass


def test_checkpoint_saving_is_crash_safe_and_rotates(tmp_path):
    from diffusers_repae.training.checkpointing import (
        list_checkpoints,
        remove_incomplete_checkpoints,
        resolve_resume_checkpoint,
        save_checkpoint,
    )

    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, 1)
    save_checkpoint(accelerator, tmp_path, 2, total_limit=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")

    with torch.no_grad():
        model.weight.add_(1.0)
    accelerator.register_for_checkpointing(_ExplodingState())
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(accelerator, tmp_path, 3, total_limit=1)
    # the previous checkpoint is untouched and 'latest' still finds it; the half-written one was hidden and is gone
    assert resolve_resume_checkpoint("latest", tmp_path).name == "checkpoint-2"
    after = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert not (tmp_path / ".checkpoint-3.tmp").exists()
    (tmp_path / ".checkpoint-4.tmp").mkdir()  # what a killed process leaves: removed before the next run
    assert [p.name for p in remove_incomplete_checkpoints(tmp_path)] == [".checkpoint-4.tmp"]
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_resume_checkpoint(str(tmp_path / "nope"), tmp_path)
