"""Smoke test of the benchmark suite (``benchmarks/run_all.py --quick``): tables, rows and the numbers that can be
checked independently (FLOPs of the tiny SiT, evaluation counts of the samplers, before == after numerics).
No timing assertions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    sys.path.insert(0, str(BENCHMARKS))
    import run_all

    out = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:
        flags = ["--quick", "--no_compile", "--device", "cpu", "--threads", "1", "--json", str(out)]
        args = run_all.build_parser().parse_args(flags + ["--only", "sit,train,sampling"])
        tables = run_all.run(args)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCHMARKS))
    return {table.title.split(" (")[0]: table for table in tables}, json.loads(out.read_text())


def rows_by(table, key):
    return {row[key]: row for row in table.rows}


def tiny_sit_forward_flops() -> float:
    """FLOPs of one tiny-cpu SiT forward per image, written out from its config (2 FLOPs per multiply-add)."""
    d, layers, tokens, patch, channels, t_dim = 192, 6, 64, 2, 4, 256
    per_block = 2 * tokens * 12 * d * d + 4 * tokens * tokens * d + 2 * d * 6 * d  # linears, QK^T and AV, adaLN
    embed = 2 * tokens * channels * patch * patch * d + 2 * (t_dim * d + d * d)  # patch conv, timestep MLP
    final = 2 * d * 2 * d + 2 * tokens * d * patch * patch * channels  # final adaLN, output linear
    return layers * per_block + embed + final


def test_tables_and_rows(quick_run):
    tables, payload = quick_run
    assert set(tables) == {
        "SiT forward / train step",
        "SiT optimisations",
        "REPA-E train step by phase",
        "Training optimisations",
        "Sampling",
        "Sampling optimisations",
    }
    assert [t["title"] for t in payload["tables"]] == [t.title for t in tables.values()]
    sit = tables["SiT forward / train step"]
    assert [(r["config"], r["pass"]) for r in sit.rows] == [
        ("tiny (tiny-cpu)", "forward"),
        ("tiny (tiny-cpu)", "train_step"),
    ]
    assert [r["optimisation"] for r in tables["SiT optimisations"].rows] == [
        "attention",
        "attention op only [1, 3, 64, 64]",
        "conditioning",
    ]
    sys.path.insert(0, str(BENCHMARKS))  # run_all.py runs the suites as subprocesses: import the script here
    try:
        from bench_train_step import PHASES
    finally:
        sys.path.remove(str(BENCHMARKS))

    phases = [r["phase"] for r in tables["REPA-E train step by phase"].rows]
    assert phases == PHASES + ["total (sum of phase medians)", "library repae_step.train_step (whole)"]
    training = [r["optimisation"].split(" ")[0] for r in tables["Training optimisations"].rows]
    assert training == ["REPA", "EMA", "AdamW", "AdamW", "tiny"]
    sampling = [(r["sampler"], r["guidance"]) for r in tables["Sampling"].rows]
    assert len(sampling) == 10 and sampling[-1][0] == "(VAE decode)"
    assert [r["optimisation"] for r in tables["Sampling optimisations"].rows] == [
        "guidance interval [0, 0.65]",
        "guidance interval [0, 0.65]",
        "sampling state dtype",
        "sampling state dtype",
    ]
    printed = tables["Sampling"].format()
    assert printed.startswith("== Sampling") and "ms_per_step" in printed and "heun" in printed


def test_flop_count_matches_formula(quick_run):
    tables, _ = quick_run
    forward = rows_by(tables["SiT forward / train step"], "pass")["forward"]
    # Includes the attention FLOPs of the CPU SDPA kernel, which FlopCounterMode does not count by itself.
    assert forward["GFLOP_per_img"] * 1e9 == pytest.approx(tiny_sit_forward_flops(), rel=2e-3)
    train = rows_by(tables["SiT forward / train step"], "pass")["train_step"]
    assert 2.5 < train["GFLOP_per_img"] / forward["GFLOP_per_img"] < 3.5  # backward ~ 2x forward, plus projector


def test_sampler_evaluation_counts(quick_run):
    tables, _ = quick_run
    steps = 2  # --quick
    # per model evaluation, the time that decides whether it is guided (SPEC section 8): its own time, except
    # Heun's corrector at t_{i+1}, which follows its step's start t_i (evaluations at 1.0, 0.5, 0.5 -> 1.0, 1.0, 0.5)
    grids = {
        "euler": np.linspace(1, 0, steps + 1)[:-1],
        "heun": np.array([1.0, 1.0, 0.5]),
        "sde": np.linspace(1, 0.04, steps),
    }
    for row in tables["Sampling"].rows[:-1]:
        times = grids[row["sampler"]]
        assert row["NFE"] == len(times)
        if row["guidance"].startswith("none"):
            expected_rows = len(times)
        elif "always" in row["guidance"]:
            expected_rows = 2 * len(times)
        else:
            expected_rows = len(times) + int(((times >= 0) & (times <= 0.65)).sum())
        assert row["rows_per_img"] == expected_rows, row


def test_before_after_numerics(quick_run):
    tables, _ = quick_run
    sit = rows_by(tables["SiT optimisations"], "optimisation")
    assert sit["attention"]["max_abs_diff"] < 1e-5
    assert sit["attention op only [1, 3, 64, 64]"]["max_abs_diff"] < 1e-5
    assert sit["conditioning"]["max_abs_diff"] == 0
    training = tables["Training optimisations"].rows
    assert training[0]["max_abs_diff"] < 1e-6  # REPA loss: loop vs vectorised (loss and gradient)
    assert training[1]["max_abs_diff"] == 0  # foreach mul + add is bit-identical to the loop
    assert all(row["max_abs_diff"] < 1e-6 for row in training[2:4])  # AdamW variants
    for row in tables["Sampling optimisations"].rows:
        assert row["max_abs_diff"] is None or row["max_abs_diff"] < 1e-4
