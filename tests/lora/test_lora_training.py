"""LoRA fine-tuning: only adapters and new label rows learn; adapters round-trip through save/load."""

import copy

import torch
from diffusers import AutoencoderKL

from diffusers_repae import FlowMatchEulerMaruyamaScheduler, RepaEPipeline, SiTTransformer2DModel
from diffusers_repae.training.lora import add_sit_lora, save_sit_lora

CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_attention_heads=4, num_classes=5
)


def pretrained_sit() -> SiTTransformer2DModel:
    sit = SiTTransformer2DModel(**CONFIG)
    with torch.no_grad():
        for param in sit.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return sit


def train_a_few_steps(sit, labels, steps=5):
    optimizer = torch.optim.AdamW([p for p in sit.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    sit.train()
    for _ in range(steps):
        x, eps, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.rand(4)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
        loss = (sit(x_t, t, labels, drop_labels=True).sample - (eps - x)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_changes_only_adapters_and_new_label_rows():
    sit = pretrained_sit()
    before = {name: p.detach().clone() for name, p in sit.named_parameters()}
    old_table = sit.class_embedding.weight.detach().clone()
    add_sit_lora(sit, rank=4, num_new_classes=2)
    assert sit.config.num_classes == 7 and sit.class_embedding.num_embeddings == 8
    train_a_few_steps(sit, torch.tensor([0, 5, 6, 7]))  # 7 is the new null class
    after = dict(sit.named_parameters())
    for name, value in before.items():
        if name == "class_embedding.weight":
            continue
        base_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        current = after.get(name, after.get(base_name))
        assert torch.equal(current, value), name
    table = sit.class_embedding.weight.detach()
    assert torch.equal(table[:5], old_table[:5])  # old real classes kept
    assert torch.equal(table[7], old_table[5])  # null row moved to the end, unchanged
    assert not torch.allclose(table[5:7], torch.zeros_like(table[5:7]))
    lora_b = [p for n, p in sit.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_adapter_round_trips_through_save_and_load(tmp_path):
    base = pretrained_sit()
    sit = copy.deepcopy(base)
    add_sit_lora(sit, rank=4, num_new_classes=1)
    train_a_few_steps(sit, torch.tensor([0, 5, 5, 6]))
    save_sit_lora(sit, tmp_path, id2label={i: f"class {i}" for i in range(6)}, base_num_classes=5)

    # the same pretrained weights in a pipeline, as a user would load them again
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=32)  # fmt: skip
    pipe = RepaEPipeline(copy.deepcopy(base), vae, FlowMatchEulerMaruyamaScheduler())
    pipe.load_lora_weights(tmp_path)
    fresh = pipe.transformer
    assert pipe.id2label[5] == "class 5" and fresh.config.num_classes == 6
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1, 5, 6])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x, t, y).sample, sit.eval()(x, t, y).sample, atol=1e-6, rtol=1e-5)
