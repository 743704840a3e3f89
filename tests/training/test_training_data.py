"""Data loading: ADM crop, odd/corrupt images, image folders, streaming shards, OpenMoji, determinism."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_repae.training.data import build_dataloader, load_training_dataset
from diffusers_repae.training.images import adm_center_crop, to_rgb
from diffusers_repae.training.openmoji import (
    EMOJI_GROUPS,
    OPENMOJI_ATTRIBUTION,
    EmojiRenderer,
    list_openmoji_emoji,
    openmoji_class_counts,
)
from diffusers_repae.training_args import add_data_args, training_data_from_args


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_adm_center_crop_matches_hand_computed_chain():
    image = _noise_image(600, 400)
    # By hand for size 64: halve while short side >= 128: 400 -> 200 -> 100 (600 -> 300 -> 150);
    # bicubic so the short side is 64: 150 * 64 / 100 = 96 -> (96, 64); crop x from (96 - 64) // 2 = 16.
    expected = image.resize((300, 200), Image.BOX).resize((150, 100), Image.BOX)
    expected = expected.resize((96, 64), Image.BICUBIC).crop((16, 0, 80, 64))
    np.testing.assert_array_equal(np.array(adm_center_crop(image, 64)), np.array(expected))


def test_adm_center_crop_portrait_and_upscale():
    image = _noise_image(50, 81, seed=1)
    # Short side 50 < 2*64: no halving; bicubic to (64, round(81 * 64 / 50) = 104); crop y from 20.
    expected = image.resize((64, 104), Image.BICUBIC).crop((0, 20, 64, 84))
    np.testing.assert_array_equal(np.array(adm_center_crop(image, 64)), np.array(expected))
    same = _noise_image(64, 64, seed=2)
    np.testing.assert_array_equal(np.array(adm_center_crop(same, 64)), np.array(same))
    with pytest.raises(ValueError, match="size"):
        adm_center_crop(same, 0)


def test_to_rgb_composites_alpha_on_white_and_rescales_16_bit():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgb = np.array(to_rgb(rgba))
    assert rgb[1, 1].tolist() == [255, 255, 255]
    assert rgb[0, 0].tolist() == [10, 20, 30]
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.array(to_rgb(deep)).min() == 255


def _write_odd_folder(root) -> dict[str, int]:
    """Two classes with every kind of odd file; returns the expected skip counts."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    _noise_image(40, 30).save(root / "cats" / "rgb.png")
    _noise_image(40, 30).convert("L").save(root / "cats" / "gray.png")
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(root / "cats" / "transparent.png")
    _noise_image(32, 32).convert("P").save(root / "cats" / "palette.png")
    _noise_image(32, 32).convert("CMYK").save(root / "dogs" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(root / "dogs" / "deep.png")
    _noise_image(4, 4).save(root / "dogs" / "tiny.png")
    full = root / "dogs" / "full.png"
    _noise_image(64, 64).save(full)
    (root / "dogs" / "truncated.png").write_bytes(full.read_bytes()[:200])
    (root / "dogs" / "garbage.png").write_bytes(b"this is not an image at all")
    return {"too_small": 1, "unreadable": 1, "truncated": 1}


def test_image_folder_converts_and_skips_odd_images(tmp_path):
    expected_skips = _write_odd_folder(tmp_path / "data")
    data = load_training_dataset(train_data_dir=tmp_path / "data", resolution=16, cache_dir=tmp_path / "hf")
    assert data.num_classes == 2 and data.id2label == {0: "cats", 1: "dogs"}
    samples = [data.dataset[i] for i in range(len(data.dataset))]
    for sample in samples:
        assert sample["pixel_values"].dtype == torch.uint8 and sample["pixel_values"].shape == (3, 16, 16)
        assert sample["labels"].dtype == torch.int64
    # Each bad file is counted once: by its own index, which is served the next readable image instead.
    assert sum(int(s["num_skipped"]) for s in samples) == sum(expected_skips.values())
    assert dict(data.counter.skipped) == expected_skips
    assert {"L", "RGBA", "P", "CMYK", "I;16"} <= set(data.counter.converted)
    good_labels = [int(s["labels"]) for s in samples if int(s["num_skipped"]) == 0]
    assert good_labels.count(0) == 4 and good_labels.count(1) == 3
    transparent = [s for s in samples if int(s["pixel_values"].float().min()) == 255]
    assert transparent, "the fully transparent image must come out white"


def test_dataloader_order_is_seeded_and_flips_are_deterministic(tmp_path):
    root = tmp_path / "data"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            _noise_image(20, 20, seed=10 * c + i).save(root / f"c{c}" / f"{i}.png")

    def order(seed: int) -> list[torch.Tensor]:
        data = load_training_dataset(
            train_data_dir=root, resolution=16, random_flip=True, seed=seed, cache_dir=tmp_path / "hf"
        )
        return [batch["pixel_values"] for batch in build_dataloader(data, batch_size=4, seed=seed)]

    first, again, other = order(0), order(0), order(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_streaming_shards_are_disjoint_and_complete(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(root / "a" / f"{i}.png")
    seen = []
    for rank in range(2):
        data = load_training_dataset(
            train_data_dir=root,
            resolution=16,
            streaming=True,
            seed=3,
            process_index=rank,
            num_processes=2,
            cache_dir=tmp_path / "hf",
        )
        assert data.streaming
        seen.append(sorted(int(s["pixel_values"][0, 0, 0]) for s in data.dataset))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [i * 20 for i in range(8)]


def test_openmoji_subset_renders_loads_and_matches_direct_render(tmp_path):
    data = load_training_dataset(resolution=32, cache_dir=tmp_path, embedded_limit=27)
    assert data.num_classes == len(EMOJI_GROUPS) == 9
    assert data.attribution == OPENMOJI_ATTRIBUTION and "CC BY-SA 4.0" in data.attribution
    assert len(data.dataset) == 27
    entries = list_openmoji_emoji(limit=27)
    renderer = EmojiRenderer(32)
    for index in (0, 13, 26):
        sample = data.dataset[index]
        direct = np.array(renderer.render(entries[index].text)).transpose(2, 0, 1)
        np.testing.assert_array_equal(sample["pixel_values"].numpy(), direct)
        assert data.id2label[int(sample["labels"])] == entries[index].group
    labels = {int(data.dataset[i]["labels"]) for i in range(27)}
    assert len(labels) >= 7  # an evenly spread subset covers (nearly) every group
    sub = load_training_dataset(resolution=32, cache_dir=tmp_path, embedded_limit=27, embedded_label_by="subgroup")
    assert sub.num_classes > 90


def test_openmoji_full_list_counts():
    counts = openmoji_class_counts("group")
    assert set(counts) == set(EMOJI_GROUPS)
    assert sum(counts.values()) == len(list_openmoji_emoji()) > 1800


def test_add_data_args_and_bad_values(tmp_path):
    parser = add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(["--resolution", "64", "--random_flip", "--cache_dir", str(tmp_path)])
    assert args.resolution == 64 and args.random_flip and args.dataset_name is None
    assert args.embedded_label_by == "group"
    with pytest.raises(SystemExit):
        parser.parse_args(["--embedded_label_by", "colour"])
    args.resolution = 40
    with pytest.raises(ValueError, match="multiple of 16"):
        training_data_from_args(args)
    with pytest.raises(ValueError, match="ImageNet"):
        load_training_dataset(dataset_name="ILSVRC/imagenet-1k", resolution=128)
    with pytest.raises(ValueError, match="not both"):
        load_training_dataset(dataset_name="x", train_data_dir=tmp_path)


def test_accelerate_config_files_parse():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[2] / "training" / "configs"
    configs = {path.stem: load_config_from_file(str(path)) for path in folder.glob("*.yaml")}
    assert {"single_gpu", "cpu", "multi_gpu_8x_bf16", "multi_node_2x8", "fsdp_8x_bf16"} <= set(configs)
    assert configs["multi_gpu_8x_bf16"].num_processes == 8 and configs["multi_gpu_8x_bf16"].mixed_precision == "bf16"
    assert configs["multi_node_2x8"].num_machines == 2 and configs["multi_node_2x8"].num_processes == 16
    assert configs["fsdp_8x_bf16"].fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "SiTBlock"


def test_streaming_resume_from_state_dict(tmp_path):
    """A stream restored from a position mid-window continues with exactly the rows the first one went on with."""
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(root / "a" / f"{i}.png")

    def stream():
        data = load_training_dataset(
            train_data_dir=root, resolution=16, streaming=True, seed=7, shuffle_buffer_size=2, cache_dir=tmp_path
        )
        return data.dataset

    first = stream()
    iterator = iter(first)
    head = [int(next(iterator)["pixel_values"][0, 0, 0]) for _ in range(5)]
    state = first.state_dict()
    rest = [int(s["pixel_values"][0, 0, 0]) for s in iterator]
    assert sorted(head + rest) == [i * 20 for i in range(12)]
    resumed = stream()
    resumed.load_state_dict(state)
    again = [int(s["pixel_values"][0, 0, 0]) for s in resumed]
    assert again == rest  # windows of 2 rows: the state was taken inside the third window
