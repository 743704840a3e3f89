"""All benchmarks in one run (``make bench``): SiT speed, the REPA-E train step by phase, sampling, and the
before/after tables of every optimisation. Prints the tables; ``--json out.json`` also stores them. Each suite
runs as its own script in a subprocess, given the flags it takes (no benchmark script imports another).

    .venv/bin/python benchmarks/run_all.py [--quick] [--device auto|cpu|cuda] [--no_compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SUITES, Table, add_common_args, device_description, setup, write_json

HERE = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__))
    parser.add_argument(
        "--only",
        default="sit,train,sampling,ldm,estimate",
        help="Comma-separated suites to run, from sit, train, sampling, ldm (latent cache vs on-the-fly encoding), "
        "estimate (the FLOP-based H100 estimate).",
    )
    for _, add_args in SUITES.values():
        add_args(parser)
    return parser


def suite_argv(args: argparse.Namespace, add_args) -> list[str]:
    """The flags of ``args`` that one suite's own parser takes, those not at their default, as a command line."""
    argv = []
    for action in add_args(add_common_args(argparse.ArgumentParser()))._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in ("help", "json") or value == action.default:
            continue
        argv += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], str(value)]
    return argv


def run_suite(name: str, args: argparse.Namespace, folder: Path) -> list[Table]:
    """Runs one suite's script as a subprocess (it prints its own tables) and reads its tables back."""
    script, add_args = SUITES[name]
    out = folder / f"{name}.json"
    command = [sys.executable, str(HERE / script), *suite_argv(args, add_args), "--json", str(out)]
    returncode = subprocess.run(command).returncode
    if returncode:
        raise SystemExit(f"[{name}: {script} failed with exit status {returncode}]")
    return [Table(**table) for table in json.loads(out.read_text())["tables"]]


def run(args: argparse.Namespace) -> list[Table]:
    """Runs the chosen suites, one subprocess each, whose tables are printed as soon as they are ready."""
    suites = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise ValueError(f"--only: unknown suites {unknown}; allowed: {sorted(SUITES)}.")
    forwarded = argparse.Namespace(**vars(args))  # the flags as given, before setup() fills in the defaults
    device = setup(args)
    print(f"machine: {device_description(device)}", flush=True)
    print(f"command: {' '.join(sys.argv)}", flush=True)
    print(flush=True)
    tables: list[Table] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_") as folder:
        for name in suites:
            suite_start = time.perf_counter()
            tables += run_suite(name, forwarded, Path(folder))
            print(f"[{name}: {time.perf_counter() - suite_start:.0f} s]", flush=True)
            print(flush=True)
    print(f"total: {time.perf_counter() - start:.0f} s", flush=True)
    if args.json:
        write_json(args.json, tables, device, args)
    return tables


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    from diffusers_repae.cli import run_cli

    run_cli(main)
