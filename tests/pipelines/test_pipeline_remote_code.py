"""Saved folders load with plain diffusers (code beside the weights) and with RepaEPipeline; Hub uploads, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders
from diffusers.utils.dynamic_modules_utils import get_relative_imports

from diffusers_repae import (
    FlowMatchEulerMaruyamaScheduler,
    FlowMatchHeunScheduler,
    RepaEPipeline,
    SiTTransformer2DModel,
)

ROOT = Path(__file__).resolve().parents[2]
CODE = "diffusers_repae.py"


def tiny_pipeline(scheduler=None, num_classes: int = 4) -> RepaEPipeline:
    torch.manual_seed(0)
    sit = SiTTransformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
        num_classes=num_classes,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[0.9, 1.1, 1.3, 0.7],
    )  # fmt: skip
    pipe = RepaEPipeline(
        sit.eval(), vae.eval(), scheduler or FlowMatchEulerMaruyamaScheduler(), default_num_inference_steps=3
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kwargs) -> torch.Tensor:
    call = dict(
        num_inference_steps=3, output_type="latent", guidance_scale=1.5, generator=torch.Generator().manual_seed(0)
    )
    return pipe([0, 1], **(call | kwargs)).images


def load_without_the_package(folder: Path, tmp_path: Path) -> torch.Tensor:
    """A fresh interpreter where `import diffusers_repae` fails loads the folder with plain diffusers and samples."""
    script = tmp_path / "plain_diffusers.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import importlib.abc, sys
            class NoDiffusersRepaE(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] == "diffusers_repae":
                        raise ModuleNotFoundError(name)
            sys.meta_path.insert(0, NoDiffusersRepaE())
            import torch
            from diffusers import DiffusionPipeline
            pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            module = sys.modules[type(pipe).__module__]
            assert type(pipe.scheduler) is getattr(module, type(pipe.scheduler).__name__, type(pipe.scheduler))
            assert type(pipe.transformer) is module.SiTTransformer2DModel
            out = pipe([0, 1], num_inference_steps=3, output_type="latent", guidance_scale=1.5,
                       generator=torch.Generator().manual_seed(0)).images
            assert not [m for m in sys.modules if m.split(".")[0] == "diffusers_repae"]
            torch.save(out, {str(tmp_path / "plain.pt")!r})
            print(type(pipe).__module__)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("diffusers_modules.")
    return torch.load(tmp_path / "plain.pt")


# ------------------------------------------------------------------------------------------ layout
def test_saved_folder_has_stable_names_and_one_code_file_per_custom_entry(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_repae", "RepaEPipeline"]
    assert index["transformer"] == ["diffusers_repae", "SiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers_repae", "FlowMatchEulerMaruyamaScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    code = (tmp_path / CODE).read_text()
    assert (tmp_path / "transformer" / CODE).read_text() == code == (tmp_path / "scheduler" / CODE).read_text()
    assert not (tmp_path / "vae" / CODE).exists()
    # The Hub rules diffusers applies: every custom library has its file in the component folder, and a component
    # file is fetched alone, so it may not import sibling files.
    files = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    custom, _ = _get_custom_components_and_folders("user/repo", index, files)
    assert custom == {"transformer": "diffusers_repae", "scheduler": "diffusers_repae"}
    assert get_relative_imports(tmp_path / CODE) == []


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("scheduler", [FlowMatchEulerMaruyamaScheduler, FlowMatchHeunScheduler])
def test_plain_diffusers_loads_the_folder_without_the_package(tmp_path, scheduler):
    pipe = tiny_pipeline(scheduler())
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path / "folder")
    torch.testing.assert_close(load_without_the_package(tmp_path / "folder", tmp_path), expected, rtol=0, atol=0)


def test_a_diffusers_scheduler_gets_no_code_file(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)  # an earlier save into the same folder, with our scheduler
    pipe = tiny_pipeline(FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert not (tmp_path / "scheduler" / CODE).exists()
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(generic.scheduler) is FlowMatchEulerDiscreteScheduler
    torch.testing.assert_close(sample(generic), sample(pipe), rtol=0, atol=0)


def test_repae_loader_runs_nothing_from_the_folder(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    for path in tmp_path.rglob(CODE):
        path.write_text("raise RuntimeError('code from the folder was executed')\n")
    loaded = RepaEPipeline.from_pretrained(tmp_path)
    assert type(loaded) is RepaEPipeline and type(loaded.transformer) is SiTTransformer2DModel
    assert type(loaded.scheduler) is FlowMatchEulerMaruyamaScheduler
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample(loaded), sample(pipe), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="was executed"):  # while plain diffusers does run it
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)


def test_a_reloaded_remote_pipeline_saves_the_same_folder(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "a")
    generic = DiffusionPipeline.from_pretrained(tmp_path / "a", trust_remote_code=True)
    generic.save_pretrained(tmp_path / "b")
    for name in (CODE, "model_index.json", f"transformer/{CODE}", f"scheduler/{CODE}"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name


def test_imagenet_names_are_written_into_the_folder(tmp_path):
    pipe = tiny_pipeline(num_classes=1000)
    assert pipe.config.id2label is None and len(pipe.id2label) == 1000  # in memory: the package's default
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["id2label"] == {str(k): v for k, v in pipe.id2label.items()}
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert generic.get_label_ids(["golden retriever", "tabby cat"]) == [207, 281]


def test_code_that_cannot_be_joined_warns_and_the_weights_still_load(tmp_path, monkeypatch):
    from diffusers_repae.pipelines import hub

    def clash(modules):
        raise hub.BundleError("the name 'x' means different things in two modules")

    monkeypatch.setattr(hub, "bundle_source", clash)
    pipe = tiny_pipeline()
    with pytest.warns(UserWarning, match="not written beside the weights.*means different things"):
        pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob(CODE))
    torch.testing.assert_close(sample(RepaEPipeline.from_pretrained(tmp_path)), sample(pipe), rtol=0, atol=0)


def test_the_joined_file_keeps_each_module_and_refuses_clashes():
    from diffusers_repae.pipelines import hub

    code = hub.bundle_source(["diffusers_repae.pipelines.pipeline_repae"])
    for module in ("models.transformer_sit", "schedulers.scheduling_flow_match_euler_maruyama", "pipelines.hub"):
        assert f" diffusers_repae.{module}\n" in code
    assert code.count("\nclass RepaEPipeline(") == 1 and code.count("\nclass SiTTransformer2DModel(") == 1
    bundle = hub._Bundle()
    bundle.bind("logger", "from diffusers.utils import logging", "a")
    assert bundle.bind("logger", "from diffusers.utils import logging", "b") is False  # the same: dropped
    with pytest.raises(hub.BundleError, match="'logger' means different things"):
        bundle.bind("logger", "import logging", "c")


# ------------------------------------------------------------------------------------------ the Hub, offline
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub's create_repo / upload_folder replaced by copies into a local folder per repo id."""
    hub = tmp_path / "hub"
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(repo_id, folder_path, ignore_patterns=None, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, hub / repo_id, ignore=shutil.ignore_patterns(*(ignore_patterns or [])))

    for module in (huggingface_hub, sys.modules["diffusers.utils.hub_utils"]):
        monkeypatch.setattr(module, "create_repo", create_repo)
        monkeypatch.setattr(module, "upload_folder", upload_folder)
    monkeypatch.setattr(
        sys.modules["diffusers.utils.hub_utils"],
        "load_or_create_model_card",
        lambda *args, **kwargs: huggingface_hub.ModelCard("---\nlibrary_name: diffusers\n---\n"),
    )
    return SimpleNamespace(root=hub, calls=calls)


def test_save_pretrained_push_to_hub_uploads_a_loadable_folder(tmp_path, fake_hub):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/tiny-repae", token="t0k")
    uploaded = fake_hub.root / "me/tiny-repae"
    assert [c[:2] for c in fake_hub.calls] == [("create_repo", "me/tiny-repae"), ("upload_folder", "me/tiny-repae")]
    assert fake_hub.calls[0][2]["token"] == "t0k"
    local = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*"))
    assert sorted(p.relative_to(uploaded) for p in uploaded.rglob("*")) == local
    assert "library_name: diffusers" in (uploaded / "README.md").read_text()
    torch.testing.assert_close(sample(RepaEPipeline.from_pretrained(uploaded)), sample(pipe), rtol=0, atol=0)
    generic = DiffusionPipeline.from_pretrained(uploaded, trust_remote_code=True)  # without the package: above
    torch.testing.assert_close(sample(generic), sample(pipe), rtol=0, atol=0)


def test_pipe_push_to_hub_carries_the_code(fake_hub):
    pipe = tiny_pipeline()
    pipe.push_to_hub("me/pushed")  # diffusers' PushToHubMixin: saves through our save_pretrained
    uploaded = fake_hub.root / "me/pushed"
    assert (uploaded / CODE).is_file() and (uploaded / "transformer" / CODE).is_file()
    generic = DiffusionPipeline.from_pretrained(uploaded, trust_remote_code=True)
    torch.testing.assert_close(sample(generic), sample(pipe), rtol=0, atol=0)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str]):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return load_script(name).main(argv)


def test_train_repae_push_to_hub(tmp_path, fake_hub):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"c{i % 2}/{i}.png"
        )
    recipe = tmp_path / "recipe"
    shutil.copytree(ROOT / "pipelines" / "tiny-cpu", recipe, ignore=shutil.ignore_patterns("__pycache__"))
    for component, changes in {
        "transformer": dict(hidden_size=32, num_layers=2, num_attention_heads=2, sample_size=8),
        "vae": dict(block_out_channels=[8, 16, 16], norm_num_groups=8, sample_size=32),
        "projector": dict(hidden_size=32, projector_dim=32, encoder_depth=1),
    }.items():
        path = recipe / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    output_dir = tmp_path / "run"
    run_script(
        "train_repae",
        ["--recipe", str(recipe), "--train_data_dir", str(tmp_path / "images"), "--resolution", "32",
         "--enc_type", "efficientnet-lite0", "--no_lpips", "--mixed_precision", "no", "--train_batch_size", "4",
         "--max_train_steps", "1", "--checkpointing_steps", "1", "--validation_steps", "0", "--disc_ndf", "8",
         "--output_dir", str(output_dir), "--dataloader_num_workers", "0", "--report_to", "none",
         "--push_to_hub", "--hub_model_id", "me/repae"],
    )  # fmt: skip
    uploaded = fake_hub.root / "me/repae"
    assert (output_dir / "checkpoint-1").is_dir() and not (uploaded / "checkpoint-1").exists()
    assert (uploaded / "README.md").is_file() and (uploaded / "discriminator").is_dir()
    pipe = RepaEPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    generic = DiffusionPipeline.from_pretrained(uploaded, trust_remote_code=True)
    torch.testing.assert_close(sample(generic), sample(pipe), rtol=0, atol=0)


def test_train_ldm_push_to_hub(tmp_path, fake_hub):
    import numpy as np
    from PIL import Image

    from diffusers_repae import build_component

    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"c{i % 2}/{i}.png"
        )
    build_component("tiny-cpu", "vae", latents_mean=[0.1] * 4, latents_std=[0.8] * 4).save_pretrained(tmp_path / "vae")
    output_dir = tmp_path / "run"
    run_script(
        "train_ldm",
        ["--recipe", "tiny-cpu", "--vae", str(tmp_path / "vae"), "--train_data_dir", str(tmp_path / "images"),
         "--resolution", "64", "--enc_type", "efficientnet-lite0", "--train_batch_size", "4", "--max_train_steps", "1",
         "--mixed_precision", "no", "--report_to", "none", "--dataloader_num_workers", "0", "--validation_steps", "0",
         "--checkpointing_steps", "1", "--output_dir", str(output_dir), "--push_to_hub", "--hub_model_id", "me/ldm",
         "--hub_token", "t0k"]
    )  # fmt: skip
    uploaded = fake_hub.root / "me/ldm"
    assert (output_dir / "checkpoint-1").is_dir() and not (uploaded / "checkpoint-1").exists()
    assert (uploaded / "README.md").is_file() and (uploaded / CODE).is_file()
    assert fake_hub.calls[-1][2]["token"] == "t0k"
    pipe = RepaEPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    generic = DiffusionPipeline.from_pretrained(uploaded, trust_remote_code=True)
    torch.testing.assert_close(sample(generic), sample(pipe), rtol=0, atol=0)
