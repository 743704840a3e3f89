"""Every trainer on a dataset in the Hub's layout, streamed and not; 2 processes read disjoint shards; a streamed run
resumed from a checkpoint equals an uninterrupted one (1 and 2 processes)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_repae.training.data import load_training_dataset
from hub_layout import write_hub_layout
from tiny_setup import write_tiny_setup
from training_helpers import training_script

REPO = Path(__file__).resolve().parents[2]
TRAINING = REPO / "training"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """12 images (red/blue, interleaved) as 2 parquet shards with a ClassLabel; plus the tiny recipe."""
    root = write_tiny_setup(tmp_path_factory.mktemp("stream"))
    write_hub_layout(root / "images", root / "hub")
    from diffusers_repae import build_component

    torch.manual_seed(0)
    build_component(str(root / "recipe"), "vae").save_pretrained(root / "vae")  # the frozen VAE of train_ldm
    return root


def _common(setup, output_dir, steps, batch=4):
    return [
        "--recipe", str(setup / "recipe"), "--dataset_name", str(setup / "hub"), "--resolution", "32",
        "--mixed_precision", "no", "--train_batch_size", str(batch), "--max_train_steps", str(steps),
        "--checkpointing_steps", "2", "--output_dir", str(output_dir), "--dataloader_num_workers", "0",
        "--report_to", "none", "--validation_steps", "0", "--shuffle_buffer_size", "5", "--random_flip",
    ]  # fmt: skip


SIT = ["--enc_type", "efficientnet-lite0"]
GAN = ["--no_lpips", "--disc_ndf", "8"]
TRAINERS = {"train_repae": [*SIT, *GAN, "--ema_decay", "0.9"], "train_ldm": [*SIT, "--vae", "VAE"], "train_vae": GAN}


def test_hub_layout_reads_as_the_hub_would(hub, tmp_path):
    name = str(hub / "hub")
    streamed = load_training_dataset(dataset_name=name, resolution=32, streaming=True, cache_dir=tmp_path)
    assert streamed.num_examples is None and "unknown" in streamed.describe_size()  # the files hold no split sizes
    mapped = load_training_dataset(dataset_name=name, resolution=32, cache_dir=tmp_path)
    assert mapped.id2label == streamed.id2label == {0: "blue", 1: "red"}
    assert mapped.describe_size() == "12 images"
    # once the split's size is in the dataset's metadata (here: from the download's cache), a stream knows it
    known = load_training_dataset(dataset_name=name, resolution=32, streaming=True, cache_dir=tmp_path)
    assert known.describe_size() == "12 images (streamed)"
    rows = [mapped.dataset[i] for i in range(12)]
    stream = list(streamed.dataset)  # one window of 5, then 5, then 2: every row once, in another order
    key = lambda s: hashlib.sha1(s["pixel_values"].numpy().tobytes()).hexdigest()  # noqa: E731
    assert sorted(map(key, stream)) == sorted(map(key, rows))
    assert [key(s) for s in stream] != [key(s) for s in rows]
    assert {key(s): int(s["labels"]) for s in stream} == {key(s): int(s["labels"]) for s in rows}


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streamed"])
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_each_trainer_trains_on_the_hub_layout(hub, tmp_path, trainer, streaming, caplog):
    extra = ["--streaming"] if streaming else []
    flags = [str(hub / "vae") if flag == "VAE" else flag for flag in TRAINERS[trainer]]
    with caplog.at_level("INFO"):
        out = training_script(trainer).main([*_common(hub, tmp_path / "run", 2), *flags, *extra])
    assert (Path(out) / "checkpoint-2").is_dir()
    if streaming:
        state = json.loads((Path(out) / "checkpoint-2" / "project_state.json").read_text())
        assert "stream" in json.dumps(state)  # the stream position is part of the checkpoint
    if trainer == "train_vae":
        return
    banner = [line for line in caplog.text.splitlines() if "training: {" in line]
    assert len(banner) == 1 and "images" in banner[0] and "2 classes" in banner[0]
    from diffusers_repae import RepaEPipeline

    pipe = RepaEPipeline.from_pretrained(out)
    assert pipe.id2label == {0: "blue", 1: "red"}  # the ClassLabel's names, so samples are asked for by name
    images = pipe(class_labels=["red", "blue"], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3)


def _checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return out


def _assert_same_checkpoints(a: Path, b: Path) -> None:
    x, y = _checkpoint_tensors(a), _checkpoint_tensors(b)
    assert x.keys() == y.keys() and len(x) > 50
    for key in x:
        assert torch.equal(x[key], y[key]), key
    state_a, state_b = (json.loads((folder / "project_state.json").read_text()) for folder in (a, b))
    for state in (state_a, state_b):  # wall-clock speed is the one logged value that may differ
        for record in state["history"]["records"]:
            record.pop("throughput/images_per_s")
    assert state_a == state_b  # stream positions included


def test_streamed_resume_equals_an_uninterrupted_run(hub, tmp_path):
    # 12 rows, batches of 4: step 4 is in the second epoch; windows of 5 rows: step 2 stops inside a window
    argv = lambda out, steps, *extra: [*_common(hub, out, steps), *TRAINERS["train_repae"], "--streaming", *extra]  # noqa: E731
    straight, split = tmp_path / "straight", tmp_path / "split"
    training_script("train_repae").main(argv(straight, 4))
    training_script("train_repae").main(argv(split, 2))
    training_script("train_repae").main(argv(split, 4, "--resume_from_checkpoint", "latest"))
    _assert_same_checkpoints(straight / "checkpoint-4", split / "checkpoint-4")


def _launch_two_processes(script: Path, argv: list[str]) -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), str(script), *argv,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def test_two_processes_read_disjoint_shards_and_reshuffle_per_epoch(hub, tmp_path):
    _launch_two_processes(Path(__file__).with_name("stream_probe.py"), [str(hub / "hub"), str(tmp_path / "seen.json")])
    per_process = json.loads((tmp_path / "seen.json").read_text())
    mapped = load_training_dataset(dataset_name=str(hub / "hub"), resolution=32).dataset
    every_image = {hashlib.sha1(mapped[i]["pixel_values"].numpy().tobytes()).hexdigest() for i in range(12)}
    for epoch in (0, 1):
        sets = [[key for e, key in seen if e == epoch] for seen in per_process]
        assert len(sets[0]) == len(sets[1]) == 6  # one parquet shard each, 3 batches of 2
        assert not set(sets[0]) & set(sets[1])
        assert set(sets[0]) | set(sets[1]) == every_image
    orders = [[[key for e, key in seen if e == epoch] for epoch in (0, 1)] for seen in per_process]
    assert any(order[0] != order[1] for order in orders)  # a new shuffle in the new epoch


def test_two_processes_streamed_resume_equals_an_uninterrupted_run(hub, tmp_path):
    # per process: 6 rows (its shard), batches of 2, so step 4 is in its second epoch; global batch 2 x 2 = 4
    def argv(out, steps, *extra):
        return [*_common(hub, out, steps, batch=2), *TRAINERS["train_repae"], "--streaming", *extra]

    straight, split = tmp_path / "straight", tmp_path / "split"
    log = _launch_two_processes(TRAINING / "train_repae.py", argv(straight, 4))
    assert "global batch 4 = 2 processes x 2 x 1 accumulation" in log
    assert "process 0: stream epoch 1" in log and "process 1: stream epoch 1" in log
    _launch_two_processes(TRAINING / "train_repae.py", argv(split, 2))
    _launch_two_processes(TRAINING / "train_repae.py", argv(split, 4, "--resume_from_checkpoint", "latest"))
    _assert_same_checkpoints(straight / "checkpoint-4", split / "checkpoint-4")


def test_a_stream_is_read_in_the_main_process(hub, tmp_path):
    # workers would read ahead of the position the checkpoint records: refused, and the default follows the data
    parse = training_script("train_repae").parse_args
    argv = [*_common(hub, tmp_path / "run", 2), *TRAINERS["train_repae"]]
    at = argv.index("--dataloader_num_workers")
    del argv[at : at + 2]
    assert parse([*argv, "--streaming"]).dataloader_num_workers == 0
    assert parse(argv).dataloader_num_workers == 4
    with pytest.raises(ValueError, match="--dataloader_num_workers 2 with --streaming"):
        parse([*argv, "--streaming", "--dataloader_num_workers", "2"])
