from .lora_pipeline import RepaELoraLoaderMixin, grow_class_table, shrink_class_table, transformer_lora_state

__all__ = ["RepaELoraLoaderMixin", "grow_class_table", "shrink_class_table", "transformer_lora_state"]
