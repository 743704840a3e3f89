"""LoRA on the SiT with diffusers' standard attention targets (to_q, to_k, to_v, to_out.0), and adapters trained on
the old fused names (qkv, attn.proj) loading into the renamed model.

Expected outputs come from weights merged by hand (``W + scale * B @ A`` on a copy of the base model), never from
the loader under test."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from diffusers_repae import FlowMatchEulerMaruyamaScheduler, RepaEPipeline, SiTTransformer2DModel
from diffusers_repae.loaders import transformer_lora_state
from diffusers_repae.training.lora import DEFAULT_LORA_TARGETS, add_sit_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DIM, LAYERS, RANK, ALPHA = 32, 2, 4, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_sit() -> SiTTransformer2DModel:
    torch.manual_seed(0)
    sit = SiTTransformer2DModel(
        sample_size=8, patch_size=2, hidden_size=DIM, num_layers=LAYERS, num_attention_heads=2, num_classes=5
    )
    with torch.no_grad():
        for param in sit.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return sit.eval()


def pipeline(sit) -> RepaEPipeline:
    vae = AutoencoderKL(
        block_out_channels=(32,), down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
        layers_per_block=1, latent_channels=4, norm_num_groups=32,
    )  # fmt: skip
    pipe = RepaEPipeline(sit, vae, FlowMatchEulerMaruyamaScheduler(), default_num_inference_steps=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def velocity(sit, labels=(0, 3, 5)) -> torch.Tensor:
    x = torch.randn(len(labels), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return sit(x, torch.linspace(0.2, 0.8, len(labels)), torch.tensor(labels)).sample


def merged(deltas: dict[str, torch.Tensor]) -> SiTTransformer2DModel:
    """The base model with ``deltas`` ({module name: weight delta}) added by hand."""
    sit = base_sit()
    modules = dict(sit.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight.add_(delta)
    return sit


def test_standard_targets_reach_every_attention_and_only_there():
    sit = base_sit()
    sit.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    wrapped = sorted(name for name, module in sit.named_modules() if isinstance(module, LoraLayer))
    expected = sorted(f"transformer_blocks.{i}.attn.{t}" for i in range(LAYERS) for t in TARGETS)
    assert wrapped == expected
    assert set(TARGETS) <= set(DEFAULT_LORA_TARGETS)


def test_standard_target_lora_round_trips_through_the_pipeline(tmp_path):
    sit = base_sit()
    sit.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, param in sit.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    modules = dict(sit.named_modules())
    deltas = {
        f"transformer_blocks.{i}.attn.{t}": (ALPHA / RANK)
        * modules[f"transformer_blocks.{i}.attn.{t}"].lora_B["default"].weight
        @ modules[f"transformer_blocks.{i}.attn.{t}"].lora_A["default"].weight
        for i in range(LAYERS)
        for t in TARGETS
    }
    expected = velocity(merged({k: v.detach() for k, v in deltas.items()}))
    assert (expected - velocity(base_sit())).abs().max() > 1e-3  # the adapter matters

    layers, metadata = transformer_lora_state(sit)
    assert any(".attn.to_out.0.lora_B." in key for key in layers)
    RepaEPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    pipe = pipeline(base_sit())
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(velocity(pipe.transformer), expected, atol=1e-5, rtol=1e-5)
    pipe.fuse_lora()
    torch.testing.assert_close(velocity(pipe.transformer), expected, atol=1e-5, rtol=1e-5)


def old_named_lora(generator_seed: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA as trained on the old fused layout (targets ``qkv`` and ``attn.proj``): its tensors (the file's keys
    without the ``transformer.`` prefix) and the weight deltas it stands for, in the new names (the fused qkv delta
    split by rows q, k, v)."""
    generator = torch.Generator().manual_seed(generator_seed)
    layers, deltas, scale = {}, {}, ALPHA / RANK
    for i in range(LAYERS):
        prefix = f"transformer_blocks.{i}.attn"
        for old, rows in (("qkv", 3 * DIM), ("proj", DIM)):
            a = torch.randn(RANK, DIM, generator=generator) * 0.2
            b = torch.randn(rows, RANK, generator=generator) * 0.2
            layers[f"{prefix}.{old}.lora_A.weight"], layers[f"{prefix}.{old}.lora_B.weight"] = a, b
            delta = scale * b @ a
            if old == "proj":
                deltas[f"transformer_blocks.{i}.attn.to_out.0"] = delta
            else:
                for name, part in zip(("to_q", "to_k", "to_v"), delta.split(DIM)):
                    deltas[f"transformer_blocks.{i}.attn.{name}"] = part
    return layers, deltas


def old_metadata(target_modules) -> dict:
    return {"r": RANK, "lora_alpha": ALPHA, "target_modules": target_modules, "peft_type": "LORA"}


def test_lora_saved_with_the_old_names_loads_into_the_renamed_model(tmp_path):
    layers, deltas = old_named_lora()
    RepaEPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=old_metadata(["qkv", "attn.proj"])
    )
    expected = velocity(merged(deltas))
    assert (expected - velocity(base_sit())).abs().max() > 1e-3

    pipe = pipeline(base_sit())
    pipe.load_lora_weights(tmp_path)
    wrapped = {name for name, module in pipe.transformer.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == set(deltas)
    torch.testing.assert_close(velocity(pipe.transformer), expected, atol=1e-5, rtol=1e-5)

    sit = base_sit()  # the model-level loader, from the file, renames the same way
    sit.load_lora_adapter(tmp_path, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(velocity(sit), expected, atol=1e-5, rtol=1e-5)

    # an in-memory state dict without a header: the config comes from the renamed keys, lora_alpha = r (scale 1)
    pipe = pipeline(base_sit())
    pipe.load_lora_weights({f"transformer.{key}": value.clone() for key, value in layers.items()})
    unscaled = velocity(merged({name: delta * RANK / ALPHA for name, delta in deltas.items()}))
    torch.testing.assert_close(velocity(pipe.transformer), unscaled, atol=1e-5, rtol=1e-5)


def test_old_names_in_a_regex_target_are_a_clear_error(tmp_path):
    layers, _ = old_named_lora()
    RepaEPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=old_metadata(r".*\.(qkv|proj)")
    )
    with pytest.raises(ValueError, match=r"qkv is now to_q / to_k / to_v and proj is to_out\.0"):
        pipeline(base_sit()).load_lora_weights(tmp_path)


def test_add_sit_lora_translates_the_old_target_names():
    sit = base_sit()
    add_sit_lora(sit, rank=RANK, target_modules=["qkv", "attn.proj", "fc1"])
    wrapped = {name.rpartition(".")[2] for name, m in sit.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"to_q", "to_k", "to_v", "0", "fc1"}
    assert isinstance(sit.transformer_blocks[0].attn.to_out[0], LoraLayer)
