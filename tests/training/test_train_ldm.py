"""LDM-only training on a frozen VAE: cached latents give the same step as encoding on the fly."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image

from diffusers_repae import LatentBatchNorm, REPAProjector, SiTTransformer2DModel
from diffusers_repae.training.data import load_training_dataset
from diffusers_repae.training.latent_cache import load_latent_cache
from diffusers_repae.training.ldm_step import CachedLatentsWithImages, ldm_train_step
from diffusers_repae.training.repae_step import RepaEHyperParameters, RepaEModels

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PooledPixels:
    """A fixed stand-in vision encoder: 2x2-pooled colours as 8x8 tokens (the encoder itself is not under test)."""

    name, z_dim = "pooled-pixels", 3

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(pixel_values.float() / 255.0, 2).flatten(2).transpose(1, 2)


def make_vae(folder: Path) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        latent_channels=4,
        sample_size=16,
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[0.9, 1.1, 1.3, 0.7],
    )
    vae.save_pretrained(folder)
    return folder


def make_images(root: Path, count: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"class{i % 2}" / f"{i}.png")
    return root


def make_models(vae: AutoencoderKL) -> RepaEModels:
    torch.manual_seed(1)
    sit = SiTTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2, num_classes=2
    )
    with torch.no_grad():
        for param in sit.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    projector = REPAProjector(hidden_size=32, z_dims=[3], projector_dim=16, encoder_depth=1)
    # SGD, not AdamW: Adam turns the ~1e-10 float noise in gradients that are zero in theory (the key bias under
    # softmax) into full-size steps, which would hide whether the two routes agree.
    optimizer = torch.optim.SGD(list(sit.parameters()) + list(projector.parameters()), lr=0.1)
    return RepaEModels(
        vae=None,
        transformer=sit,
        projector=projector,
        discriminator=None,
        latent_norm=LatentBatchNorm.from_vae_config(vae.config).eval(),
        encoders=[PooledPixels()],
        vae_loss=None,
        optimizer_vae=None,
        optimizer_disc=None,
        optimizer_sit=optimizer,
    )


def collate(items: list[dict]) -> dict:
    return {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "num_skipped"}


def test_cached_latents_step_equals_on_the_fly_step(tmp_path):
    vae_dir = make_vae(tmp_path / "vae")
    images = make_images(tmp_path / "images")
    load_script("cache_latents").main(
        ["--vae", str(vae_dir), "--train_data_dir", str(images), "--resolution", "16",
         "--output_dir", str(tmp_path / "cache"), "--shard_size", "4", "--batch_size", "4"]
    )  # fmt: skip
    latents, _ = load_latent_cache(tmp_path / "cache")
    data = load_training_dataset(train_data_dir=str(images), resolution=16)
    cached = CachedLatentsWithImages(latents, data.dataset)
    rows = [3, 0, 6, 5]
    cached_batch = collate([cached[i] for i in rows])
    image_batch = collate([data.dataset[int(latents[i]["index"])] for i in rows])
    assert torch.equal(cached_batch["pixel_values"], image_batch["pixel_values"])

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    accelerator = Accelerator(cpu=True)
    hp = RepaEHyperParameters(encoder_depth=1, cfg_prob=0.3, freeze_latent_norm=True)
    on_the_fly, from_cache = make_models(vae), make_models(vae)
    initial = copy.deepcopy(on_the_fly.transformer.state_dict())
    bn_state = copy.deepcopy(on_the_fly.latent_norm.state_dict())
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(2):
        logs_a = ldm_train_step(accelerator, on_the_fly, hp, image_batch, vae, gen_a)
        logs_b = ldm_train_step(accelerator, from_cache, hp, cached_batch, vae, gen_b)
        torch.testing.assert_close(logs_a["sit/loss"], logs_b["sit/loss"], atol=1e-6, rtol=1e-6)

    state_a, state_b = on_the_fly.transformer.state_dict(), from_cache.transformer.state_dict()
    for name, value in state_a.items():
        torch.testing.assert_close(state_b[name], value, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(initial[name], state_a[name]) for name in initial)  # the step did train
    for name, value in bn_state.items():  # the frozen BN never picks up batch statistics
        assert torch.equal(on_the_fly.latent_norm.state_dict()[name], value), name


def test_frozen_norm_normalises_with_the_vae_statistics():
    vae = AutoencoderKL(
        block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, latents_mean=[1.0, 2.0, 3.0, 4.0], latents_std=[2.0, 2.0, 4.0, 0.5],
    )  # fmt: skip
    norm = LatentBatchNorm.from_vae_config(vae.config).eval()
    z = torch.randn(2, 4, 3, 3)
    mean = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    var = torch.tensor([4.0, 4.0, 16.0, 0.25]).view(1, 4, 1, 1)
    torch.testing.assert_close(norm(z), (z - mean) / torch.sqrt(var + 1e-4))  # the original's BN, eps included


def run_train_ldm(*argv: str) -> Path:
    common = ["--resolution", "64", "--enc_type", "efficientnet-lite0", "--train_batch_size", "4",
              "--mixed_precision", "no", "--report_to", "none", "--dataloader_num_workers", "0",
              "--validation_steps", "0", "--checkpointing_steps", "2"]  # fmt: skip
    return load_script("train_ldm").main([*argv, *common])


def test_cli_trains_from_cache_then_lora_adds_classes(tmp_path):
    """Recipe + frozen VAE + latent cache -> pipeline; then LoRA with new classes on that pipeline."""
    from diffusers_repae import RepaEPipeline, build_component

    rng = np.random.default_rng(0)
    for i in range(8):
        folder = tmp_path / "images" / f"shape{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    build_component("tiny-cpu", "vae", latents_mean=[0.1] * 4, latents_std=[0.8] * 4).save_pretrained(tmp_path / "vae")
    load_script("cache_latents").main(
        ["--vae", str(tmp_path / "vae"), "--train_data_dir", str(tmp_path / "images"), "--resolution", "64",
         "--output_dir", str(tmp_path / "cache"), "--batch_size", "8"]
    )  # fmt: skip

    base = run_train_ldm(
        "--recipe", "tiny-cpu", "--vae", str(tmp_path / "vae"), "--train_data_dir", str(tmp_path / "images"),
        "--latents_dir", str(tmp_path / "cache"), "--max_train_steps", "2", "--output_dir", str(tmp_path / "base"),
    )  # fmt: skip
    pipe = RepaEPipeline.from_pretrained(base)
    assert pipe.vae.config.latents_std == [0.8] * 4  # the frozen VAE's statistics, unchanged
    assert (base / "loss_curves.png").is_file() and (base / "checkpoint-2").is_dir()
    latents = pipe(class_labels=["shape1"], num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()

    lora = run_train_ldm(
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(tmp_path / "images"), "--new_classes",
        "--lora_rank", "4", "--learning_rate", "1e-2", "--max_train_steps", "2",
        "--output_dir", str(tmp_path / "lora"),
    )  # fmt: skip
    # the saved adapter is the trained one (issue 13 item 9): equal to the weights in the step-2 training checkpoint
    from safetensors.torch import load_file

    trained = load_file(lora / "checkpoint-2" / "model.safetensors")
    saved = load_file(lora / "lora" / "pytorch_lora_weights.safetensors")  # diffusers' layout, one file
    new_rows = saved.pop("transformer.class_embedding.token_adapter.trainable_tokens_delta")
    assert saved and all(key.startswith("transformer.") and ".lora_" in key for key in saved)
    for key, value in saved.items():
        assert torch.equal(value, trained[key.removeprefix("transformer.").replace(".weight", ".default.weight")]), key
    assert torch.equal(new_rows, trained["class_embedding.weight"][2:4])  # the two new classes' rows
    tuned = RepaEPipeline.from_pretrained(base)
    before = {k: v.clone() for k, v in tuned.transformer.state_dict().items()}
    tuned.load_lora_weights(lora / "lora")
    assert (
        tuned.transformer.config.num_classes == 4 and tuned.id2label[2] == "shape0" and tuned.id2label[1] == "shape1"
    )
    table = tuned.transformer.class_embedding.weight
    assert torch.equal(table[:2], before["class_embedding.weight"][:2])  # old classes kept
    assert torch.equal(table[4], before["class_embedding.weight"][2])  # null row kept, moved to the end
    lora_b = [p for n, p in tuned.transformer.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapter trained
    out = tuned(class_labels=[3], num_inference_steps=2, output_type="latent").images
    assert tuned.labels["shape0"] == [0, 2]  # names resolve to the old and the new class
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
