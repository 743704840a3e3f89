"""Model cards of training outputs through diffusers' model-card utilities, as the diffusers examples write them.

``load_or_create_model_card`` + ``populate_model_card`` give the Hub metadata block (``library_name``, ``license``,
``base_model``, ``datasets``, ``tags``); the body is the script's own description. The training data decides part
of the metadata: a Hub dataset is listed under ``datasets``, and the embedded OpenMoji emoji carry their licence
(CC BY-SA 4.0, share-alike: a model trained on them is shared under it) into ``license``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, load_or_create_model_card, populate_model_card
from huggingface_hub import ModelCard, ModelCardData

# Hub licence identifiers (https://huggingface.co/docs/hub/repositories-licenses).
OPENMOJI_HUB_LICENSE = "cc-by-sa-4.0"
BASE_TAGS = ("diffusers", "diffusers-training", "repa-e")
PIPELINE_TAGS = ("sit", "class-conditional", "image-generation")  # a RepaEPipeline's card
VAE_TAGS = ("autoencoder-kl", "vae", "latent-diffusion")  # an AutoencoderKL's card


def data_metadata(source: str) -> dict:
    """``license`` and ``datasets`` implied by a `TrainingData.source` (``hub:NAME``, ``openmoji:...``, ...)."""
    kind, _, name = source.partition(":")
    if kind == "hub":
        return {"license": None, "datasets": [name]}
    if kind == "openmoji":
        return {"license": OPENMOJI_HUB_LICENSE, "datasets": None}
    return {"license": None, "datasets": None}  # a local image folder: nothing known about it


def hub_model_id(name_or_path: str | Path | None) -> str | None:
    """``name_or_path`` when it names a Hub repository (``owner/name``), None for a local folder or nothing.

    The Hub's ``base_model`` field only takes repository ids; a local starting point is named in the text instead.
    """
    if name_or_path is None or Path(name_or_path).exists():
        return None
    name = str(name_or_path)
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def save_model_card(
    output_dir: str | Path,
    description: str,
    data_source: str,
    base_model: str | Path | None = None,
    tags: Sequence[str] = (),
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``output_dir/README.md``: diffusers' model card with the run's metadata and ``description`` as body.

    Args:
        description: The card's markdown body (what was trained, how to load it, the data's attribution).
        data_source: `TrainingData.source`; gives ``datasets`` and, for OpenMoji, the licence.
        base_model: The pretrained model the run started from (kept in the metadata when it is a Hub id).
        tags: Tags after the package's own (`PIPELINE_TAGS` or `VAE_TAGS`, plus e.g. ``lora``).
        license: Overrides the licence implied by the data (e.g. the base model's).
        repo_id: The Hub repository the card is for (``--hub_model_id``); an existing card there keeps its other
            metadata, as in diffusers' examples. Default: the output folder's name.
    """
    output_dir = Path(output_dir)
    implied = data_metadata(data_source)
    license = license or implied["license"]
    base_model = hub_model_id(base_model)
    if repo_id is None:  # nothing on the Hub to start from: no lookup (without a network it would wait on it)
        card = ModelCard.from_template(
            card_data=ModelCardData(license=license, library_name="diffusers", inference=False, base_model=base_model),
            template_path=MODEL_CARD_TEMPLATE_PATH,
            model_description=description,
        )
    else:  # as the diffusers examples do: the Hub repo's card if one exists, else the training template
        card = load_or_create_model_card(
            repo_id_or_path=repo_id,
            from_training=True,
            license=license,
            base_model=base_model,
            model_description=description,
            inference=False,
        )
    card.text = "\n" + description.strip() + "\n"  # the script's own body instead of the template's TODO sections
    card.data.license = license
    card.data.base_model = base_model
    card.data.datasets = implied["datasets"]
    card.data.tags = None
    card = populate_model_card(card, tags=list(dict.fromkeys([*BASE_TAGS, *tags])))
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "README.md"
    card.save(path)
    return path
