from pathlib import Path

from .pipeline_repae import IMAGENET_CLASSES_FILE, RepaEPipeline, load_imagenet_id2label

# For `DiffusionPipeline.from_pretrained(folder, custom_pipeline=DIFFUSERS_ENTRY_POINT, trust_remote_code=True)`.
DIFFUSERS_ENTRY_POINT = str(Path(__file__).with_name("diffusers_entry.py"))

__all__ = ["DIFFUSERS_ENTRY_POINT", "IMAGENET_CLASSES_FILE", "RepaEPipeline", "load_imagenet_id2label"]
