"""Resuming runs no code from a checkpoint: a pickle payload planted in each file in turn is refused, clearly."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from diffusers_repae.cli import UserError
from diffusers_repae.training.checkpointing import (
    CheckpointError,
    LossHistory,
    ProcessGenerators,
    RunSettings,
    load_checkpoint,
    read_project_state,
    register_checkpoint_state,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from diffusers_repae.training.ema import ModelEMA


class Payload:
    """Unpickling this creates ``marker``: if the file exists afterwards, code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _setup(resolution=32):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, shuffle=True)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    ema = ModelEMA(model, decay=0.5)
    generators, history = ProcessGenerators(accelerator, seed=0), LossHistory()
    settings = RunSettings(recipe="tiny", resolution=resolution, num_classes=3)
    register_checkpoint_state(accelerator, run=settings, ema=ema, generators=generators, history=history)
    return accelerator, model, ema, generators, history


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One checkpoint holding every kind of file: weights, optimizer, scheduler, sampler, RNG, project state."""
    root = tmp_path_factory.mktemp("ckpt")
    accelerator, model, ema, generators, history = _setup()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.step(model)
    torch.randn(3, generator=generators.generator)
    history.append(1, {"sit/loss": 0.5, "vae/loss": float("nan")})
    return save_checkpoint(accelerator, root, 1)


def test_round_trip_restores_every_registered_state(checkpoint):
    saved_model = json.loads((checkpoint / "project_state.json").read_text())
    assert set(saved_model) == {"run", "ema", "generators", "history"}
    assert [p.name for p in checkpoint.glob("*.pkl")] == ["random_states_0.pkl"]  # accelerate's, weights-only
    accelerator, model, ema, generators, history = _setup()
    expected_ema = read_project_state(checkpoint)["ema"]["model"]
    load_checkpoint(accelerator, checkpoint)
    for key, value in ema.model.state_dict().items():
        assert torch.equal(value, expected_ema[key]), key
    reference = torch.Generator().manual_seed(0)
    torch.randn(3, generator=reference)  # the stream advanced by one draw before the save
    assert torch.equal(torch.randn(4, generator=generators.generator), torch.randn(4, generator=reference))
    assert history.records[0]["step"] == 1 and history.records[0]["sit/loss"] == 0.5
    assert torch.equal(model.weight, load_file(checkpoint / "model.safetensors")["weight"])


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_checkpoint_holds_the_expected_files(checkpoint):
    names = _files(checkpoint)
    for expected in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        assert expected in names
    assert "project_state.json" in names and "project_state.safetensors" in names
    assert not [n for n in names if n.startswith("custom_checkpoint")]


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "sampler.bin",
        "project_state.json",
        "project_state.safetensors",
    ],
)
@pytest.mark.parametrize("form", ["torch.save", "raw pickle"])
def test_planted_payload_is_refused_and_never_runs(checkpoint, tmp_path, name, form):
    planted = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, planted)
    # sampler.bin is written by accelerate for sharded iterable datasets only: planted next to the others
    if name != "sampler.bin" and not (planted / name).exists():
        pytest.fail(f"{name} missing from the checkpoint: the test would not cover it")
    marker = tmp_path / "code-ran"
    if form == "torch.save":
        torch.save({"state": Payload(marker)}, planted / name)
    else:
        (planted / name).write_bytes(pickle.dumps(Payload(marker)))
    accelerator = _setup()[0]
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as caught:
        load_checkpoint(accelerator, planted)
    assert not marker.exists(), "code from the checkpoint ran"
    assert isinstance(caught.value, UserError)  # the CLIs print it as one 'error:' line
    assert "refusing to resume" in str(caught.value)


def test_payload_in_a_legacy_custom_state_file_is_refused(checkpoint, tmp_path):
    planted = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, planted)
    marker = tmp_path / "code-ran"
    torch.save(Payload(marker), planted / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl.*not loaded"):
        load_checkpoint(_setup()[0], planted)
    assert not marker.exists()


def test_other_settings_are_refused_in_one_sentence(checkpoint):
    accelerator = _setup(resolution=64)[0]
    with pytest.raises(CheckpointError, match=r"resolution 32 in the checkpoint, 64 now"):
        load_checkpoint(accelerator, checkpoint)


def test_damaged_weights_give_a_clear_error(checkpoint, tmp_path):
    planted = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, planted)
    data = (planted / "model.safetensors").read_bytes()
    (planted / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*damaged"):
        load_checkpoint(_setup()[0], planted)


def test_checkpoint_of_another_model_names_the_mismatch(checkpoint, tmp_path):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(5, 2))
    accelerator.prepare(torch.optim.AdamW(model.parameters()))
    with pytest.raises(CheckpointError, match="does not fit this run's models"):
        load_checkpoint(accelerator, checkpoint)


def test_resume_accepts_a_checkpoint_name_inside_output_dir(checkpoint):
    assert resolve_resume_checkpoint("checkpoint-1", checkpoint.parent) == checkpoint.parent / "checkpoint-1"
    with pytest.raises(UserError, match="--resume_from_checkpoint 'checkpoint-7'.*available: \\['checkpoint-1'\\]"):
        resolve_resume_checkpoint("checkpoint-7", checkpoint.parent)


def test_stream_position_round_trips_through_json(tmp_path):
    """A streamed dataset's position (datasets' nested state) survives the safetensors + JSON format exactly."""
    from PIL import Image

    from diffusers_repae.training.checkpointing import save_project_state
    from diffusers_repae.training.data import load_training_dataset

    (tmp_path / "data" / "a").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / "data" / "a" / f"{i}.png")
    stream = load_training_dataset(
        train_data_dir=tmp_path / "data", resolution=16, streaming=True, seed=0, shuffle_buffer_size=2,
        cache_dir=tmp_path / "cache",
    ).dataset  # fmt: skip
    iterator = iter(stream)
    next(iterator), next(iterator)

    class Holder:
        def state_dict(self):
            return {"states": [stream.state_dict(), {"tensor": torch.arange(3), "pair": (1, "a")}]}

    save_project_state({"stream": Holder()}, tmp_path / "ckpt")
    restored = read_project_state(tmp_path / "ckpt")["stream"]
    expected = Holder().state_dict()
    assert restored["states"][0] == expected["states"][0]
    assert restored["states"][1]["pair"] == (1, "a") and torch.equal(restored["states"][1]["tensor"], torch.arange(3))
