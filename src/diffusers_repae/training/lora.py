"""LoRA fine-tuning of a pretrained SiT on new data, optionally with new classes.

Adapters go through peft via diffusers' ``PeftAdapterMixin`` (``add_adapter``). New classes need rows in the label
table, which is not a LoRA target: for training the table grows (old real rows and the null row are kept, frozen by
a gradient mask). `save_sit_lora` writes diffusers' LoRA file with `RepaEPipeline.save_lora_weights`, the new rows
in the same file as peft trainable tokens; ``pipe.load_lora_weights(folder)`` loads it (see
``diffusers_repae.loaders``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import logging
from peft import LoraConfig

from ..loaders.lora_pipeline import grow_class_table, transformer_lora_state
from ..models.transformer_sit import SiTTransformer2DModel, standard_attention_names

logger = logging.get_logger(__name__)

# Every Linear inside the transformer blocks: attention (diffusers' names), MLP and the adaLN modulation.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "fc1", "fc2", "adaln_modulation")
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name


def train_only_new_class_rows(sit: SiTTransformer2DModel, first_new_class: int) -> None:
    """Mask the label table's gradient so only rows ``first_new_class .. num_classes - 1`` learn.

    With AdamW and weight decay 0 a row whose gradient is always zero never moves, so old classes and the
    null class stay bit-identical.
    """
    mask = torch.zeros(sit.class_embedding.num_embeddings, 1)
    mask[first_new_class : sit.config.num_classes] = 1.0
    sit.class_embedding.weight.requires_grad_(True)
    sit.class_embedding.weight.register_hook(lambda grad: grad * mask.to(grad))


def add_sit_lora(
    sit: SiTTransformer2DModel,
    rank: int = 16,
    alpha: float | None = None,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
    num_new_classes: int = 0,
) -> None:
    """Freeze the SiT, attach a LoRA adapter, and (with new classes) make only the new label rows trainable."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}.")
    targets = list(dict.fromkeys(new for name in target_modules for new in standard_attention_names(name)))
    if targets != list(target_modules):
        logger.warning(
            f"LoRA targets {list(target_modules)}: SiT attention now uses diffusers' names (qkv -> to_q, to_k, to_v; "
            f"proj -> to_out.0); training {targets}."
        )
    sit.requires_grad_(False)
    first_new = grow_class_table(sit, num_new_classes)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    sit.add_adapter(config)
    if num_new_classes:
        train_only_new_class_rows(sit, first_new)


def save_sit_lora(
    sit: SiTTransformer2DModel,
    save_directory: str | Path,
    id2label: dict[int, str] | None = None,
    base_num_classes: int | None = None,
) -> Path:
    """The adapter as diffusers' LoRA file; with ``base_num_classes`` (the pretrained class count) the rows of the
    classes added since, with every class's name, in the same file. Load it with ``pipe.load_lora_weights``."""
    from ..pipelines.pipeline_repae import RepaEPipeline

    layers, metadata = transformer_lora_state(sit, base_num_classes=base_num_classes)
    new_classes = base_num_classes is not None and base_num_classes < sit.config.num_classes
    RepaEPipeline.save_lora_weights(
        save_directory,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=metadata,
        weight_name=LORA_WEIGHTS_FILE,
        id2label=id2label if new_classes else None,
        base_num_classes=base_num_classes if new_classes else None,
    )
    return Path(save_directory) / LORA_WEIGHTS_FILE
