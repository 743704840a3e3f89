"""Smoke test of ``benchmarks/bench_input_pipeline.py --quick``: the table's rows, every pass reads every image
once on both routes, the dataset it writes reads back as written (the Hub layout), and at full size its JPEGs are
about as large as ImageNet's. No timing assertions."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_input_pipeline", BENCHMARKS / "bench_input_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_table_and_counts(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench.main(["--quick", "--workers", "0,1", "--data_dir", str(tmp_path / "hub"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert [(r["route"], r["workers"]) for r in rows] == [("streamed", 0), ("streamed", 1), ("map", 0), ("map", 1)]
    quick = bench.QUICK
    for row in rows:
        assert row["images_per_pass"] == [quick["num_images"]] * quick["repeats"]  # every image once per pass
        assert row["img_per_s"] > 0 and row["img_per_cpu_s"] > 0
        assert row["img_per_s_per_worker"] == pytest.approx(row["img_per_s"] / max(1, row["workers"]))
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| route | DataLoader workers | img/s")
    assert len(lines) == 1 + len(rows)  # header + one line per measurement
    assert "`.venv/bin/python benchmarks/bench_input_pipeline.py --quick --workers 0,1" in printed
    assert "load average before" in printed
    assert json.loads(out.read_text())["rows"][0]["route"] == "streamed"


def test_written_dataset_reads_back_as_written(bench, tmp_path):
    from diffusers_repae.training.data import load_training_dataset

    info = bench.write_dataset(tmp_path / "hub", num_images=6, long_side=50, num_shards=3, num_classes=4)
    assert sorted(p.name for p in (tmp_path / "hub" / "data").iterdir()) == [
        f"train-0000{k}-of-00003.parquet" for k in range(3)
    ]
    data = load_training_dataset(dataset_name=str(tmp_path / "hub"), resolution=16, cache_dir=tmp_path / "hf")
    assert data.num_classes == 4 and len(data.dataset) == info["num_images"] == 6
    assert [int(data.dataset[i]["labels"]) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    raw = data.dataset.dataset  # the image column, still encoded: the JPEG shapes of SIZES, scaled
    shapes = [Image.open(io.BytesIO(raw[i]["image"]["bytes"])).size for i in range(6)]
    assert shapes == [(50, 38), (50, 38), (38, 50), (50, 33), (50, 38), (50, 38)]


def test_full_size_jpegs_are_imagenet_like(bench):
    rng = np.random.default_rng(0)
    sizes = [len(bench.synthetic_jpeg(rng, 500, 375, 90)) / 1e3 for _ in range(4)]
    assert 80 < np.mean(sizes) < 140  # ImageNet's train JPEGs: ~110 KB on average
    image = Image.open(io.BytesIO(bench.synthetic_jpeg(rng, 500, 375, 90)))
    assert image.format == "JPEG" and image.size == (500, 375)


def test_bad_flags_are_user_errors(bench, tmp_path):
    from diffusers_repae.cli import UserError

    with pytest.raises(UserError, match="--routes"):
        bench.main(["--quick", "--routes", "streamed,nope"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        bench.main(["--quick", "--data_dir", str(tmp_path / "full")])
