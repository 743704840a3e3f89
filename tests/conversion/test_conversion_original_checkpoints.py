"""Conversion of original REPA-E / LDM checkpoints: original-layout checkpoints are built with the independent
reference modules in tests/reference_original.py, converted with the CLIs, and compared numerically."""

from __future__ import annotations

import argparse
import fractions
import importlib.util
import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from diffusers_repae import SiTTransformer2DModel, vae_config
from diffusers_repae.conversion import (
    ConversionError,
    convert_vae_state_dict,
    infer_sit_config,
    infer_vae_config,
    load_checkpoint,
    split_sit_state_dict,
    verification_failures,
    verify_folder,
)
from diffusers_repae.conversion.sit import original_sit_state_dict
from diffusers_repae.models.discriminator import PatchGANDiscriminator
from diffusers_repae.pipelines import RepaEPipeline
from diffusers_repae.recipes import load_component_config
from reference_original import OriginalAutoencoderKL, OriginalSiT, sample_images

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "conversion" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_repae = load_script("convert_repae_to_diffusers")
convert_vae = load_script("convert_vae_to_diffusers")


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every weight away from its init: adaLN-Zero would otherwise make every output trivially zero."""
    for name, param in module.named_parameters():
        if name != "pos_embed":
            param.add_(torch.randn_like(param) * scale)


@torch.no_grad()
def set_bn_stats(sit: OriginalSiT, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    sit.bn.running_mean.copy_(torch.randn(sit.bn.num_features, generator=generator) * 0.5)
    sit.bn.running_var.copy_(torch.rand(sit.bn.num_features, generator=generator) * 1.5 + 0.5)
    sit.bn.num_batches_tracked.fill_(1234)


# tiny-cpu recipe shapes (so the recipe provides heads, scheduler and sampling defaults), latents 4 x 16 x 16
TINY_SIT = {
    "input_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": 192,
    "depth": 6,
    "num_heads": 3,
    "num_classes": 10,
    "encoder_depth": 2,
    "z_dims": (112, 24),
    "projector_dim": 256,
}


@pytest.fixture(scope="module")
def repae_checkpoint(tmp_path_factory):
    """A train_repae checkpoint in the original layout: model, ema, vae, discriminator, opt, args, steps."""
    torch.manual_seed(1)
    raw, ema = OriginalSiT(**TINY_SIT), OriginalSiT(**TINY_SIT)
    perturb(raw)
    perturb(ema)
    set_bn_stats(raw, 1)
    set_bn_stats(ema, 2)
    vae = OriginalAutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, embed_dim=4)  # f8d4-like
    perturb(vae)
    disc = PatchGANDiscriminator(ndf=8, n_layers=2)
    args = argparse.Namespace(
        model="SiT-S/2", encoder_depth=2, enc_type="dinov2-vit-b", vae="f8d4",
        vae_ckpt="pretrained/sdvae/sdvae-f8d4.pt", num_classes=10, cfg_prob=0.1, resolution=32,
    )  # fmt: skip
    checkpoint = {
        "model": raw.state_dict(),
        "ema": ema.state_dict(),
        "vae": vae.state_dict(),
        "discriminator": disc.state_dict(),
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "args": args,
        "steps": 4000,
    }
    path = tmp_path_factory.mktemp("repae") / "0004000.pt"
    torch.save(checkpoint, path)
    return {"path": path, "raw": raw.eval(), "ema": ema.eval(), "vae": vae.eval(), "disc": disc, "ckpt": checkpoint}


@pytest.fixture(scope="module")
def converted_repae(repae_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "pipe"
    argv = ["--checkpoint", str(repae_checkpoint["path"]), "--output_dir", str(out)]
    assert convert_repae.main([*argv, "--save_training_state", "--verify"]) == 0
    return out


def test_repae_sit_velocity_matches_original(repae_checkpoint, converted_repae):
    sit = SiTTransformer2DModel.from_pretrained(converted_repae / "transformer").eval()
    assert sit.config.num_attention_heads == 3  # from the tiny-cpu recipe: heads are not in any shape
    x = torch.randn(3, 4, 16, 16)
    t = torch.tensor([0.05, 0.5, 0.97])
    y = torch.tensor([0, 7, 10])  # 10 = null class
    with torch.no_grad():
        expected, zs = repae_checkpoint["ema"](x, t, y)
        out = sit(x, t, y, return_hidden_states_at=2)
    assert expected.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(out.sample, expected, atol=1e-5, rtol=0)

    # the raw (non-EMA) SiT and both projector heads of --save_training_state
    from diffusers_repae import REPAProjector

    raw_sit = SiTTransformer2DModel.from_pretrained(converted_repae / "training_state" / "transformer").eval()
    raw_projector = REPAProjector.from_pretrained(converted_repae / "training_state" / "projector").eval()
    ema_projector = REPAProjector.from_pretrained(converted_repae / "projector").eval()
    with torch.no_grad():
        raw_expected, raw_zs = repae_checkpoint["raw"](x, t, y)
        raw_out = raw_sit(x, t, y, return_hidden_states_at=2)
        torch.testing.assert_close(raw_out.sample, raw_expected, atol=1e-5, rtol=0)
        for mine, ref in zip(raw_projector(raw_out.hidden_states), raw_zs, strict=True):
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
        for mine, ref in zip(ema_projector(out.hidden_states), zs, strict=True):
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
    assert ema_projector.config.z_dims == [112, 24] and ema_projector.config.encoder_depth == 2


def test_repae_latent_statistics_exact(repae_checkpoint, converted_repae):
    vae = AutoencoderKL.from_pretrained(converted_repae / "vae")
    bn = repae_checkpoint["ema"].bn  # EMA statistics by default
    assert vae.config.latents_mean == bn.running_mean.double().tolist()
    assert vae.config.latents_std == [math.sqrt(v) for v in bn.running_var.double().tolist()]
    assert vae.config.scaling_factor == 1.0
    # float32 of the stored std is the correctly rounded float32 sqrt (numpy's; torch's CPU float32 sqrt is not
    # always correctly rounded, off by one ulp on some builds)
    assert np.array_equal(np.array(vae.config.latents_std, dtype=np.float32), np.sqrt(bn.running_var.numpy()))
    # the raw BN buffers travel with the training state, bit for bit
    from safetensors.torch import load_file

    buffers = load_file(str(converted_repae / "training_state" / "latent_norm.safetensors"))
    for key, value in repae_checkpoint["raw"].bn.state_dict().items():
        assert torch.equal(buffers[key], value)


def test_repae_vae_decode_and_encode_match_original(repae_checkpoint, converted_repae):
    vae = AutoencoderKL.from_pretrained(converted_repae / "vae").eval()
    ref = repae_checkpoint["vae"]
    z = torch.randn(2, 4, 8, 8)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = ref.decode(z)
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(vae.decode(z).sample, expected, atol=1e-5, rtol=0)
        mean, logvar = ref.encode_moments(image)
        posterior = vae.encode(image).latent_dist
        torch.testing.assert_close(posterior.mean, mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(posterior.logvar, logvar, atol=1e-5, rtol=0)


def test_repae_pipeline_folder_contents(repae_checkpoint, converted_repae):
    index = json.loads((converted_repae / "model_index.json").read_text())
    recipe_index = json.loads((ROOT / "pipelines" / "tiny-cpu" / "model_index.json").read_text())
    for key in ("default_num_inference_steps", "default_guidance_scale", "default_guidance_interval"):
        assert index[key] == recipe_index[key]
    scheduler = json.loads((converted_repae / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerMaruyamaScheduler"
    assert scheduler["t_last"] == load_component_config("tiny-cpu", "scheduler")["t_last"]
    card = (converted_repae / "README.md").read_text()
    assert "0004000.pt" in card and "4,000" in card and "EMA" in card
    weights = sorted(p.name for p in converted_repae.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt"})
    assert weights and all(name.endswith(".safetensors") for name in weights)
    disc = PatchGANDiscriminator.from_pretrained(converted_repae / "training_state" / "discriminator")
    for key, value in repae_checkpoint["disc"].state_dict().items():
        assert torch.equal(disc.state_dict()[key], value)
    state = json.loads((converted_repae / "training_state" / "state.json").read_text())
    assert state["steps"] == 4000 and state["args"]["model"] == "SiT-S/2"


def test_repae_sampled_image_matches_reference_sampler(repae_checkpoint, converted_repae):
    pipe = RepaEPipeline.from_pretrained(converted_repae)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([3, 8])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    guidance = {"cfg_scale": 2.5, "guidance_low": 0.0, "guidance_high": 0.7}
    expected = sample_images(repae_checkpoint["ema"], repae_checkpoint["vae"], noise, labels, 4, **guidance)
    images = pipe(
        class_labels=labels.tolist(),
        num_inference_steps=4,
        guidance_scale=2.5,
        guidance_interval=(0.0, 0.7),
        latents=noise,
        sampler="euler",
        sampling_dtype=torch.float64,
        output_type="pt",
    ).images
    assert expected.std() > 1e-2
    torch.testing.assert_close(images.float(), expected, atol=1e-4, rtol=0)


def test_no_ema_exports_the_raw_sit(repae_checkpoint, tmp_path):
    out = tmp_path / "raw"
    assert (
        convert_repae.main(["--checkpoint", str(repae_checkpoint["path"]), "--output_dir", str(out), "--no_ema"]) == 0
    )
    sit = SiTTransformer2DModel.from_pretrained(out / "transformer").eval()
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([0.4]), torch.tensor([2])
    with torch.no_grad():
        torch.testing.assert_close(sit(x, t, y).sample, repae_checkpoint["raw"](x, t, y)[0], atol=1e-5, rtol=0)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.latents_mean == repae_checkpoint["raw"].bn.running_mean.double().tolist()
    assert "raw (non-EMA)" in (out / "README.md").read_text()


# ------------------------------------------------------------------------------- f16d32-like VAEs, LDM-only


def make_f16d32_like(seed: int) -> OriginalAutoencoderKL:
    """3 levels (32, 32, 64 channels), attention at the lowest resolution: 1 encoder, 2 decoder blocks per level."""
    torch.manual_seed(seed)
    vae = OriginalAutoencoderKL(
        ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32, embed_dim=8
    )
    perturb(vae)
    return vae.eval()


@pytest.fixture(scope="module")
def f16d32_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vavae")
    vae = make_f16d32_like(3)
    generator = torch.Generator().manual_seed(4)
    variance = torch.rand(1, 8, 1, 1, generator=generator) + 0.3
    stats = {"latents_scale": 1 / variance.sqrt(), "latents_bias": torch.randn(1, 8, 1, 1, generator=generator)}
    # VA-VAE style: a foundation-model projection and the training loss beside the autoencoder
    extras = {
        "linear_proj.weight": torch.randn(16, 8, 1, 1),
        "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
    }
    torch.save({"state_dict": {**vae.state_dict(), **extras}, "global_step": 10}, folder / "e2e-vavae-tiny.pt")
    torch.save(stats, folder / "e2e-vavae-tiny-latents-stats.pt")
    return {"folder": folder, "vae": vae, "stats": stats}


def test_f16d32_vae_with_per_level_attention(f16d32_files, tmp_path, capsys):
    folder, out = f16d32_files["folder"], tmp_path / "vae"
    argv = [
        "--checkpoint",
        str(folder / "e2e-vavae-tiny.pt"),
        "--arch",
        "f16d32",
        "--output_dir",
        str(out),
        "--verify",
    ]
    assert convert_vae.main(argv) == 0  # stats file found beside the checkpoint
    printed = capsys.readouterr().out
    assert "linear_proj.weight" in printed and "loss.discriminator.main.0.weight" in printed  # skipped, and said so
    vae = AutoencoderKL.from_pretrained(out).eval()
    assert vae.config.down_block_types[-1] == "AttnDownEncoderBlock2D"
    assert vae.config.up_block_types[0] == "AttnUpDecoderBlock2D"
    assert len(vae.decoder.up_blocks[0].attentions) == 2 and len(vae.encoder.down_blocks[-1].attentions) == 1
    z = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        expected = f16d32_files["vae"].decode(z)
        torch.testing.assert_close(vae.decode(z).sample, expected, atol=1e-5, rtol=0)
    scale, bias = f16d32_files["stats"]["latents_scale"], f16d32_files["stats"]["latents_bias"]
    assert vae.config.latents_mean == bias.double().flatten().tolist()
    assert vae.config.latents_std == (1 / scale.double().flatten()).tolist()
    assert vae.config.scaling_factor == 1.0


def test_f16d32_vae_from_safetensors_with_unknown_key_fails(f16d32_files, tmp_path, capsys):
    state = {k: v.contiguous() for k, v in f16d32_files["vae"].state_dict().items()}
    save_file(state, str(tmp_path / "vae.safetensors"))
    out = tmp_path / "out"
    assert (
        convert_vae.main(
            ["--checkpoint", str(tmp_path / "vae.safetensors"), "--arch", "f16d32", "--output_dir", str(out)]
        )
        == 0
    )
    assert "latents_mean/latents_std stay unset" in capsys.readouterr().out
    save_file({**state, "encoder.extra_head.weight": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    assert (
        convert_vae.main(
            [
                "--checkpoint",
                str(tmp_path / "bad.safetensors"),
                "--arch",
                "f16d32",
                "--output_dir",
                str(out),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "unexpected keys (1): encoder.extra_head.weight" in capsys.readouterr().err
    # an f16d32 file declared as f8d4: the per-level attention keys are reported by name
    assert (
        convert_vae.main(
            [
                "--checkpoint",
                str(tmp_path / "vae.safetensors"),
                "--arch",
                "f8d4",
                "--output_dir",
                str(out),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "encoder.down.2.attn.0.q.weight" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ldm_checkpoint(tmp_path_factory):
    """A train_ldm_only checkpoint (no 'vae'): SiT-S/1-like on 8 x 4 x 4 latents of the f16d32-like VAE."""
    torch.manual_seed(6)
    config = {"input_size": 4, "patch_size": 1, "in_channels": 8, "hidden_size": 64, "depth": 3, "num_heads": 4,
              "num_classes": 10, "encoder_depth": 2, "z_dims": (16,), "projector_dim": 32}  # fmt: skip
    raw, ema = OriginalSiT(**config), OriginalSiT(**config)
    perturb(raw)
    perturb(ema)
    args = argparse.Namespace(model="SiT-S/1", encoder_depth=2, vae="f16d32", num_classes=10, cfg_prob=0.1)
    path = tmp_path_factory.mktemp("ldm") / "0001000.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args, "steps": 1000}, path)
    return {"path": path, "ema": ema.eval()}


def test_ldm_only_checkpoint_needs_and_uses_the_vae_files(ldm_checkpoint, f16d32_files, tmp_path, capsys):
    base = ["--checkpoint", str(ldm_checkpoint["path"]), "--output_dir", str(tmp_path / "out")]
    assert convert_repae.main([*base, "--num_attention_heads", "4"]) == 2
    assert "--vae_checkpoint" in capsys.readouterr().err
    vae_file = str(f16d32_files["folder"] / "e2e-vavae-tiny.pt")
    assert convert_repae.main([*base, "--vae_checkpoint", vae_file]) == 2  # 64-wide SiT: no recipe has its heads
    assert "--num_attention_heads" in capsys.readouterr().err
    assert convert_repae.main([*base, "--vae_checkpoint", vae_file, "--num_attention_heads", "4", "--verify"]) == 0

    pipe = RepaEPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    x, t, y = torch.randn(2, 8, 4, 4), torch.tensor([0.3, 0.8]), torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.transformer(x, t, y).sample, ldm_checkpoint["ema"](x, t, y)[0], atol=1e-5, rtol=0
        )
    stats = f16d32_files["stats"]
    assert pipe.vae.config.latents_mean == stats["latents_bias"].double().flatten().tolist()
    # sampling: the reference un-normalises with its BN, so give it the file's statistics
    ref_sit = ldm_checkpoint["ema"]
    ref_sit.bn.running_mean.copy_(stats["latents_bias"].flatten())
    ref_sit.bn.running_var.copy_((1 / stats["latents_scale"].double().flatten()) ** 2)
    noise = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(9))
    expected = sample_images(ref_sit, f16d32_files["vae"], noise, torch.tensor([4]), 3)
    images = pipe(class_labels=[4], num_inference_steps=3, guidance_scale=1.0, latents=noise, sampler="euler",
                  sampling_dtype=torch.float64, output_type="pt").images  # fmt: skip
    torch.testing.assert_close(images.float(), expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- errors, safety


def test_truncated_and_foreign_pickles_are_refused(repae_checkpoint, tmp_path):
    data = repae_checkpoint["path"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.safetensors")
    torch.save({"model": {}, "weird": fractions.Fraction(1, 3)}, tmp_path / "foreign.pt")
    with pytest.raises(ConversionError, match=r"fractions\.Fraction.*arbitrary code.*re-save"):
        load_checkpoint(tmp_path / "foreign.pt")
    assert isinstance(load_checkpoint(repae_checkpoint["path"])["args"], argparse.Namespace)


def test_foreign_pickle_via_script_entry_point(tmp_path, monkeypatch, capsys):
    """Runs the script file as ``__main__`` (in-process: a fresh interpreter costs tens of seconds here)."""
    torch.save({"model": {}, "weird": fractions.Fraction(1, 3)}, tmp_path / "foreign.pt")
    script = ROOT / "conversion" / "convert_repae_to_diffusers.py"
    argv = [str(script), "--checkpoint", str(tmp_path / "foreign.pt"), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "fractions.Fraction" in err
    assert not (tmp_path / "out").exists()


def test_wrong_keys_and_shapes_are_reported_by_name(repae_checkpoint, tmp_path, capsys):
    checkpoint = dict(repae_checkpoint["ckpt"])
    ema = dict(checkpoint["ema"])
    ema["blocks.1.attn.qkv_renamed.weight"] = ema.pop("blocks.1.attn.qkv.weight")
    ema["blocks.2.mlp.fc1.weight"] = torch.zeros(10, 192)
    checkpoint["ema"] = ema
    torch.save(checkpoint, tmp_path / "bad.pt")
    assert convert_repae.main(["--checkpoint", str(tmp_path / "bad.pt"), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing keys (1): blocks.1.attn.qkv.weight" in err
    assert "unexpected keys (1): blocks.1.attn.qkv_renamed.weight" in err
    assert "blocks.2.mlp.fc1.weight: checkpoint (10, 192) vs expected (768, 192)" in err

    checkpoint = dict(repae_checkpoint["ckpt"])
    vae = dict(checkpoint["vae"])
    vae["decoder.up.1.upsample.conv.weight"] = torch.zeros(64, 64, 1, 1)
    checkpoint["vae"] = vae
    torch.save(checkpoint, tmp_path / "bad_vae.pt")
    assert (
        convert_repae.main(["--checkpoint", str(tmp_path / "bad_vae.pt"), "--output_dir", str(tmp_path / "o2")]) == 2
    )
    assert (
        "decoder.up.1.upsample.conv.weight: checkpoint (64, 64, 1, 1) vs expected (64, 64, 3, 3)"
        in capsys.readouterr().err
    )

    argv = ["--checkpoint", str(repae_checkpoint["path"]), "--output_dir", str(tmp_path / "o3"), "--model", "SiT-S/4"]
    assert convert_repae.main(argv) == 2
    assert "patch size 4" in capsys.readouterr().err


def test_verify_detects_a_tampered_folder(repae_checkpoint, tmp_path):
    from diffusers_repae.conversion import convert_training_checkpoint, write_pipeline_folder

    converted = convert_training_checkpoint(load_checkpoint(repae_checkpoint["path"]))
    write_pipeline_folder(converted, tmp_path, str(repae_checkpoint["path"]))
    assert verification_failures(verify_folder(tmp_path, converted)) == {}
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1e-3)
    vae.save_pretrained(tmp_path / "vae")
    failures = verification_failures(verify_folder(tmp_path, converted))
    assert list(failures) == ["vae weights"] and failures["vae weights"] == pytest.approx(1e-3, rel=1e-3)


# ------------------------------------------------------------- real architectures (shapes only, meta device)


@pytest.mark.parametrize(
    ("arch", "ch_mult", "attn", "embed_dim"), [("f8d4", (1, 2, 4, 4), (), 4), ("f16d32", (1, 1, 2, 2, 4), (16,), 32)]
)
def test_real_vae_layouts_map_completely(arch, ch_mult, attn, embed_dim):
    with torch.device("meta"):
        original = OriginalAutoencoderKL(128, ch_mult, 2, attn, 256, embed_dim).state_dict()
        config = infer_vae_config(original, arch)
        assert config == vae_config(arch)
        vae = AutoencoderKL.from_config(config)
        converted = convert_vae_state_dict(original, vae)  # raises on any missing / unexpected / mis-shaped key
    assert set(converted) == set(vae.state_dict())


@pytest.mark.parametrize(
    ("model", "recipe", "input_size", "channels"),
    [("SiT-XL/2", "sit-xl-2-sdvae", 32, 4), ("SiT-XL/1", "sit-xl-1-vavae", 16, 32)],
)
def test_real_sit_layouts_map_completely(model, recipe, input_size, channels):
    patch = int(model[-1])
    with torch.device("meta"):
        original = OriginalSiT(input_size, patch, channels, 1152, 28, 16, 1000, 8, (768,), 2048).state_dict()
    split = split_sit_state_dict(original)
    config = infer_sit_config(split, {"model": model, "num_classes": 1000, "cfg_prob": 0.1})
    assert config == {k: v for k, v in load_component_config(recipe, "transformer").items() if not k.startswith("_")}
    with torch.device("meta"):
        sit = SiTTransformer2DModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in original_sit_state_dict(sit.state_dict()).items()}
    assert expected == {k: tuple(v.shape) for k, v in split.transformer.items()}


def test_recipe_choice_from_model_name_and_vae_file():
    from diffusers_repae.conversion.repae import pick_recipe, vae_family

    xl2 = load_component_config("sit-xl-2-sdvae", "transformer")
    xl1 = load_component_config("sit-xl-1-vavae", "transformer")
    assert pick_recipe(xl2, "SiT-XL/2", vae_family("pretrained/sdvae/sdvae-f8d4.pt"), False) == "sit-xl-2-sdvae"
    assert pick_recipe(xl1, "SiT-XL/1", vae_family("pretrained/invae/invae-f16d32.pt"), False) == "sit-xl-1-invae"
    assert pick_recipe(xl1, "SiT-XL/1", vae_family("pretrained/vavae/vavae-f16d32.pt"), False) == "sit-xl-1-vavae"
    assert pick_recipe(xl1, "SiT-XL/1", vae_family("e2e-vavae/e2e-vavae-400k.pt"), True) == "sit-xl-1-e2e-vavae-ldm"
    small = {**xl2, "hidden_size": 64}
    assert pick_recipe(small, "SiT-XL/2", "sdvae", False) is None


def test_flat_safetensors_checkpoint_without_args_needs_flags(repae_checkpoint, tmp_path, capsys):
    ckpt = repae_checkpoint["ckpt"]
    groups = ("ema", "model", "vae")
    flat = {f"{group}.{key}": value.contiguous() for group in groups for key, value in ckpt[group].items()}
    save_file(flat, str(tmp_path / "repae.safetensors"))
    base = ["--checkpoint", str(tmp_path / "repae.safetensors"), "--output_dir", str(tmp_path / "out")]
    assert convert_repae.main(base) == 2  # no args: nothing names the VAE architecture
    assert "--vae_arch" in capsys.readouterr().err
    assert convert_repae.main([*base, "--vae_arch", "f8d4", "--model", "SiT-S/2"]) == 0
    sit = SiTTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([0.6]), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(sit(x, t, y).sample, repae_checkpoint["ema"](x, t, y)[0], atol=1e-5, rtol=0)


# The original's table, SPEC section 2: variant -> (depth, hidden, heads).
ORIGINAL_SIT_TABLE = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
@pytest.mark.parametrize("variant", ["S", "B", "L", "XL"])
def test_every_original_model_name_converts_without_hints(variant, patch):
    """Issue 13 item 5: SiT-{S,B,L,XL}/{1,2,4,8} need no --num_attention_heads (heads are in no tensor shape)."""
    depth, hidden, heads = ORIGINAL_SIT_TABLE[variant]
    with torch.device("meta"):
        original = OriginalSiT(32, patch, 4, hidden, depth, heads, 1000, 4, (768,), 2048).state_dict()
    config = infer_sit_config(split_sit_state_dict(original), {"model": f"SiT-{variant}/{patch}"})
    assert (config["num_layers"], config["hidden_size"], config["num_attention_heads"]) == (depth, hidden, heads)
    assert config["patch_size"] == patch and config["sample_size"] == 32
    # the name is not even needed: depth and width pick the variant
    assert infer_sit_config(split_sit_state_dict(original), {})["num_attention_heads"] == heads


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_converted_sde_scheduler_keeps_the_training_path_type(repae_checkpoint, path_type):
    """Issue 13 item 8: a cosine-trained checkpoint samples with the cosine score (the SDE stores the path)."""
    checkpoint = dict(repae_checkpoint["ckpt"])
    checkpoint["args"] = argparse.Namespace(**{**vars(checkpoint["args"]), "path_type": path_type})
    from diffusers_repae.conversion import convert_training_checkpoint

    converted = convert_training_checkpoint(checkpoint)
    assert converted.scheduler.config.path_type == path_type
