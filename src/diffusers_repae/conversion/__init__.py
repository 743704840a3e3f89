"""Conversion of original REPA-E / REPA / LightningDiT checkpoints to diffusers folders (library part)."""

from .export import report_verification, verification_failures, verify_folder, verify_vae_folder, write_pipeline_folder
from .loading import ConversionError, check_state_dict, extract_state_dict, load_checkpoint, strip_wrapper_prefixes
from .repae import ConvertedCheckpoint, convert_training_checkpoint, vae_family
from .sit import (
    convert_sit_state_dict,
    infer_sit_config,
    load_transformer,
    original_sit_state_dict,
    original_to_diffusers_key,
    split_sit_state_dict,
)
from .vae import (
    KNOWN_NON_VAE_PREFIXES,
    convert_vae_state_dict,
    diffusers_to_ldm_key,
    infer_vae_config,
    load_vae,
    split_known_extras,
    stats_from_file,
)

__all__ = [
    "KNOWN_NON_VAE_PREFIXES",
    "ConversionError",
    "ConvertedCheckpoint",
    "check_state_dict",
    "convert_sit_state_dict",
    "convert_training_checkpoint",
    "convert_vae_state_dict",
    "diffusers_to_ldm_key",
    "extract_state_dict",
    "infer_sit_config",
    "infer_vae_config",
    "load_checkpoint",
    "load_transformer",
    "load_vae",
    "original_sit_state_dict",
    "original_to_diffusers_key",
    "split_known_extras",
    "split_sit_state_dict",
    "stats_from_file",
    "strip_wrapper_prefixes",
    "vae_family",
    "report_verification",
    "verification_failures",
    "verify_folder",
    "verify_vae_folder",
    "write_pipeline_folder",
]
