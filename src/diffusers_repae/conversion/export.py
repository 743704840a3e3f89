"""Write a converted checkpoint as a RepaEPipeline folder (safetensors) and verify the folder after a reload."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from ..models.discriminator import PatchGANDiscriminator
from ..models.projector import REPAProjector
from ..models.transformer_sit import SiTTransformer2DModel
from .repae import ConvertedCheckpoint
from .sit import POS_EMBED_ATOL

TRAINING_STATE_DIR = "training_state"


def _json_safe(value):
    """Training args as JSON (paths and other objects become strings)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def model_card(converted: ConvertedCheckpoint, source_file: str) -> str:
    """A short README: where the weights come from and how to sample with them."""
    config = converted.transformer.config
    settings = converted.pipeline_settings
    steps = "unknown" if converted.steps is None else f"{converted.steps:,}"
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [repa-e, sit, class-conditional, image-generation, converted]",
        "---",
        f"# {converted.args.get('model', 'SiT')} converted from an original REPA-E checkpoint",
        "",
        f"- source file: `{Path(source_file).name}`",
        f"- training step: {steps}",
        f"- transformer weights: {'EMA' if converted.used_ema else 'raw (non-EMA)'}",
        f"- recipe (architecture and sampler defaults): {converted.recipe or 'none matched'}",
        f"- SiT: depth {config.num_layers}, width {config.hidden_size}, heads {config.num_attention_heads}, "
        f"patch {config.patch_size}, latent {config.in_channels} x {config.sample_size} x {config.sample_size}",
        f"- scheduler: {type(converted.scheduler).__name__}",
    ]
    if "default_guidance_scale" in settings:
        interval = settings.get("default_guidance_interval", [0.0, 1.0])
        lines.append(
            f"- recommended sampling: {settings.get('default_num_inference_steps', 250)} steps, guidance "
            f"{settings['default_guidance_scale']} in t-interval {list(interval)} (the pipeline's defaults)"
        )
    lines += [f"- note: {note}" for note in converted.notes]
    lines += [
        "",
        "```py",
        "from diffusers_repae import RepaEPipeline",
        "",
        'pipe = RepaEPipeline.from_pretrained("path/to/this/folder")',
        "image = pipe(class_labels=[207]).images[0]",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_pipeline_folder(converted: ConvertedCheckpoint, output_dir: str | Path, source_file: str) -> Path:
    """``RepaEPipeline.save_pretrained`` (safetensors) plus a model card, and the training state when present."""
    from ..pipelines import RepaEPipeline

    output_dir = Path(output_dir)
    pipe = RepaEPipeline(
        transformer=converted.transformer,
        vae=converted.vae,
        scheduler=converted.scheduler,
        **converted.pipeline_settings,
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    (output_dir / "README.md").write_text(model_card(converted, source_file), encoding="utf-8")
    if converted.ema_projector is not None:
        # Beside transformer/ as in the recipes; same weights (EMA or raw) as the transformer.
        (converted.ema_projector if converted.used_ema else converted.projector).save_pretrained(
            output_dir / "projector"
        )
    if converted.raw_transformer is not None:
        write_training_state(converted, output_dir / TRAINING_STATE_DIR)
    return output_dir


def write_training_state(converted: ConvertedCheckpoint, folder: Path) -> None:
    """The raw SiT, its latent BatchNorm, the raw projector and the discriminator, to continue training."""
    folder.mkdir(parents=True, exist_ok=True)
    converted.raw_transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    converted.projector.save_pretrained(folder / "projector", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in converted.raw_bn.items()}, str(folder / "latent_norm.safetensors"))
    if isinstance(converted.discriminator, PatchGANDiscriminator):
        converted.discriminator.save_pretrained(folder / "discriminator", safe_serialization=True)
    elif converted.discriminator:
        (folder / "discriminator").mkdir(exist_ok=True)
        tensors = {k: v.contiguous() for k, v in converted.discriminator.items()}
        save_file(tensors, str(folder / "discriminator" / "original_state_dict.safetensors"))
    state = {"steps": converted.steps, "used_ema_for_pipeline": converted.used_ema, "args": _json_safe(converted.args)}
    (folder / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")


def verification_failures(report: dict[str, float]) -> dict[str, float]:
    """The checks that failed: copied tensors and statistics must be exact; the recomputed ``pos_embed`` may
    differ from the checkpoint's numpy-computed one by float rounding only."""
    return {
        name: diff for name, diff in report.items() if not diff <= (POS_EMBED_ATOL if "pos_embed" in name else 0.0)
    }


def report_verification(report: dict[str, float]) -> bool:
    """Prints every check's max abs difference and the verdict; True when everything matched."""
    for name, diff in report.items():
        print(f"  {name}: max abs diff {diff:.3g}")
    failures = verification_failures(report)
    if failures:
        print(f"error: verification failed: {failures}", file=sys.stderr)
        return False
    print("verification passed")
    return True


def _max_diff(reloaded: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over every source tensor; ``inf`` when a key is missing or mis-shaped."""
    worst = 0.0
    for key, source in sources.items():
        if key not in reloaded or reloaded[key].numel() != source.numel():
            return float("inf")
        diff = (reloaded[key].double() - source.double().reshape(reloaded[key].shape)).abs().max().item()
        worst = max(worst, diff)
    return worst


@torch.no_grad()
def verify_folder(output_dir: str | Path, converted: ConvertedCheckpoint) -> dict[str, float]:
    """Reload the folder, compare every tensor with its source and run each model once.

    Returns ``{check: max abs difference}``; forward checks report 0 when the output is finite and shaped as
    expected, ``inf`` otherwise. A correct conversion gives 0 everywhere (fp32 copied bit for bit).
    """
    from ..pipelines import RepaEPipeline

    output_dir = Path(output_dir)
    pipe = RepaEPipeline.from_pretrained(output_dir)
    sit, vae = pipe.transformer.eval(), pipe.vae.eval()
    report = {
        "transformer weights": _max_diff(sit.state_dict(), converted.sources["transformer"]),
        "vae weights": _max_diff(vae.state_dict(), converted.sources["vae"]),
    }
    if converted.sources.get("pos_embed"):
        report["transformer pos_embed (computed vs checkpoint)"] = _max_diff(
            {"pos_embed": sit.pos_embed}, converted.sources["pos_embed"]
        )
    stats = converted.sources["latents"]
    report["latents_mean"] = (
        (torch.tensor(vae.config.latents_mean, dtype=torch.float64) - stats["latents_mean"]).abs().max().item()
    )
    report["latents_std"] = (
        (torch.tensor(vae.config.latents_std, dtype=torch.float64) - stats["latents_std"]).abs().max().item()
    )

    generator = torch.Generator().manual_seed(0)
    config = sit.config
    latents = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    velocity = sit(latents, torch.tensor([0.3, 0.9]), torch.tensor([0, config.num_classes])).sample
    report["transformer forward"] = (
        0.0 if velocity.shape == latents.shape and velocity.isfinite().all() else float("inf")
    )
    image = vae.decode(latents * torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)).sample
    report["vae decode forward"] = (
        0.0 if image.shape[1] == vae.config.out_channels and image.isfinite().all() else float("inf")
    )

    projector_dir = output_dir / "projector"
    if projector_dir.is_dir():
        projector = REPAProjector.from_pretrained(projector_dir).eval()
        key = "ema_projector" if converted.used_ema else "projector"
        report["projector weights"] = _max_diff(projector.state_dict(), converted.sources[key])
        hidden = sit(
            latents, 0.5, 0, return_hidden_states_at=projector.config.encoder_depth, align_only=True
        ).hidden_states
        outputs = projector(hidden)
        report["projector forward"] = 0.0 if all(o.isfinite().all() for o in outputs) else float("inf")
    state_dir = output_dir / TRAINING_STATE_DIR
    if state_dir.is_dir():
        raw = SiTTransformer2DModel.from_pretrained(state_dir / "transformer").eval()
        report["training_state transformer weights"] = _max_diff(
            raw.state_dict(), converted.sources["raw_transformer"]
        )
        raw_projector = REPAProjector.from_pretrained(state_dir / "projector").eval()
        report["training_state projector weights"] = _max_diff(
            raw_projector.state_dict(), converted.sources["projector"]
        )
        bn = load_file(str(state_dir / "latent_norm.safetensors"))
        report["training_state latent_norm"] = _max_diff(bn, converted.raw_bn) if converted.raw_bn else 0.0
        if (state_dir / "discriminator" / "config.json").is_file():
            disc = PatchGANDiscriminator.from_pretrained(state_dir / "discriminator").eval()
            report["training_state discriminator weights"] = _max_diff(
                disc.state_dict(), converted.sources["discriminator"]
            )
            logits = disc(image.clamp(-1, 1))
            report["discriminator forward"] = 0.0 if logits.isfinite().all() else float("inf")
    return report


@torch.no_grad()
def verify_vae_folder(
    output_dir: str | Path, sources: dict[str, torch.Tensor], stats: dict | None
) -> dict[str, float]:
    """Reload an ``AutoencoderKL`` folder, compare every tensor with its source, decode once."""
    vae = AutoencoderKL.from_pretrained(output_dir).eval()
    report = {"vae weights": _max_diff(vae.state_dict(), sources)}
    if stats is not None:
        for key in ("latents_mean", "latents_std"):
            saved = torch.tensor(getattr(vae.config, key), dtype=torch.float64)
            report[key] = (saved - torch.tensor(stats[key], dtype=torch.float64)).abs().max().item()
    size = 8
    latents = torch.randn(1, vae.config.latent_channels, size, size, generator=torch.Generator().manual_seed(0))
    image = vae.decode(latents).sample
    report["vae decode forward"] = 0.0 if image.isfinite().all() else float("inf")
    return report
