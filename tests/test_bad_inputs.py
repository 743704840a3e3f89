"""A catalogue of bad inputs over the pipeline, every CLI, the converters and evaluation.

Each case asserts its outcome class: the exception type (library calls) or exit status 2 with one ``error: ...``
line and no traceback (scripts, run in-process through the shared ``run_cli`` wrapper), a message naming the
argument, and that nothing on disk changed. Accepted inputs that used to fail (natural label types, a callback
returning None) are catalogued as ``ok`` cases.
"""

import errno
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from diffusers_repae import RepaEPipeline, build_component
from diffusers_repae.cli import run_cli
from diffusers_repae.schedulers import FlowMatchEulerMaruyamaScheduler, FlowMatchHeunScheduler

ROOT = Path(__file__).resolve().parents[1]
_MODULES = {}


def script(name: str):
    """A script of training/ or conversion/ as a module (imported once)."""
    if name not in _MODULES:
        folder = "conversion" if name.startswith("convert_") else "training"
        spec = importlib.util.spec_from_file_location(f"catalogue_{name}", ROOT / folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace shared by every CLI case: images, a VAE, a finished run, a foreign folder, files."""
    root = tmp_path_factory.mktemp("catalogue")
    rng = np.random.default_rng(0)
    for name in ("red", "blue"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
                root / "images" / name / f"{i}.png"
            )
    torch.manual_seed(0)
    build_component("tiny-cpu", "vae").save_pretrained(root / "vae")
    (root / "run" / "checkpoint-2").mkdir(parents=True)
    (root / "run" / "model_index.json").write_text("{}")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine")
    np.savez(root / "ref.npz", np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(root / "samples.npz", np.zeros((2, 8, 8, 3), np.uint8))
    torch.save({"model": Payload(root / "code-ran")}, root / "payload.pt")
    (root / "existing.npz").write_bytes(b"keep")
    (root / "images.png").write_bytes(b"the user's picture")
    (root / "readme").mkdir()
    (root / "readme" / "README.md").write_text("the user's own notes")
    (root / "sampled" / "images").mkdir(parents=True)  # a previous sampling run (of other settings)
    (root / "sampled" / "sampling_config.json").write_text("{}")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "sampled" / "images" / "000000.png")
    (root / "sampled" / "images" / "keep.txt").write_text("mine")
    write_wrong_weights(root)
    return root


def write_wrong_weights(root: Path) -> None:
    """Files of the wrong kind for every weights flag: empty, text, a foreign safetensors, folders of such."""
    from safetensors.torch import save_file

    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("these are my notes, not weights\n")
    save_file({"something.else": torch.zeros(2)}, str(root / "wrong.safetensors"))
    (root / "badvae").mkdir()
    (root / "badvae" / "config.json").write_text((root / "vae" / "config.json").read_text())
    (root / "badvae" / "diffusion_pytorch_model.safetensors").write_text("not weights")
    (root / "badlora").mkdir()
    (root / "badlora" / "pytorch_lora_weights.safetensors").write_text("not weights")
    (root / "badencoder").mkdir()
    (root / "badencoder" / "config.json").write_text("not json")


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# (script, argv with {ws} placeholders, text the message must contain)
CLI_CASES = [
    # sample.py
    ("sample", ["--pretrained", "{ws}/missing", "--class_labels", "0"], "missing"),
    (
        "sample",
        ["--pretrained", "tiny-cpu", "--class_labels", "0", "--num_inference_steps", "0"],
        "num_inference_steps",
    ),
    (
        "sample",
        ["--pretrained", "tiny-cpu", "--class_labels", "no such class", "--num_inference_steps", "1"],
        "class_labels",
    ),
    ("sample", ["--pretrained", "tiny-cpu", "--class_labels", "0", "--output", "{ws}/vae/config.json"], "--output"),
    (
        "sample",
        ["--pretrained", "tiny-cpu", "--class_labels", "0", "--guidance_scale", "nan", "--num_inference_steps", "1"],
        "guidance_scale",
    ),
    # sample_fid.py
    (
        "sample_fid",
        ["--pretrained", "tiny-cpu", "--output_dir", "{ws}/foreign", "--num_samples", "1", "--cpu"],
        "--output_dir",
    ),
    (
        "sample_fid",
        ["--pretrained", "tiny-cpu", "--output_dir", "{ws}/new", "--num_samples", "0", "--cpu"],
        "--num_samples",
    ),
    (
        "sample_fid",
        ["--pretrained", "tiny-cpu", "--output_dir", "{ws}/new", "--batch_size", "0", "--cpu"],
        "--batch_size",
    ),
    ("sample_fid", ["--pretrained", "{ws}/vae", "--output_dir", "{ws}/vae/out", "--cpu"], "--pretrained"),
    # evaluate.py
    ("evaluate", ["--reference", "{ws}/nope.npz", "--samples", "{ws}/samples.npz"], "--reference"),
    ("evaluate", ["--reference", "{ws}/ref.npz", "--samples", "{ws}/nope.npz"], "--samples"),
    (
        "evaluate",
        ["--reference", "{ws}/ref.npz", "--samples", "{ws}/samples.npz", "--save_reference_features", "{ws}/ref.npz"],
        "--save_reference_features",
    ),
    (
        "evaluate",
        ["--reference", "{ws}/ref.npz", "--samples", "{ws}/samples.npz", "--save_reference_features", "{ws}/ref"],
        "--save_reference_features",
    ),
    (
        "evaluate",
        ["--reference", "{ws}/ref.npz", "--samples", "{ws}/samples.npz", "--output_json", "{ws}/samples.npz"],
        "--output_json",
    ),
    (
        "evaluate",
        ["--reference", "{ws}/ref.npz", "--samples", "{ws}/samples.npz", "--output_json", "{ws}/existing.npz"],
        "--overwrite",
    ),
    (
        "evaluate",
        ["--reference", "{ws}/ref.npz", "--samples", "{ws}/samples.npz", "--batch_size", "0"],
        "--batch_size",
    ),
    # eval_vae.py
    ("eval_vae", ["--vae", "{ws}/vae", "--images", "{ws}/nope", "--feature_extractor", "none"], "--images"),
    ("eval_vae", ["--vae", "{ws}/vae", "--images", "{ws}/ref.npz", "--output_json", "{ws}/ref.npz"], "--output_json"),
    (
        "eval_vae",
        ["--vae", "{ws}/vae", "--images", "{ws}/ref.npz", "--output_json", "{ws}/vae/config.json"],
        "--output_json",
    ),
    # compute_latent_stats.py
    (
        "compute_latent_stats",
        ["--vae", "{ws}/vae", "--write", "{ws}/vae", "--train_data_dir", "{ws}/images"],
        "--write",
    ),
    (
        "compute_latent_stats",
        ["--vae", "{ws}/vae", "--write", "{ws}/foreign", "--train_data_dir", "{ws}/images"],
        "--overwrite",
    ),
    (
        "compute_latent_stats",
        ["--vae", "{ws}/vae", "--plot", "{ws}/images/red/0.png", "--train_data_dir", "{ws}/images"],
        "--plot",
    ),
    (
        "compute_latent_stats",
        ["--vae", "{ws}/vae", "--batch_size", "0", "--train_data_dir", "{ws}/images"],
        "--batch_size",
    ),
    # cache_latents.py
    (
        "cache_latents",
        ["--vae", "{ws}/vae", "--output_dir", "{ws}/foreign", "--train_data_dir", "{ws}/images"],
        "--output_dir",
    ),
    (
        "cache_latents",
        ["--vae", "{ws}/vae", "--output_dir", "{ws}/images", "--train_data_dir", "{ws}/images"],
        "--output_dir",
    ),
    (
        "cache_latents",
        ["--vae", "{ws}/vae", "--output_dir", "{ws}/new", "--train_data_dir", "{ws}/images", "--random_flip"],
        "--random_flip",
    ),
    (
        "cache_latents",
        ["--vae", "{ws}/vae", "--output_dir", "{ws}/new", "--train_data_dir", "{ws}/images", "--batch_size", "0"],
        "--batch_size",
    ),
    # dataset_to_npz.py
    ("dataset_to_npz", ["--train_data_dir", "{ws}/images", "--output", "{ws}/existing.npz"], "--overwrite"),
    ("dataset_to_npz", ["--train_data_dir", "{ws}/images", "--output", "{ws}/images/x.npz"], "--train_data_dir"),
    (
        "dataset_to_npz",
        ["--train_data_dir", "{ws}/images", "--output", "{ws}/new.npz", "--num_images", "0"],
        "--num_images",
    ),
    # converters
    (
        "convert_vae_to_diffusers",
        ["--checkpoint", "{ws}/nope.pt", "--arch", "f8d4", "--output_dir", "{ws}/new"],
        "nope.pt",
    ),
    (
        "convert_vae_to_diffusers",
        ["--checkpoint", "{ws}/payload.pt", "--arch", "f8d4", "--output_dir", "{ws}/new"],
        "payload.pt",
    ),
    (
        "convert_vae_to_diffusers",
        ["--checkpoint", "{ws}/payload.pt", "--arch", "f8d4", "--output_dir", "{ws}/foreign"],
        "--overwrite",
    ),
    (
        "convert_vae_to_diffusers",
        ["--checkpoint", "{ws}/vae/config.json", "--arch", "f8d4", "--output_dir", "{ws}/vae"],
        "--output_dir",
    ),
    ("convert_repae_to_diffusers", ["--checkpoint", "{ws}/nope.pt", "--output_dir", "{ws}/new"], "nope.pt"),
    ("convert_repae_to_diffusers", ["--checkpoint", "{ws}/payload.pt", "--output_dir", "{ws}/new"], "payload.pt"),
    ("convert_repae_to_diffusers", ["--checkpoint", "{ws}/payload.pt", "--output_dir", "{ws}/run"], "--overwrite"),
    ("convert_repae_to_diffusers", ["--checkpoint", "{ws}/payload.pt", "--output_dir", "{ws}"], "--output_dir"),
]
TRAIN = ["--recipe", "tiny-cpu", "--train_data_dir", "{ws}/images", "--resolution", "32", "--mixed_precision", "no",
         "--report_to", "none", "--dataloader_num_workers", "0", "--train_batch_size", "2"]  # fmt: skip
LDM = [*TRAIN, "--vae", "{ws}/vae"]
CLI_CASES += [
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/run"], "--output_dir"),
    (
        "train_repae",
        [*TRAIN, "--output_dir", "{ws}/run", "--overwrite", "--resume_from_checkpoint", "latest"],
        "--overwrite",
    ),
    (
        "train_repae",
        [*TRAIN, "--output_dir", "{ws}/run", "--resume_from_checkpoint", "checkpoint-9"],
        "--resume_from_checkpoint",
    ),
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/new", "--train_batch_size", "0"], "--train_batch_size"),
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/new", "--ema_decay", "2"], "--ema_decay"),
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/new", "--cfg_prob", "1"], "--cfg_prob"),
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/images/red/0.png"], "--output_dir"),
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/new", "--train_batch_size", "8"], "--train_batch_size"),
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/new", "--resolution", "16"], "--disc_layers"),
    ("train_ldm", [*TRAIN, "--output_dir", "{ws}/new"], "--vae"),
    ("train_ldm", [*LDM, "--output_dir", "{ws}/new", "--lora_rank", "-1"], "--lora_rank"),
    ("train_ldm", [*LDM, "--output_dir", "{ws}/new", "--lora_rank", "4"], "--lora_rank"),
    ("train_ldm", [*LDM, "--output_dir", "{ws}/new", "--new_classes"], "--new_classes"),
    ("train_ldm", [*LDM, "--output_dir", "{ws}/run"], "--output_dir"),
    ("train_ldm", [*LDM, "--output_dir", "{ws}/run", "--resume_from_checkpoint", "{ws}/foreign"], "checkpoint-<step>"),
]

# Round 3 (issue 25). Data loss: --overwrite removes only what a run of ours wrote, after checking everything first,
# and no writer replaces a user's file without --overwrite.
CLI_CASES += [
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/readme", "--overwrite"], "'README.md', which no training run"),
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/readme"], "'README.md', which no training run"),
    ("train_repae", [*TRAIN, "--output_dir", "{ws}/foreign", "--overwrite"], "'notes.txt', which no training run"),
    ("train_ldm", [*LDM, "--output_dir", "{ws}/readme", "--overwrite"], "'README.md', which no training run"),
    (
        "sample_fid",
        ["--pretrained", "{ws}/missing", "--output_dir", "{ws}/run", "--overwrite", "--cpu"],
        "--pretrained",
    ),
    (
        "sample_fid",
        ["--pretrained", "tiny-cpu", "--output_dir", "{ws}/foreign", "--overwrite", "--cpu", "--num_samples", "1"],
        "'notes.txt', which no sampling run wrote",
    ),
    (
        "sample_fid",
        ["--pretrained", "tiny-cpu", "--output_dir", "{ws}/sampled", "--overwrite", "--cpu", "--num_samples", "1"],
        "'images/keep.txt', which no sampling run wrote",
    ),
    (
        "sample_fid",
        ["--pretrained", "tiny-cpu", "--output_dir", "{ws}/new", "--npz_path", "{ws}/existing.npz", "--cpu"],
        "--overwrite",
    ),
    ("sample", ["--pretrained", "tiny-cpu", "--class_labels", "0", "--output", "{ws}/images.png"], "--overwrite"),
    (
        "compute_latent_stats",
        ["--vae", "{ws}/vae", "--plot", "{ws}/existing.npz", "--train_data_dir", "{ws}/images"],
        "--overwrite",
    ),
]

# Round 3 (issue 25). Silent: every value is checked where it enters (shared argparse types), naming the flag.
NEW = [*TRAIN, "--output_dir", "{ws}/new"]
CLI_CASES += [
    ("train_repae", [*NEW, "--max_grad_norm", "0"], "--max_grad_norm must be > 0, got 0.0"),
    ("train_repae", [*NEW, "--max_grad_norm", "-1"], "--max_grad_norm must be > 0, got -1.0"),
    ("train_repae", [*NEW, "--bn_momentum", "5"], "--bn_momentum must be in (0, 1], got 5.0"),
    ("train_repae", [*NEW, "--encoder_depth", "0"], "--encoder_depth must be >= 1, got 0"),
    ("train_repae", [*NEW, "--projector_dim", "0"], "--projector_dim must be >= 1, got 0"),
    ("train_repae", [*NEW, "--validation_steps", "-1"], "--validation_steps must be >= 0, got -1"),
    ("train_repae", [*NEW, "--max_train_minutes", "nan"], "--max_train_minutes must be a finite number"),
    ("train_repae", [*NEW, "--l1_weight", "nan"], "--l1_weight must be a number, got 'nan'"),
    ("train_repae", [*NEW, "--disc_ndf", "0"], "--disc_ndf must be >= 1, got 0"),
    ("train_repae", [*NEW, "--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
    ("train_repae", [*TRAIN, "--output_dir", ""], "--output_dir must be a path, got ''"),
    (
        "train_repae",
        [*TRAIN, "--output_dir", "{ws}/run", "--resume_from_checkpoint", "latest", "--max_train_steps", "1"],
        "--max_train_steps 1 is below the step of the checkpoint",
    ),
    ("train_ldm", [*LDM, "--output_dir", "{ws}/new", "--lora_alpha", "-1"], "--lora_alpha must be > 0, got -1.0"),
    ("train_vae", [*NEW, "--vae_learning_rate", "-1"], "--vae_learning_rate must be > 0, got -1.0"),
    ("compute_latent_stats", ["--vae", "{ws}/vae", "--max_images", "0"], "--max_images must be >= 1, got 0"),
    ("compute_latent_stats", ["--vae", "{ws}/vae", "--max_images", "-1"], "--max_images must be >= 1, got -1"),
    ("compute_latent_stats", ["--vae", "{ws}/vae", "--tolerance", "nan"], "--tolerance must be a finite number"),
    ("cache_latents", ["--vae", "{ws}/vae", "--output_dir", "{ws}/new", "--max_images", "0"], "--max_images must be"),
    (
        "sample_fid",
        ["--pretrained", "tiny-cpu", "--output_dir", "{ws}/new", "--num_classes", "0", "--cpu"],
        "--num_classes must be >= 1, got 0",
    ),
    ("sample_fid", ["--pretrained", "tiny-cpu", "--output_dir", "", "--cpu"], "--output_dir must be a path"),
    ("sample", ["--pretrained", "tiny-cpu", "--class_labels", "0", "--num_threads", "0"], "--num_threads must be"),
]
# Clear but wrong: the message names the flag (it was torch's "Invalid learning rate: -1.0").
CLI_CASES += [("train_repae", [*NEW, "--learning_rate", "-1"], "--learning_rate must be > 0, got -1.0")]

# Round 3 (issue 25), environment. Weight files of the wrong kind or shape, for every flag that reads one: one line
# naming the flag, the path and what was found (never an UnpicklingError or a zip reader's RuntimeError).
WRONG_FILES = [("empty.pt", "empty file"), ("text.pt", "text file"), ("payload.pt", "never unpickled"),
               ("wrong.safetensors", "do not fit")]  # fmt: skip
OFFLINE_ENCODER = ["--enc_type", "efficientnet-lite0"]  # bundled with its package: no Hub
EVAL_VAE = ["--vae", "{ws}/vae", "--images", "{ws}/ref.npz", "--feature_extractor", "none", "--resolution", "8"]
CLI_CASES += [
    ("eval_vae", [*EVAL_VAE, "--lpips_vgg_weights", f"{{ws}}/{name}"], f"--lpips_vgg_weights '{{ws}}/{name}'")
    for name, _ in WRONG_FILES
]
CLI_CASES += [("eval_vae", [*EVAL_VAE, "--lpips_vgg_weights", f"{{ws}}/{name}"], found) for name, found in WRONG_FILES]
CLI_CASES += [
    (
        "train_repae",
        [*NEW, *OFFLINE_ENCODER, "--discriminator_checkpoint", f"{{ws}}/{name}"],
        f"--discriminator_checkpoint '{{ws}}/{name}'",
    )
    for name in ("text.pt", "wrong.safetensors", "badvae")
]
CLI_CASES += [
    (
        "eval_vae",
        ["--vae", "{ws}/badvae", "--images", "{ws}/ref.npz", "--feature_extractor", "none"],
        "--vae '{ws}/badvae'",
    ),
    ("compute_latent_stats", ["--vae", "{ws}/badvae", "--train_data_dir", "{ws}/images"], "--vae '{ws}/badvae'"),
    ("sample", ["--pretrained", "tiny-cpu", "--class_labels", "0", "--lora", "{ws}/badlora"], "--lora '{ws}/badlora'"),
    ("sample", ["--pretrained", "tiny-cpu", "--class_labels", "0", "--lora", "{ws}/vae"], "--lora '{ws}/vae'"),
    (
        "train_repae",
        [*NEW, "--enc_type", "efficientnet-lite0", "--encoder_paths", "efficientnet-lite0={ws}/text.pt"],
        "--encoder_paths (efficientnet-lite0) '{ws}/text.pt' is not a weights file (a text file",
    ),
    (
        "train_repae",
        [*NEW, "--enc_type", "dinov2-vit-b", "--encoder_paths", "dinov2-vit-b={ws}/badencoder"],
        "--encoder_paths (dinov2-vit-b) '{ws}/badencoder' is not a loadable",
    ),
]
if importlib.util.find_spec("torch_fidelity") is not None:
    CLI_CASES += [
        (
            "evaluate",
            ["--reference", "{ws}/ref.npz", "--samples", "{ws}/samples.npz", "--inception_weights", f"{{ws}}/{name}"],
            f"--inception_weights '{{ws}}/{name}'",
        )
        for name, _ in WRONG_FILES
    ]
# A zero-byte or text checkpoint given to each converter (the zero-byte one crashed inside the error handler).
CLI_CASES += [
    (
        converter,
        ["--checkpoint", f"{{ws}}/{name}", *extra, "--output_dir", "{ws}/new"],
        f"'{{ws}}/{name}' is not a weights file",
    )
    for converter, extra in (("convert_vae_to_diffusers", ["--arch", "f8d4"]), ("convert_repae_to_diffusers", []))
    for name in ("empty.pt", "text.pt")
]
# Sizes that cannot fit in memory are refused up front, naming the flag; devices that do not exist, too.
CLI_CASES += [
    (
        "sample_fid",
        ["--pretrained", "tiny-cpu", "--output_dir", "{ws}/new", "--num_samples", str(10**14), "--cpu"],
        "--num_samples 100,000,000,000,000 at",
    ),
    (
        "sample_fid",
        ["--pretrained", "tiny-cpu", "--output_dir", "{ws}/new", "--num_samples", str(10**14), "--cpu", "--skip_npz"],
        "--num_samples 100,000,000,000,000 at",
    ),
    (
        "sample_fid",
        [
            "--pretrained",
            "tiny-cpu",
            "--output_dir",
            "{ws}/new",
            "--num_samples",
            str(10**12),
            "--batch_size",
            str(10**12),
            "--cpu",
            "--skip_npz",
        ],
        "--batch_size 1000000000000 needs at least",
    ),  # fmt: skip
    (
        "sample",
        ["--pretrained", "tiny-cpu", "--class_labels", "0", "1", "--num_images_per_label", str(10**12)],
        "--class_labels x --num_images_per_label (2000000000000 images in one call) needs at least",
    ),
    (
        "sample",
        ["--pretrained", "tiny-cpu", "--class_labels", "0", "--device", "nonsense"],
        "--device must be a torch",
    ),
    ("sample", ["--pretrained", "tiny-cpu", "--class_labels", "0", "--device", "meta"], "--device must be cpu, cuda"),
    ("evaluate", ["--reference", "{ws}/ref.npz", "--samples", "{ws}/samples.npz", "--device", "gpu"], "--device must"),
    ("eval_vae", [*EVAL_VAE, "--device", "nonsense"], "--device must be a torch device"),
    ("compute_latent_stats", ["--vae", "{ws}/vae", "--device", "nonsense"], "--device must be a torch device"),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("sample", ["--pretrained", "tiny-cpu", "--class_labels", "0", "--device", "cuda"], "0 CUDA GPU"))
# A mistyped column is refused with the columns there are (a missing --label_column trained one class "all").
CLI_CASES += [
    ("train_repae", [*NEW, "--label_column", "lable"], "--label_column 'lable' is not a column of imagefolder:"),
    ("train_repae", [*NEW, "--label_column", "lable"], "its columns are ['image', 'label']"),
    (
        "cache_latents",
        [
            "--vae",
            "{ws}/vae",
            "--output_dir",
            "{ws}/new",
            "--train_data_dir",
            "{ws}/images",
            "--label_column",
            "class",
        ],
        "--label_column 'class' is not a column",
    ),  # fmt: skip
    ("train_repae", [*NEW, "--image_column", "img"], "--image_column 'img' is not a column"),
]

if importlib.util.find_spec("wandb") is None:  # the tracker the flag names is not installed
    CLI_CASES.append(("train_repae", [*TRAIN, "--output_dir", "{ws}/new", "--report_to", "wandb"], "--report_to"))


@pytest.mark.parametrize(("name", "argv", "expected"), CLI_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CLI_CASES)])
def test_cli_user_error_is_one_line_exit_2_and_touches_nothing(ws, capsys, name, argv, expected):
    argv = [a.replace("{ws}", str(ws)) for a in argv]
    module = script(name)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    before = snapshot(ws)
    with pytest.raises(SystemExit) as caught:
        run_cli(module.main, argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert expected.replace("{ws}", str(ws)) in last, last
    assert snapshot(ws) == before, "the failed command changed files"
    assert not (ws / "code-ran").exists()


# ---------------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipe = RepaEPipeline.from_recipe("tiny-cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _shape(pipe, batch=1):
    c = pipe.transformer.config
    return (batch, c.in_channels, c.sample_size, c.sample_size)


def _nan_latents(pipe):
    latents = torch.zeros(_shape(pipe))
    latents[0, 0, 0, 0] = float("nan")
    return latents


def _nan_callback(pipe, i, t, kwargs):
    return {"latents": kwargs["latents"] * float("nan")}


def _inf_callback(pipe, i, t, kwargs):
    return {"latents": kwargs["latents"] + (float("inf") if i == 1 else 0.0)}


PIPELINE_CASES = [
    (lambda p: dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (lambda p: dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
    (lambda p: dict(guidance_scale="2"), ValueError, "guidance_scale"),
    (lambda p: dict(latents=_nan_latents(p)), ValueError, "latents"),
    (lambda p: dict(latents=torch.full(_shape(p), float("inf"))), ValueError, "latents"),
    (lambda p: dict(latents=torch.zeros(1, 1, 2, 2)), ValueError, "latents"),
    (lambda p: dict(latents=[[0.0]]), TypeError, "latents"),
    (lambda p: dict(class_labels=1.5), TypeError, "class_labels"),
    (lambda p: dict(class_labels=None), TypeError, "class_labels"),
    (lambda p: dict(class_labels={"a": 1}), TypeError, "class_labels"),
    (lambda p: dict(class_labels=[0, 1.5]), TypeError, "class_labels"),
    (lambda p: dict(class_labels=torch.tensor([0.5])), TypeError, "class_labels"),
    (lambda p: dict(class_labels=np.array([1.0])), TypeError, "class_labels"),
    (lambda p: dict(class_labels=torch.tensor([True])), TypeError, "class_labels"),
    (lambda p: dict(class_labels=[]), ValueError, "class_labels"),
    (lambda p: dict(class_labels=[10_000]), ValueError, "class_labels"),
    (lambda p: dict(class_labels=torch.tensor(-1)), ValueError, "class_labels"),
    (lambda p: dict(class_labels="no such class"), ValueError, "class_labels"),
    (lambda p: dict(generator=0), TypeError, "generator"),
    (lambda p: dict(generator=[torch.Generator()] * 3), ValueError, "generator"),
    (lambda p: dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (lambda p: dict(num_inference_steps=2.5), ValueError, "num_inference_steps"),
    (lambda p: dict(guidance_interval=(0.8, 0.2)), ValueError, "guidance_interval"),
    (lambda p: dict(guidance_interval=(float("nan"), 1.0)), ValueError, "guidance_interval"),
    (lambda p: dict(output_type="jpg"), ValueError, "output_type"),
    (lambda p: dict(sampler="nope"), ValueError, "sampler"),
    (lambda p: dict(callback_on_step_end=lambda *a: 5), TypeError, "callback_on_step_end"),
    (lambda p: dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
    (lambda p: dict(num_images_per_label=0), ValueError, "num_images_per_label"),
    (lambda p: dict(sampling_dtype=torch.int32), ValueError, "sampling_dtype"),
    # Round 3 (issue 25)
    (lambda p: dict(guidance_interval="01"), ValueError, "guidance_interval must be a pair of numbers"),
    (lambda p: dict(guidance_interval=[True, 1]), ValueError, "guidance_interval must be a pair of numbers"),
    (lambda p: dict(latents=torch.zeros(_shape(p), dtype=torch.bool)), ValueError, "latents: dtype torch.bool"),
    (lambda p: dict(latents=torch.zeros(_shape(p), dtype=torch.int64)), ValueError, "latents: dtype torch.int64"),
    (lambda p: dict(latents=torch.zeros(_shape(p), device="meta")), ValueError, "latents: a meta-device"),
    (
        lambda p: dict(class_labels=[0, 1], generator=[torch.Generator(), None]),
        TypeError,
        r"generator\[1\] is NoneType",
    ),
    (lambda p: dict(class_labels=[0, 1], generator=[torch.Generator(), 7]), TypeError, r"generator\[1\] is int"),
    (lambda p: dict(num_inference_steps=10**9), ValueError, "num_inference_steps must be at most 100,000"),
    (lambda p: dict(num_images_per_prompt=10**13), ValueError, "a batch of 10,000,000,000,000 images"),
    (lambda p: dict(callback_on_step_end=_nan_callback), ValueError, "callback_on_step_end returned .* at step 0"),
    (lambda p: dict(callback_on_step_end=_inf_callback, num_inference_steps=2), ValueError, "at step 1"),
]


@pytest.mark.parametrize(("make", "error", "expected"), PIPELINE_CASES, ids=[c[2] for c in PIPELINE_CASES])
def test_pipeline_rejects_with_the_argument_named(pipe, make, error, expected):
    call = dict(class_labels=[0], num_inference_steps=1, output_type="latent") | make(pipe)
    with pytest.raises(error, match=expected):
        pipe(**call)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


# A saved folder edited by hand: (file, changes, what the error names). Statistics that would make every image NaN,
# nonsense sizes, unknown class names, defaults out of range.
FOLDER_EDITS = [
    ("vae/config.json", dict(latents_mean=[0.0] * 4, latents_std=[0.0] * 4), "vae config.json: latents_std"),
    ("vae/config.json", dict(latents_mean=[0.0] * 4, latents_std=[float("nan")] * 4), "vae config.json: latents_std"),
    ("vae/config.json", dict(latents_mean=[float("inf")] * 4, latents_std=[1.0] * 4), "vae config.json: latents_mean"),
    ("transformer/config.json", dict(num_layers=-2), "transformer config.json: num_layers must be an integer >= 1"),
    ("transformer/config.json", dict(hidden_size=0), "transformer config.json: hidden_size must be an integer >= 1"),
    ("transformer/config.json", dict(mlp_ratio=-1), "transformer config.json: mlp_ratio"),
    ("model_index.json", dict(transformer=["diffusers_repae", "NoSuchModel"]), "model_index.json: transformer names"),
    ("model_index.json", dict(default_num_inference_steps=-5), "model_index.json: default_num_inference_steps"),
    ("model_index.json", dict(default_guidance_interval="01"), "model_index.json: default_guidance_interval"),
]


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    torch.manual_seed(0)
    RepaEPipeline.from_recipe("tiny-cpu").save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("file", "changes", "expected"), FOLDER_EDITS, ids=[f"{c[0]}-{c[2][-20:]}" for c in FOLDER_EDITS]
)
def test_an_edited_folder_is_refused_naming_file_and_field(saved_folder, tmp_path, file, changes, expected):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(saved_folder, folder)
    _edit_json(folder / file, **changes)
    with pytest.raises(ValueError) as caught:
        RepaEPipeline.from_pretrained(folder)
    assert expected in str(caught.value), str(caught.value)
    RepaEPipeline.from_pretrained(saved_folder)  # the unedited folder loads


ACCEPTED = [
    ("tensor", lambda: torch.tensor([1, 2]), [1, 2]),
    ("0-d tensor", lambda: torch.tensor(3), [3]),
    ("numpy array", lambda: np.array([[0], [4]]), [0, 4]),
    ("numpy scalar", lambda: np.int64(5), [5]),
    ("list with 0-d tensor and numpy int", lambda: [torch.tensor(1), np.int32(2)], [1, 2]),
]


@pytest.mark.parametrize(("labels", "ids"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_natural_label_types_are_accepted(pipe, labels, ids):
    assert pipe.get_label_ids(labels()) == ids


def test_callback_returning_none_changes_nothing(pipe):
    call = dict(class_labels=[0], num_inference_steps=2, output_type="latent")
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    seen = []
    quiet = pipe(
        **call, generator=torch.Generator().manual_seed(0), callback_on_step_end=lambda p, i, t, kw: seen.append(i)
    ).images
    assert seen == [0, 1] and torch.equal(plain, quiet)


@pytest.mark.parametrize("field", ["sigmas", "timesteps"])
@pytest.mark.parametrize("cls", [FlowMatchHeunScheduler, FlowMatchEulerMaruyamaScheduler])
def test_non_finite_timesteps_are_refused(cls, field):
    with pytest.raises(ValueError, match=f"{field} must be finite"):
        cls().set_timesteps(**{field: [float("nan"), 0.5]})


def test_heun_from_euler_maruyama_config_is_quiet(pipe, caplog):
    from diffusers.utils import logging as dlogging

    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            scheduler = FlowMatchHeunScheduler.from_config(FlowMatchEulerMaruyamaScheduler(t_last=0.04).config)
    finally:
        dlogging.disable_propagation()
    assert "will be ignored" not in caplog.text and scheduler.config.num_train_timesteps == 1000


def test_payload_marker_never_created(ws):
    """The converters refused payload.pt above; the marker its unpickling would create does not exist."""
    assert not (ws / "code-ran").exists()
    assert pickle.loads(pickle.dumps(1)) == 1 and json.loads("1") == 1


# ------------------------------------------------------------------------------- what the refusals protect


def test_run_cli_keeps_the_traceback_of_bugs_and_hints_offline_hub_errors(capsys):
    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(bug, [])

    def offline(argv):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    with pytest.raises(SystemExit) as caught:
        run_cli(offline, [])
    assert caught.value.code == 2 and "--encoder_paths" in capsys.readouterr().err


def test_replacing_folder_leaves_nothing_stale_and_keeps_the_old_one_on_failure(tmp_path):
    from diffusers_repae.cli import replacing_folder

    target = tmp_path / "out"
    (target / "stale").mkdir(parents=True)
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), replacing_folder(target) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt", "stale"]
    with replacing_folder(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old copies left behind


def test_training_output_dir_refused_then_overwrite_removes_only_the_old_run(tmp_path):
    from diffusers_repae.cli import UserError
    from diffusers_repae.training.checkpointing import check_output_dir, remove_previous_run

    run = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4", "transformer", "validation", "logs"):
        (run / name).mkdir(parents=True)
    (run / "model_index.json").write_text("{}")
    (run / "my_notes.txt").write_text("not the run's")
    with pytest.raises(UserError, match="already holds a run.*--overwrite"):
        check_output_dir(run, None, overwrite=False)
    assert check_output_dir(run, "latest", overwrite=False) == []  # resuming is fine
    with pytest.raises(UserError, match="holds 'my_notes.txt', which no training run of ours wrote"):
        check_output_dir(run, None, overwrite=True)  # nothing is removed while a foreign file is there
    assert (run / "checkpoint-2").is_dir() and (run / "my_notes.txt").is_file()
    (run / "my_notes.txt").unlink()
    remove_previous_run(run, check_output_dir(run, None, overwrite=True))
    assert list(run.iterdir()) == []
    assert check_output_dir(run, None, overwrite=False) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_readme_is_never_replaced_by_a_model_card(tmp_path, overwrite):
    from diffusers_repae.cli import UserError
    from diffusers_repae.training.checkpointing import check_output_dir

    (tmp_path / "README.md").write_text("the user's own notes")
    with pytest.raises(UserError, match="holds 'README.md', which no training run of ours wrote"):
        check_output_dir(tmp_path, None, overwrite=overwrite)
    assert (tmp_path / "README.md").read_text() == "the user's own notes"


def test_weights_finite_sees_a_nan_parameter():
    from accelerate import Accelerator

    from diffusers_repae.training.checkpointing import weights_finite

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert weights_finite(accelerator, [optimizer])
    with torch.no_grad():
        model.bias[1] = float("inf")
    assert not weights_finite(accelerator, [optimizer])


def test_latent_cache_of_another_vae_is_recognised(ws, tmp_path):
    identity = script("train_ldm").vae_identity
    pipeline = tmp_path / "pipe"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "vae" / "config.json").write_text("{}")
    assert identity(str(pipeline)) == identity(str(pipeline / "vae"))  # a pipeline folder means its vae/
    assert identity(str(ws / "vae")) != identity(str(pipeline))
    assert identity("tiny-cpu") == "tiny-cpu"


def test_dataset_to_npz_leaves_unreadable_images_out_and_says_how_many(ws, tmp_path, capsys):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")
    out = tmp_path / "ref.npz"
    script("dataset_to_npz").main(["--train_data_dir", str(tmp_path / "images"), "--resolution", "16",
                                   "--output", str(out)])  # fmt: skip
    with np.load(out) as data:
        images = data["arr_0"]
    assert images.shape == (3, 16, 16, 3)
    assert len({im.tobytes() for im in images}) == 3  # no stand-in duplicates
    assert "1 unreadable images left out" in capsys.readouterr().out


def test_a_folder_of_unreadable_images_says_so(tmp_path):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"broken")
    with pytest.raises(SystemExit) as caught:
        run_cli(script("dataset_to_npz").main, ["--train_data_dir", str(tmp_path / "images"), "--resolution", "16",
                                                 "--output", str(tmp_path / "x.npz")])  # fmt: skip
    assert caught.value.code == 2 and not (tmp_path / "x.npz").exists()


def test_sample_fid_refuses_to_mix_two_models_at_one_path(tmp_path, capsys):
    folder = tmp_path / "pipe"
    torch.manual_seed(0)
    RepaEPipeline.from_recipe("tiny-cpu").save_pretrained(folder)
    argv = ["--pretrained", str(folder), "--output_dir", str(tmp_path / "samples"), "--num_samples", "1",
            "--num_inference_steps", "1", "--cpu", "--skip_npz"]  # fmt: skip
    AcceleratorState._reset_state(True)
    script("sample_fid").main(argv)
    torch.manual_seed(1)  # retrained: other weights at the same path
    RepaEPipeline.from_recipe("tiny-cpu").save_pretrained(folder)
    before = snapshot(tmp_path / "samples")
    AcceleratorState._reset_state(True)
    with pytest.raises(SystemExit) as caught:
        run_cli(script("sample_fid").main, [*argv[:5], "2", *argv[6:]])
    assert caught.value.code == 2 and "weights_sha256" in capsys.readouterr().err
    assert snapshot(tmp_path / "samples") == before


# ------------------------------------------------------------------ round 3 (issue 25): environment failures


def _fill_then_fail(path, *args, **kwargs):
    """A writer on a full disk: part of the file lands, then ENOSPC."""
    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _writers():
    from diffusers_repae.cli import replacing_folder
    from diffusers_repae.evaluation.generation import save_features
    from diffusers_repae.evaluation.image_io import save_npz
    from diffusers_repae.evaluation.sampling import save_sample
    from diffusers_repae.training.checkpointing import save_project_state

    def folder(out):
        with replacing_folder(out / "pipe") as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    return {
        "save_npz": ("numpy.savez", lambda out: save_npz(out / "s.npz", np.zeros((1, 4, 4, 3), np.uint8))),
        "save_features": ("numpy.savez", lambda out: save_features(out / "f.npz", {"pool": np.zeros(2)}, "x")),
        "save_sample": ("PIL.Image.Image.save", lambda out: save_sample(np.zeros((4, 4, 3), np.uint8), out / "a.png")),
        "save_project_state": (
            "safetensors.torch.save_file",
            lambda out: save_project_state({"m": torch.nn.Linear(1, 1)}, out / "state"),
        ),
        "replacing_folder": (None, folder),
    }


@pytest.mark.parametrize("writer", list(_writers()))
def test_a_full_disk_is_one_line_naming_the_path_and_leaves_no_temporaries(tmp_path, monkeypatch, writer):
    from diffusers_repae.disk import DiskFullError

    target, write = _writers()[writer]
    if target == "PIL.Image.Image.save":
        monkeypatch.setattr(Image.Image, "save", lambda self, path, *a, **k: _fill_then_fail(path))
    elif target == "safetensors.torch.save_file":
        monkeypatch.setattr(target, lambda tensors, path, *a, **k: _fill_then_fail(path))
    elif target is not None:
        monkeypatch.setattr(target, _fill_then_fail)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DiskFullError, match=r"the disk is full at '.*out.*' \(no space left .*\): free some space"):
        write(out)
    leftovers = [p.name for p in out.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers  # no .tmp, no partial file, no staging folder


def test_a_full_disk_while_saving_a_checkpoint_leaves_no_tmp_folder(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from diffusers_repae.disk import DiskFullError
    from diffusers_repae.training.checkpointing import save_checkpoint

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)

    def save_state(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(accelerator, "save_state", save_state)
    with pytest.raises(DiskFullError, match="checkpoint-3"):
        save_checkpoint(accelerator, tmp_path, 3)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_a_command_is_one_line_and_the_rerun_is_not_blocked(ws, tmp_path, monkeypatch, capsys):
    argv = ["--train_data_dir", str(ws / "images"), "--resolution", "16", "--output", str(tmp_path / "x.npz")]
    with monkeypatch.context() as patch:
        patch.setattr("numpy.savez", _fill_then_fail)
        with pytest.raises(SystemExit) as caught:
            run_cli(script("dataset_to_npz").main, argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "the disk is full at" in err and "x.npz" in err
    assert list(tmp_path.iterdir()) == []  # no x.npz.tmp.npz
    script("dataset_to_npz").main(argv)  # space freed: the same command now works
    assert (tmp_path / "x.npz").is_file()


def test_an_unwrapped_full_disk_error_is_one_line(capsys):
    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")

    with pytest.raises(SystemExit) as caught:
        run_cli(main, [])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "the disk is full at '/data/out/model.safetensors'" in err


LOCKED = [
    ("convert_vae_to_diffusers", ["--checkpoint", "{ws}/empty.pt", "--arch", "f8d4", "--output_dir", "{out}"]),
    ("convert_repae_to_diffusers", ["--checkpoint", "{ws}/empty.pt", "--output_dir", "{out}"]),
    ("cache_latents", ["--vae", "{ws}/vae", "--train_data_dir", "{ws}/images", "--output_dir", "{out}"]),
]


@pytest.mark.parametrize(("name", "argv"), LOCKED, ids=[c[0] for c in LOCKED])
def test_a_second_writer_into_a_held_folder_is_refused_in_one_line(ws, tmp_path, capsys, name, argv):
    import subprocess
    import sys

    holder_code = (
        "import sys, types; package = types.ModuleType('diffusers_repae'); "
        f"package.__path__ = [{str(ROOT / 'src' / 'diffusers_repae')!r}]; sys.modules['diffusers_repae'] = package; "
        "from diffusers_repae.run_lock import FolderLock; FolderLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = snapshot(tmp_path)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        with pytest.raises(SystemExit) as caught:
            run_cli(script(name).main, [a.replace("{ws}", str(ws)).replace("{out}", str(out)) for a in argv])
        err = capsys.readouterr().err
        assert caught.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err, err[-2000:]
        assert f"--output_dir {str(out)!r} is in use by pid {holder.pid}" in err
        assert snapshot(tmp_path) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
