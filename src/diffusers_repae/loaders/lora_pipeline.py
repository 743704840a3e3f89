"""LoRA for `RepaEPipeline` through diffusers' loader mixins, written as diffusers writes them for SD3 / Sana.

``pipe.load_lora_weights``, ``RepaEPipeline.save_lora_weights``, ``set_adapters``, ``disable_lora`` /
``enable_lora``, ``fuse_lora`` / ``unfuse_lora`` and ``unload_lora_weights`` work as for any diffusers pipeline.
The file is diffusers' ``pytorch_lora_weights.safetensors``: keys ``transformer.<module>.lora_A.weight`` ..., the
adapter's ``LoraConfig`` in the ``lora_adapter_metadata`` header.

New classes (a LoRA trained with ``train_ldm.py --new_classes``) travel in the same file. Their rows of the label
table are peft *trainable tokens* of ``class_embedding`` (key ``transformer.class_embedding.token_adapter.
trainable_tokens_delta``, row indices in the config's ``trainable_token_indices``), and the header's
``repae.base_num_classes`` / ``repae.num_classes`` / ``repae.id2label`` say how the table grows and what the new
classes are called. ``load_lora_weights`` grows the table (old rows kept, the null row moved to the end), loads the
adapter and adopts the names; ``unload_lora_weights`` shrinks it back unless the rows were fused.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA, TRANSFORMER_NAME
from torch import nn

CLASS_TABLE = "class_embedding"  # the SiT's label table: rows 0..num_classes-1 real classes, the last row null
CLASS_ROWS_KEY = f"{CLASS_TABLE}.token_adapter.trainable_tokens_delta"  # peft's key of trainable-token rows
CLASSES_PREFIX = "repae"  # header prefix of the class information (beside diffusers' "transformer.")
# `lora_state_dict`'s keyword arguments that say where the file is (diffusers' names)
FETCH_KWARGS = (
    "weight_name", "use_safetensors", "local_files_only", "cache_dir", "force_download", "proxies", "token",
    "revision", "subfolder",
)  # fmt: skip


def grow_class_table(sit: nn.Module, num_new_classes: int) -> int:
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


def shrink_class_table(sit: nn.Module, num_classes: int) -> None:
    """Undo `grow_class_table`: keep the first ``num_classes`` rows and the null row."""
    table = sit.class_embedding.weight.data
    kept = torch.cat([table[:num_classes], table[-1:]], dim=0)
    sit.class_embedding = nn.Embedding.from_pretrained(kept, freeze=not sit.class_embedding.weight.requires_grad)
    sit.register_to_config(num_classes=num_classes)


def transformer_lora_state(
    transformer: nn.Module, base_num_classes: int | None = None, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict]:
    """``(transformer_lora_layers, transformer_lora_adapter_metadata)`` for `RepaEPipeline.save_lora_weights`.

    A label table grown for training (``base_num_classes`` < ``num_classes``, new rows trained in place) is saved as
    trainable tokens: the new rows under `CLASS_ROWS_KEY` and their indices in ``trainable_token_indices``.
    """
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    metadata = transformer.peft_config[adapter_name].to_dict()
    num_classes = transformer.config.num_classes
    if base_num_classes is not None and base_num_classes < num_classes:
        indices = list(range(base_num_classes, num_classes))
        layers[CLASS_ROWS_KEY] = transformer.class_embedding.weight.detach()[indices].clone()
        metadata["trainable_token_indices"] = {CLASS_TABLE: indices}
    return layers, metadata


def _class_rows(transformer: nn.Module):
    """peft's token adapter on the label table, when a loaded LoRA brought class rows; else None."""
    return getattr(transformer.class_embedding, "token_adapter", None)


class RepaELoraLoaderMixin(LoraBaseMixin):
    r"""
    Load LoRA layers (and the rows of new classes) into the [`SiTTransformer2DModel`] of [`RepaEPipeline`].
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = TRANSFORMER_NAME

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor], **kwargs):
        r"""The LoRA state dict (and with ``return_lora_metadata=True`` its header metadata) of a folder, Hub repo,
        file or dict; see [`~loaders.StableDiffusionLoraLoaderMixin.lora_state_dict`] for the keyword arguments."""
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=kwargs.pop("weight_name", None),
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=False,  # safetensors only: loading a LoRA never runs code
        )
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        """Load a LoRA into ``self.transformer``; one that adds classes also grows the label table and sets
        ``id2label``. See [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_weights`] for the arguments."""
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", _LOW_CPU_MEM_USAGE_DEFAULT_LORA)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        unknown = [key for key in state_dict if "lora" not in key and "trainable_tokens" not in key]
        if unknown:
            raise ValueError(f"Invalid LoRA checkpoint: keys {unknown[:3]} are neither LoRA weights nor class rows.")
        classes = {
            key.removeprefix(f"{CLASSES_PREFIX}."): value
            for key, value in (metadata or {}).items()
            if key.startswith(f"{CLASSES_PREFIX}.")
        }
        if classes:
            self._grow_for_lora_classes(classes)
        # diffusers reads the key format off the first key: LoRA weights first, the class rows last.
        state_dict = dict(sorted(state_dict.items(), key=lambda item: "trainable_tokens" in item[0]))
        self.load_lora_into_transformer(
            state_dict,
            transformer=self.transformer,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def load_lora_into_transformer(
        cls, state_dict, transformer, adapter_name=None, _pipeline=None, low_cpu_mem_usage=False, hotswap=False,
        metadata=None,
    ):  # fmt: skip
        """Load the ``transformer.`` part of ``state_dict`` into ``transformer`` through its `PeftAdapterMixin`."""
        transformer.load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        id2label: dict[int, str] | None = None,
        base_num_classes: int | None = None,
    ):
        r"""
        Save the transformer's LoRA layers in diffusers' layout (``transformer.`` keys, config in the header).

        Args:
            transformer_lora_layers: ``get_peft_model_state_dict(transformer)``, or the first item of
                `transformer_lora_state` (which adds the rows of new classes).
            transformer_lora_adapter_metadata: The adapter's ``LoraConfig`` as a dict (second item of
                `transformer_lora_state`).
            id2label (`dict[int, str]`, *optional*): With new classes: the names of every class after loading.
            base_num_classes (`int`, *optional*): With new classes: the class count of the model the LoRA is for.

        See [`~loaders.StableDiffusionLoraLoaderMixin.save_lora_weights`] for the other arguments.
        """
        if not transformer_lora_layers:
            raise ValueError("You must pass `transformer_lora_layers`.")
        lora_metadata = {cls.transformer_name: transformer_lora_adapter_metadata}
        if base_num_classes is not None:
            if id2label is None or transformer_lora_adapter_metadata is None:
                raise ValueError("base_num_classes needs id2label and transformer_lora_adapter_metadata.")
            lora_metadata[CLASSES_PREFIX] = {
                "base_num_classes": int(base_num_classes),
                "num_classes": len(id2label),
                "id2label": {str(k): v for k, v in id2label.items()},
            }
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata=lora_metadata,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] = ["transformer"],  # noqa: B006 (diffusers' signature)
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        """Fuse the LoRA layers (and class rows: peft's token layer is a tuner layer too) into the weights.
        See [`~loaders.StableDiffusionLoraLoaderMixin.fuse_lora`]."""
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] = ["transformer"], **kwargs):  # noqa: B006
        """Undo `fuse_lora`. See [`~loaders.StableDiffusionLoraLoaderMixin.unfuse_lora`]."""
        super().unfuse_lora(components=components, **kwargs)

    def unload_lora_weights(self):
        """Remove every adapter. Fused class rows stay in the label table (with their names); otherwise the table
        and ``id2label`` return to the base model's."""
        rows = _class_rows(self.transformer)
        fused = rows is not None and rows.merged
        super().unload_lora_weights()
        if rows is not None:
            self.transformer.class_embedding = rows.base_layer  # the table itself, rows merged when fused
        base = getattr(self, "_lora_base_classes", None)
        if base is not None and not fused:
            shrink_class_table(self.transformer, base[0])
            self._adopt_id2label(base[1], stored=base[2])
        self._lora_base_classes = None

    def _grow_for_lora_classes(self, classes: dict) -> None:
        """Grow the label table to the LoRA's class count (once) and adopt its class names."""
        base, total = int(classes["base_num_classes"]), int(classes["num_classes"])
        current = self.transformer.config.num_classes
        grown_before = getattr(self, "_lora_base_classes", None)
        if current == base:
            self._lora_base_classes = (base, dict(self.id2label), self.config.id2label)
            grow_class_table(self.transformer, total - base)
        elif not (current == total and grown_before is not None and grown_before[0] == base):
            raise ValueError(
                f"this LoRA adds classes to a SiT with {base} classes, but the pipeline's has {current}; load it into "
                "the pipeline it was trained from (after unload_lora_weights() if another LoRA added classes)."
            )
        names = {int(k): v for k, v in classes["id2label"].items()}
        self._adopt_id2label(names, stored={str(k): v for k, v in names.items()})

    def _adopt_id2label(self, id2label: dict[int, str], stored: dict[str, str] | None) -> None:
        """Class names (for labels by name) and the config's ``id2label`` (None: the ImageNet names by default)."""
        self.id2label = dict(id2label)
        self.labels = self._synonym_index(self.id2label)
        self.register_to_config(id2label=stored)
