"""The tiny training fixture the CLI tests share: a 2-class image folder and a shrunken tiny-cpu recipe."""

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_tiny_setup(root: Path, images_per_class: int = 6, side: int = 40) -> Path:
    """``root/images/{red,blue}/i.png`` (random images with one saturated channel) and ``root/recipe``: tiny-cpu
    shrunk to 32 px, 8x8x4 latents, 16 tokens, a 2-block SiT of width 32. Returns ``root``."""
    rng = np.random.default_rng(0)
    for channel, name in ((0, "red"), (2, "blue")):
        folder = root / "images" / name
        folder.mkdir(parents=True)
        for i in range(images_per_class):
            array = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            array[..., channel] = 230
            Image.fromarray(array).save(folder / f"{i}.png")
    recipe = root / "recipe"
    shutil.copytree(REPO / "pipelines" / "tiny-cpu", recipe)

    def edit(component, **changes):
        path = recipe / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    edit("transformer", hidden_size=32, num_layers=2, num_attention_heads=2, sample_size=8)
    edit("vae", block_out_channels=[8, 16, 16], norm_num_groups=8, sample_size=32)
    edit("projector", hidden_size=32, projector_dim=32, encoder_depth=1)
    return root
