"""All benchmarks in one run (``make bench``): SiT speed, the REPA-E train step by phase, sampling, and the
before/after tables of every optimisation. Prints the tables; ``--json out.json`` also stores them.

    .venv/bin/python benchmarks/run_all.py [--quick] [--device auto|cpu|cuda] [--no_compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time

import bench_ldm_data
import bench_sampling
import bench_sit
import bench_train_step
import estimate
from common import Table, add_common_args, device_description, print_tables, setup, write_json

SUITES = {
    "sit": bench_sit,
    "train": bench_train_step,
    "sampling": bench_sampling,
    "ldm": bench_ldm_data,
    "estimate": estimate,
}


def build_parser() -> argparse.ArgumentParser:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__))
    parser.add_argument(
        "--only",
        default="sit,train,sampling,ldm,estimate",
        help="Comma-separated suites to run, from sit, train, sampling, ldm (latent cache vs on-the-fly encoding), "
        "estimate (the FLOP-based H100 estimate).",
    )
    for module in SUITES.values():
        module.add_args(parser)
    return parser


def run(args: argparse.Namespace) -> list[Table]:
    """Runs the chosen suites, printing each suite's tables as soon as they are ready."""
    device = setup(args)
    suites = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise ValueError(f"--only: unknown suites {unknown}; allowed: {sorted(SUITES)}.")
    print(f"machine: {device_description(device)}", flush=True)
    print(f"command: {' '.join(sys.argv)}", flush=True)
    print(flush=True)
    tables: list[Table] = []
    start = time.perf_counter()
    for name in suites:
        suite_start = time.perf_counter()
        suite_tables = SUITES[name].run(args, device)
        print_tables(suite_tables)
        print(f"[{name}: {time.perf_counter() - suite_start:.0f} s]", flush=True)
        print(flush=True)
        tables += suite_tables
    print(f"total: {time.perf_counter() - start:.0f} s", flush=True)
    if args.json:
        write_json(args.json, tables, device, args)
    return tables


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    from diffusers_repae.cli import run_cli

    run_cli(main)
