"""Smoke test of benchmarks/bench_schedulers.py --quick: every (sampler, steps) row, NFE by the samplers' rules."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_run(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        import bench_schedulers
        from common import add_common_args, setup, write_json

        parser = bench_schedulers.add_args(add_common_args(argparse.ArgumentParser()))
        args = parser.parse_args(["--quick", "--device", "cpu", "--threads", "1"])
        device = setup(args)
        wide, detail = bench_schedulers.run(args, device)
        write_json(tmp_path / "out.json", [wide, detail], device, args)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCHMARKS))

    fd = "FD-EfficientNetLite0"
    # Heun evaluates twice per step except the last, the others once (a guided call is one batched call).
    nfe = {"euler": lambda n: n, "heun": lambda n: 2 * n - 1, "sde": lambda n: n, "dpmsolver++": lambda n: n}
    rows = {(r["sampler"], r["steps"]): r for r in detail.rows}
    assert set(rows) == {(s, 3) for s in nfe}
    for (sampler, steps), row in rows.items():
        assert row["NFE_per_image"] == nfe[sampler](steps), (sampler, steps)
        assert math.isfinite(row[fd]) and row[fd] >= 0
    assert [r["sampler"] for r in wide.rows] == list(nfe)
    assert wide.rows[1]["3 steps"] == rows[("heun", 3)][fd]
    payload = json.loads((tmp_path / "out.json").read_text())
    assert [t["title"] for t in payload["tables"]] == [wide.title, detail.title]
