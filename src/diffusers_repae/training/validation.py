"""What a run shows while and after it trains: sample grids, validation images for the trackers, loss curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from .checkpointing import LossHistory
from .data import TrainingData


@torch.no_grad()
def sample_grid(pipeline, class_ids: list[int], seed: int, num_inference_steps=None, guidance_scale=None):
    """One image per class from a fixed seed, as a float ``[N, H, W, 3]`` array in [0, 1]."""
    pipeline.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    generator = torch.Generator().manual_seed(seed)
    return pipeline(class_labels=class_ids, generator=generator, output_type="np", **kwargs).images


def grid_image(images: np.ndarray, columns: int = 8):
    """``[N, H, W, 3]`` in [0, 1] -> one PIL image, ``columns`` wide."""
    from PIL import Image

    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    canvas = np.ones((rows * h, columns * w, 3), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return Image.fromarray((canvas * 255).clip(0, 255).astype(np.uint8))


def log_validation(
    accelerator: Accelerator,
    pipeline,
    data: TrainingData,
    global_step: int,
    output_dir: str | Path,
    seed: int = 0,
    num_classes: int = 16,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
) -> None:
    """Sample a grid with ``pipeline`` (the EMA model), one image for each of the first ``num_classes`` classes;
    save it as a PNG in ``output_dir/validation`` and send it to the trackers."""
    class_ids = list(range(min(num_classes, data.num_classes)))
    images = sample_grid(pipeline, class_ids, seed, num_inference_steps, guidance_scale)
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid_image(images).save(folder / f"step-{global_step:07d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images), global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation": [wandb.Image(img, caption=data.id2label[i]) for i, img in zip(class_ids, images)]}
            )


def plot_loss_curves(history: LossHistory, path: Path) -> None:
    """Every logged loss term against the step, one panel per group that was logged (sit/, vae/, the KL, decoder/
    (trained alone after the freeze), disc/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the KL (summed over latent elements) dwarfs the other VAE terms: it gets its own panel
    groups = {
        "sit": lambda k: k.startswith("sit/"),
        "vae": lambda k: k.startswith("vae/") and k != "vae/kl",
        "vae/kl": lambda k: k == "vae/kl",
        "decoder": lambda k: k.startswith("decoder/"),
        "disc": lambda k: k.startswith("disc/"),
    }
    logged = {k for r in history.records for k in r}
    panels = {name: sorted(filter(selected, logged)) for name, selected in groups.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    steps = [r["step"] for r in history.records]
    for axis, (name, keys) in zip(axes[0], panels.items()):
        for key in keys:
            axis.plot(steps, [r.get(key, float("nan")) for r in history.records], label=key.split("/", 1)[1])
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
