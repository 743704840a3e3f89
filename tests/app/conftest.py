"""Fixtures of the app tests: app.py imported from the repository root, and a tiny saved pipeline with a model card."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from tiny_app_pipeline import tiny_pipeline

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no usage reports from the servers the tests start

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def app():
    """app.py as a module (it lives at the repository root, outside any package)."""
    pytest.importorskip("gradio", reason="the [app] extra (gradio) is not installed")
    spec = importlib.util.spec_from_file_location("repae_app", REPO / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pipeline_folder(tmp_path_factory) -> Path:
    """A tiny pipeline saved with save_pretrained, with the model card our training scripts write."""
    from diffusers_repae.training.model_card import PIPELINE_TAGS, save_model_card

    folder = tmp_path_factory.mktemp("app") / "tiny-pipeline"
    tiny_pipeline().save_pretrained(folder)
    description = (
        "# REPA-E end-to-end training output (tiny-pipeline)\n\nTrained with `training/train_repae.py` from recipe "
        "`emoji-cpu` for 3 steps (global batch 2, 32 px) on `openmoji:group` (4 classes)."
    )
    save_model_card(folder, description, "openmoji:group", tags=PIPELINE_TAGS)
    return folder


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
