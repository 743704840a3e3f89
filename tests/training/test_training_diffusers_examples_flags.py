"""Training flags in the diffusers examples' language (per-device batch, LR schedules, 8-bit Adam, gradient
checkpointing) and model cards through diffusers' model-card utilities."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_repae import SiTTransformer2DModel
from diffusers_repae.training.builders import enable_gradient_checkpointing
from diffusers_repae.training.model_card import PIPELINE_TAGS, save_model_card
from diffusers_repae.training.optim import linear_decay_factor, make_adamw, make_lr_schedulers
from diffusers_repae.training_args import adamw_options, add_run_args, check_run_args, run_config

ROOT = Path(__file__).resolve().parents[2]


def run_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_args(parser, "test")
    args = parser.parse_args(list(argv))
    check_run_args(args)
    return args


def test_batch_size_is_per_device():
    run = run_config(run_args("--train_batch_size", "32", "--gradient_accumulation_steps", "2"))
    assert run.train_batch_size == 32
    assert run.global_batch_size(8) == 32 * 8 * 2
    # The original's global 256 is the documented 8 GPUs x 32.
    assert run_config(run_args("--train_batch_size", "32")).global_batch_size(8) == 256


def test_defaults_and_bad_values():
    args = run_args()
    assert (args.lr_scheduler, args.lr_warmup_steps, args.use_8bit_adam, args.gradient_checkpointing) == (
        "constant",
        0,
        False,
        False,
    )
    with pytest.raises(ValueError, match="--lr_warmup_steps"):
        run_args("--lr_warmup_steps", "-1")
    with pytest.raises(SystemExit):
        run_args("--lr_scheduler", "no-such-schedule")


def lrs_over_steps(
    args, steps: int, start: int = 0, optimizer=None, factor=None
) -> tuple[list[float], torch.optim.Optimizer]:
    """The learning rate each optimizer step uses, stepping the scheduler once per step as the loop does."""
    optimizer = optimizer or torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    factors = {"sit": factor} if factor else None
    scheduler = make_lr_schedulers(
        {"sit": optimizer}, args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps, start, factors
    )["sit"]
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used, optimizer


def test_cosine_with_warmup_follows_the_formula():
    args = run_args("--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--max_train_steps", "10")
    used, _ = lrs_over_steps(args, 10)
    expected = [0.5 * s / 3 if s < 3 else 0.5 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(10)]
    assert used == pytest.approx(expected, abs=1e-12)


def test_constant_schedule_keeps_the_learning_rate():
    used, _ = lrs_over_steps(run_args("--max_train_steps", "5"), 5)
    assert used == [0.5] * 5


def test_resumed_schedule_continues_where_it_stopped():
    """A resumed run rebuilds the schedule at its step from the restored optimizer state (initial_lr inside)."""
    args = run_args("--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--max_train_steps", "8")
    straight, _ = lrs_over_steps(args, 8)
    first, optimizer = lrs_over_steps(args, 5)
    restored = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    restored.load_state_dict(optimizer.state_dict())
    second, _ = lrs_over_steps(args, 3, start=5, optimizer=restored)
    assert first + second == pytest.approx(straight, abs=1e-12)


def test_a_learning_rate_factor_multiplies_the_schedule_and_resumes():
    args = run_args("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2", "--max_train_steps", "10")
    factor = linear_decay_factor(start=6, end=10)
    used, _ = lrs_over_steps(args, 10, factor=factor)
    expected = [0.5 * min(1.0, s / 2) * (1.0 if s < 6 else (10 - s) / 4) for s in range(10)]
    assert used == pytest.approx(expected, abs=1e-12)
    first, optimizer = lrs_over_steps(args, 7, factor=factor)
    restored = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    restored.load_state_dict(optimizer.state_dict())
    second, _ = lrs_over_steps(args, 3, start=7, optimizer=restored, factor=factor)
    assert first + second == pytest.approx(expected, abs=1e-12)


def test_a_factor_keeps_a_schedule_that_depends_on_the_base_rate():
    # polynomial decays towards lr_end=1e-7 in absolute terms: the factor must not change the schedule's shape
    args = run_args("--lr_scheduler", "polynomial", "--max_train_steps", "6")
    plain, _ = lrs_over_steps(args, 6)
    times_one, _ = lrs_over_steps(args, 6, factor=lambda step: 1.0)
    expected = [(0.5 - 1e-7) * (1 - s / 6) + 1e-7 for s in range(6)]
    assert plain == pytest.approx(expected, rel=0, abs=1e-12)
    assert times_one == pytest.approx(expected, rel=0, abs=1e-12)


def test_factors_for_unknown_optimisers_are_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    with pytest.raises(ValueError, match=r"unknown optimisers \['vae'\]"):
        make_lr_schedulers({"sit": optimizer}, factors={"vae": lambda step: 1.0})


def test_8bit_adam_is_an_optional_import(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(2))]
    args = run_args("--use_8bit_adam")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        make_adamw(params, 1e-4, **adamw_options(args))

    class FakeAdamW8bit(torch.optim.AdamW):
        pass

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    optimizer = make_adamw(params, 1e-4, **adamw_options(args))
    assert type(optimizer) is FakeAdamW8bit and optimizer.defaults["betas"] == (0.9, 0.999)
    assert type(make_adamw(params, 1e-4, **adamw_options(run_args()))) is torch.optim.AdamW


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        sit = SiTTransformer2DModel(
            sample_size=8, patch_size=2, hidden_size=32, num_layers=2, num_attention_heads=2, num_classes=3
        )
        with torch.no_grad():
            for param in sit.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        enable_gradient_checkpointing(checkpointing, sit)
        assert sit.gradient_checkpointing == checkpointing
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        sit(x, torch.tensor([0.2, 0.7]), torch.tensor([0, 2])).sample.square().mean().backward()
        return [p.grad for p in sit.parameters()]

    for with_ckpt, without in zip(grads(True), grads(False)):
        torch.testing.assert_close(with_ckpt, without, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- model cards
def test_openmoji_licence_travels_in_the_metadata(tmp_path):
    from diffusers_repae.training.data import load_training_dataset

    data = load_training_dataset(resolution=32, cache_dir=tmp_path / "cache", embedded_limit=9)
    body = f"# Emoji model\n\n{data.attribution}\n"
    path = save_model_card(tmp_path / "out", body, data.source, base_model="someone/repae-base", tags=PIPELINE_TAGS)
    card = ModelCard.load(path)
    assert card.data.license == "cc-by-sa-4.0"
    assert card.data.library_name == "diffusers" and card.data.base_model == "someone/repae-base"
    assert {"repa-e", "sit", "class-conditional"} <= set(card.data.tags)
    assert "OpenMoji" in card.text and "CC BY-SA 4.0" in card.text and "TODO" not in card.text


def test_hub_dataset_and_local_base_model(tmp_path):
    path = save_model_card(tmp_path / "out", "# x", "hub:ILSVRC/imagenet-1k", base_model=tmp_path, tags=["lora"])
    card = ModelCard.load(path)
    assert card.data.datasets == ["ILSVRC/imagenet-1k"]
    assert card.data.base_model is None  # a local folder is not a Hub id
    assert card.data.license is None and "lora" in card.data.tags
    assert len(card.data.tags) == len(set(card.data.tags))


# ----------------------------------------------------------------------------------- the flags in a real run
def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_ldm_with_the_flags(tmp_path, monkeypatch):
    from diffusers_repae import build_component
    from diffusers_repae.training.checkpointing import read_project_state

    rng = np.random.default_rng(0)
    for i in range(8):
        folder = tmp_path / "images" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    build_component("tiny-cpu", "vae", latents_mean=[0.1] * 4, latents_std=[0.8] * 4).save_pretrained(tmp_path / "vae")
    enabled = []
    original = SiTTransformer2DModel.enable_gradient_checkpointing
    monkeypatch.setattr(
        SiTTransformer2DModel, "enable_gradient_checkpointing", lambda self: enabled.append(1) or original(self)
    )
    out = tmp_path / "run"
    load_script("train_ldm").main(
        ["--recipe", "tiny-cpu", "--vae", str(tmp_path / "vae"), "--train_data_dir", str(tmp_path / "images"),
         "--resolution", "64", "--enc_type", "efficientnet-lite0", "--mixed_precision", "no", "--report_to", "none",
         "--dataloader_num_workers", "0", "--validation_steps", "0", "--output_dir", str(out),
         "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_train_steps", "3",
         "--checkpointing_steps", "3", "--learning_rate", "0.01", "--gradient_checkpointing",
         "--lr_scheduler", "linear", "--lr_warmup_steps", "1"]
    )  # fmt: skip
    assert enabled == [1]
    history = read_project_state(out / "checkpoint-3")["history"]["records"]
    # linear with 1 warm-up step over 3 steps: factors 0 (warm-up), then (3 - s) / (3 - 1) for s = 1, 2
    assert [r["lr/sit"] for r in history] == pytest.approx([0.0, 0.01, 0.005], abs=1e-12)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and {"repa-e", "sit"} <= set(card.data.tags)
    assert card.data.license is None and card.data.base_model is None  # own images, a local VAE
    assert "global batch 4" in card.text  # 2 per device x 1 process x 2 accumulation steps
