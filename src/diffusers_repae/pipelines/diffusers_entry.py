"""Entry point for plain diffusers: ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=<this file>)``.

diffusers resolves a model_index.json ``_class_name`` only inside the ``diffusers`` package, so a bare
``DiffusionPipeline.from_pretrained(folder)`` cannot find ``RepaEPipeline``. Its custom-pipeline loader can: it
imports this file (with ``trust_remote_code=True``, since it is code outside diffusers) and picks the pipeline
class defined or imported here. ``diffusers_repae.DIFFUSERS_ENTRY_POINT`` is this file's path.
"""

from diffusers_repae.pipelines.pipeline_repae import RepaEPipeline

__all__ = ["RepaEPipeline"]
