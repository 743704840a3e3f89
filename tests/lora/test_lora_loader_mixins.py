"""LoRA through diffusers' loader mixins on RepaEPipeline: the standard file layout, new classes in the same file,
set_adapters / disable / fuse / unload, each checked against the trained model itself or the untouched base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open

from diffusers_repae import FlowMatchEulerMaruyamaScheduler, RepaEPipeline, SiTTransformer2DModel
from diffusers_repae.loaders import transformer_lora_state
from diffusers_repae.training.lora import add_sit_lora

NUM_CLASSES = 5
NAMES = {i: f"old{i}" for i in range(NUM_CLASSES)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_sit() -> SiTTransformer2DModel:
    torch.manual_seed(0)
    sit = SiTTransformer2DModel(
        sample_size=8, patch_size=2, hidden_size=32, num_layers=2, num_attention_heads=2, num_classes=NUM_CLASSES
    )
    with torch.no_grad():
        for param in sit.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return sit.eval()


def pipeline(sit: SiTTransformer2DModel) -> RepaEPipeline:
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    pipe = RepaEPipeline(sit, vae, FlowMatchEulerMaruyamaScheduler(), id2label=NAMES, default_num_inference_steps=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_lora(num_new_classes: int = 0) -> SiTTransformer2DModel:
    """The base SiT with a LoRA (and new label rows) whose weights are non-trivial, as after training."""
    sit = copy.deepcopy(base_sit())
    add_sit_lora(sit, rank=4, num_new_classes=num_new_classes)
    with torch.no_grad():
        for name, param in sit.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
        if num_new_classes:
            sit.class_embedding.weight[NUM_CLASSES : NUM_CLASSES + num_new_classes].normal_(std=0.5)
    return sit.eval()


def velocity(sit, labels) -> torch.Tensor:
    x = torch.randn(len(labels), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.2, 0.8, len(labels))
    with torch.no_grad():
        return sit(x, t, torch.tensor(labels)).sample


def save(sit, folder, new_names: dict[int, str] | None = None):
    base = NUM_CLASSES if new_names else None
    layers, metadata = transformer_lora_state(sit, base_num_classes=base)
    RepaEPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=metadata,
        id2label={**NAMES, **new_names} if new_names else None,
        base_num_classes=base,
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_standard_layout_and_round_trip(tmp_path):
    sit = trained_lora()
    path = save(sit, tmp_path)
    with safe_open(path, "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight" in keys
    config = json.loads(header["lora_adapter_metadata"])
    standard = {"to_q", "to_k", "to_v", "to_out.0", "fc1"}
    assert config["transformer.r"] == 4 and set(config["transformer.target_modules"]) >= standard

    pipe = pipeline(base_sit())
    base = velocity(pipe.transformer, [0, 3, NUM_CLASSES])
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    labels = [0, 3, NUM_CLASSES]
    torch.testing.assert_close(velocity(pipe.transformer, labels), velocity(sit, labels), atol=1e-6, rtol=1e-5)
    assert pipe.get_active_adapters() == ["style"]

    pipe.set_adapters("style", 0.0)  # a zero-weight adapter is the base model
    torch.testing.assert_close(velocity(pipe.transformer, labels), base, atol=1e-6, rtol=1e-5)
    pipe.set_adapters("style", 1.0)
    pipe.disable_lora()
    torch.testing.assert_close(velocity(pipe.transformer, labels), base, atol=0, rtol=0)
    pipe.enable_lora()
    torch.testing.assert_close(velocity(pipe.transformer, labels), velocity(sit, labels), atol=1e-6, rtol=1e-5)

    pipe.unload_lora_weights()
    assert not any("lora" in name for name, _ in pipe.transformer.named_parameters())
    torch.testing.assert_close(velocity(pipe.transformer, labels), base, atol=0, rtol=0)


def test_plain_diffusers_model_loader_reads_the_file(tmp_path):
    """The keys are diffusers' standard ones: the model-level loader with the default prefix finds them."""
    sit = trained_lora()
    save(sit, tmp_path)
    fresh = base_sit()
    fresh.load_lora_adapter(tmp_path, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(velocity(fresh, [1, 2]), velocity(sit, [1, 2]), atol=1e-6, rtol=1e-5)


def test_fused_lora_survives_unload(tmp_path):
    sit = trained_lora()
    save(sit, tmp_path)
    pipe = pipeline(base_sit())
    pipe.load_lora_weights(tmp_path)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not any("lora" in name for name, _ in pipe.transformer.named_parameters())
    torch.testing.assert_close(velocity(pipe.transformer, [0, 4]), velocity(sit, [0, 4]), atol=1e-5, rtol=1e-5)


NEW_NAMES = {NUM_CLASSES: "emoji cat", NUM_CLASSES + 1: "emoji dog"}


def test_new_classes_travel_in_the_same_file(tmp_path):
    sit = trained_lora(num_new_classes=2)
    path = save(sit, tmp_path, NEW_NAMES)
    with safe_open(path, "pt") as f:
        rows = f.get_tensor("transformer.class_embedding.token_adapter.trainable_tokens_delta")
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_lora_weights.safetensors"]  # no side files
    torch.testing.assert_close(rows, sit.class_embedding.weight[NUM_CLASSES : NUM_CLASSES + 2], atol=0, rtol=0)
    assert header["transformer.trainable_token_indices"] == {"class_embedding": [5, 6]}
    assert header["repae.base_num_classes"] == 5 and header["repae.num_classes"] == 7

    pipe = pipeline(base_sit())
    base_null = pipe.transformer.class_embedding.weight[NUM_CLASSES].clone()
    base = velocity(pipe.transformer, [0, 4, NUM_CLASSES])
    pipe.load_lora_weights(tmp_path)
    assert pipe.transformer.config.num_classes == 7 and pipe.id2label[6] == "emoji dog"
    assert pipe.get_label_ids(["emoji cat", "old2"]) == [5, 2]
    labels = [0, 5, 6, 7]  # an old class, both new ones, the null class (moved to the end)
    torch.testing.assert_close(velocity(pipe.transformer, labels), velocity(sit, labels), atol=1e-6, rtol=1e-5)
    assert torch.equal(pipe.transformer.class_embedding.weight[7], base_null)
    latents = pipe(class_labels=["emoji dog"], output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()

    pipe.unload_lora_weights()  # not fused: back to the base model, its table and its names
    assert pipe.transformer.config.num_classes == NUM_CLASSES and pipe.id2label == NAMES
    assert pipe.config.id2label == {str(k): v for k, v in NAMES.items()}
    torch.testing.assert_close(velocity(pipe.transformer, [0, 4, NUM_CLASSES]), base, atol=0, rtol=0)


def test_fused_new_classes_stay_after_unload(tmp_path):
    sit = trained_lora(num_new_classes=2)
    save(sit, tmp_path, NEW_NAMES)
    pipe = pipeline(base_sit())
    pipe.load_lora_weights(tmp_path)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert isinstance(pipe.transformer.class_embedding, torch.nn.Embedding)
    assert pipe.transformer.config.num_classes == 7 and pipe.id2label[5] == "emoji cat"
    labels = [1, 5, 6, 7]
    torch.testing.assert_close(velocity(pipe.transformer, labels), velocity(sit, labels), atol=1e-5, rtol=1e-5)


def test_class_lora_refused_on_another_class_count(tmp_path):
    save(trained_lora(num_new_classes=1), tmp_path, {NUM_CLASSES: "new"})
    sit = SiTTransformer2DModel(
        sample_size=8, patch_size=2, hidden_size=32, num_layers=2, num_attention_heads=2, num_classes=NUM_CLASSES + 3
    )
    pipe = pipeline(sit)
    with pytest.raises(ValueError, match="adds classes to a SiT with 5 classes"):
        pipe.load_lora_weights(tmp_path)
