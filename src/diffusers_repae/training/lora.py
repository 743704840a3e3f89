"""LoRA fine-tuning of a pretrained SiT on new data, optionally with new classes.

Adapters go through peft via diffusers' ``PeftAdapterMixin`` (``add_adapter`` / ``save_lora_adapter`` /
``load_lora_adapter``), so they are ordinary diffusers LoRA files. New classes need rows in the label table,
which is not a LoRA target: the table grows (old real rows and the null row are kept, frozen by a gradient
mask) and is saved next to the adapter as ``class_embedding.safetensors`` with the new ``id2label``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.transformer_sit import SiTTransformer2DModel

# Every Linear inside the transformer blocks: attention, MLP and the adaLN modulation.
DEFAULT_LORA_TARGETS = ("qkv", "attn.proj", "fc1", "fc2", "adaln_modulation")
CLASS_TABLE_FILE = "class_embedding.safetensors"
LABELS_FILE = "id2label.json"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name


def grow_class_table(sit: SiTTransformer2DModel, num_new_classes: int) -> int:
    """Append ``num_new_classes`` rows before the null row; returns the index of the first new class.

    Old real rows keep their indices and values; the null row moves to the end (index ``num_classes``) with
    its value. New rows start like the original initialisation, N(0, 0.02).
    """
    if num_new_classes < 0:
        raise ValueError(f"num_new_classes must be >= 0, got {num_new_classes}.")
    old = sit.class_embedding.weight.data
    num_classes = sit.config.num_classes
    if num_new_classes == 0:
        return num_classes
    new_rows = torch.randn(num_new_classes, old.shape[1], dtype=old.dtype, device=old.device) * 0.02
    table = torch.cat([old[:num_classes], new_rows, old[num_classes:]], dim=0)
    sit.class_embedding = nn.Embedding.from_pretrained(table, freeze=False)
    sit.register_to_config(num_classes=num_classes + num_new_classes)
    return num_classes


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
    sit.requires_grad_(False)
    first_new = grow_class_table(sit, num_new_classes)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(target_modules)
    )
    sit.add_adapter(config)
    if num_new_classes:
        train_only_new_class_rows(sit, first_new)


def save_sit_lora(
    sit: SiTTransformer2DModel, save_directory: str | Path, id2label: dict[int, str] | None = None
) -> None:
    """The adapter in the diffusers/peft layout, plus the label table and labels when the classes changed."""
    save_directory = Path(save_directory)
    sit.save_lora_adapter(save_directory, weight_name=LORA_WEIGHTS_FILE)
    save_file({"weight": sit.class_embedding.weight.detach().contiguous().cpu()}, save_directory / CLASS_TABLE_FILE)
    if id2label is not None:
        (save_directory / LABELS_FILE).write_text(json.dumps({str(k): v for k, v in id2label.items()}, indent=2))


def load_sit_lora(sit: SiTTransformer2DModel, directory: str | Path) -> dict[int, str] | None:
    """Load what `save_sit_lora` wrote into a (pipeline's) SiT; returns the saved ``id2label`` if any."""
    directory = Path(directory)
    table_file = directory / CLASS_TABLE_FILE
    if table_file.is_file():
        table = load_file(table_file)["weight"]
        grow_class_table(sit, table.shape[0] - sit.class_embedding.num_embeddings)
        sit.class_embedding.weight.data.copy_(table.to(sit.class_embedding.weight))
    sit.load_lora_adapter(directory, prefix=None, weight_name=LORA_WEIGHTS_FILE)
    labels_file = directory / LABELS_FILE
    if labels_file.is_file():
        return {int(k): v for k, v in json.loads(labels_file.read_text()).items()}
    return None


def load_lora_into_pipeline(pipeline, directory: str | Path) -> None:
    """`load_sit_lora` into ``pipeline.transformer`` and adopt the saved class names (so labels by name work)."""
    id2label = load_sit_lora(pipeline.transformer, directory)
    if id2label is not None:
        pipeline.id2label = id2label
        pipeline.labels = pipeline._synonym_index(id2label)
        pipeline.register_to_config(id2label={str(k): v for k, v in id2label.items()})
