"""Shared helpers of the benchmark scripts: device choice, timing, peak memory, FLOP counting, result tables, the
random SiT models the suites time, and the flags of the suites run_all.py runs (no benchmark script imports another).

Timings are medians over repeats after warm-up (CUDA is synchronised around every call). Peak memory on CUDA is
``torch.cuda.max_memory_allocated`` (tensors only); on CPU it is the peak *process RSS delta* sampled by a psutil
thread every millisecond (tracemalloc cannot see torch's allocations; RSS also counts allocator caches).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from diffusers_repae import build_component

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the CUDA device name.
CUDA_BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels only; count the CPU flash kernel the same way."""
    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:

        @register_flop_formula(forward)
        def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if backward is not None:

        @register_flop_formula(backward)
        def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


try:
    _register_cpu_sdpa_flops()
except (RuntimeError, ValueError):  # already registered (module reloaded)
    pass


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every benchmark script accepts."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda[:i].")
    parser.add_argument("--quick", action="store_true", help="Tiny configs and 1-2 repeats: a smoke run (seconds).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed repeats per measurement (median reported).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed warm-up calls before timing.")
    parser.add_argument("--json", default=None, help="Also write the tables to this JSON file.")
    parser.add_argument("--no_compile", action="store_true", help="Skip the torch.compile row (slow on CPU).")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads. Default on CPU: 1 (stable, comparable numbers; several OpenMP threads on a "
        "shared machine spin and run 2-3x slower); 0 keeps torch's default.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and inputs.")
    return parser


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is checked and returned."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asks for CUDA but torch.cuda.is_available() is False.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda[:i]', got {name!r}.")
    return device


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``/``--seed``, pick the device and fill the repeat defaults (quick vs full)."""
    device = resolve_device(args.device)
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.repeats is None:
        args.repeats = 1 if args.quick else (10 if device.type == "cuda" else 3)
    if args.warmup is None:
        args.warmup = 0 if args.quick else (3 if device.type == "cuda" else 1)
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Median / min / all wall times of one measured callable, in seconds."""

    median: float
    minimum: float
    times: list[float]


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` after ``warmup`` untimed calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), times)


def measure_pair(
    before: Callable[[], object], after: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
) -> tuple[Timing, Timing]:
    """Time two variants *interleaved* (b, a, b, a, ...) so that load from other processes hits both alike."""
    for _ in range(warmup):
        before()
        after()
    synchronize(device)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(max(1, repeats)):
        for fn, bucket in ((before, times[0]), (after, times[1])):
            start = time.perf_counter()
            fn()
            synchronize(device)
            bucket.append(time.perf_counter() - start)
    return tuple(Timing(statistics.median(t), min(t), t) for t in times)


class _RSSSampler(threading.Thread):
    """Polls the process RSS every ``interval`` seconds and keeps the maximum."""

    def __init__(self, interval: float = 1e-3):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def _release_freed_memory() -> None:
    """glibc keeps freed blocks for reuse; hand them back so that the RSS delta sees the call's real peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the delta may under-count memory reused from earlier work
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """Peak extra memory of one ``fn()`` call in MiB, and how it was measured."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda max_memory_allocated"
    import gc

    gc.collect()
    _release_freed_memory()
    sampler = _RSSSampler()
    base = sampler.process.memory_info().rss
    sampler.start()
    fn()
    peak = sampler.stop()
    return max(0, peak - base) / 2**20, "psutil RSS peak delta (1 ms sampling, after malloc_trim)"


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one ``fn()`` call by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a known CUDA device (for MFU); None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in CUDA_BF16_PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def device_description(device: torch.device) -> str:
    """One line naming the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


@dataclass
class Table:
    """A titled list of rows (dicts); printed as an aligned text table, stored as JSON."""

    title: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    def format(self) -> str:
        cells = [[_fmt(row.get(col)) for col in self.columns] for row in self.rows]
        widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(self.columns)]
        line = "  ".join(col.ljust(w) for col, w in zip(self.columns, widths))
        out = [f"== {self.title} ==", line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        if abs(value) >= 1e-3:
            return f"{value:.4f}"
        return f"{value:.2e}"
    return str(value)


def speedup(before: Timing, after: Timing) -> float:
    return before.median / after.median if after.median > 0 else float("nan")


def print_tables(tables: list[Table]) -> None:
    for table in tables:
        print(table.format(), flush=True)
        print(flush=True)


def write_json(path: str | Path, tables: list[Table], device: torch.device, args: argparse.Namespace) -> None:
    """All tables plus the machine and the flags, as one JSON document."""
    payload = {
        "machine": device_description(device),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
        "tables": [t.to_dict() for t in tables],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=float))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def suite_main(description: str, add_args: Callable, run: Callable) -> None:
    """Command-line entry point of one suite run on its own: parse, run, print, optionally write JSON; user errors
    end in one ``error: ...`` line (``diffusers_repae.cli.run_cli``)."""
    from diffusers_repae.cli import run_cli

    def main() -> None:
        args = add_args(add_common_args(argparse.ArgumentParser(description=description))).parse_args()
        device = setup(args)
        tables = run(args, device)
        print_tables(tables)
        if args.json:
            write_json(args.json, tables, device, args)

    run_cli(main)


# The SiT models and steps the suites share (bench_sit.py, bench_train_step.py, bench_sampling.py, estimate.py).

CONFIGS = {"tiny": "tiny-cpu", "B": "sit-b-2-sdvae", "XL": "sit-xl-2-sdvae"}


def randomize_zero_init(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Give the adaLN-Zero / output layers random weights: at init they are zero and the output is trivially 0,
    which would hide any numerical difference between two implementations."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * std)
    return model


def build_sit(config: str, device: torch.device, seed: int = 0):
    """Random SiT + REPA projector of a recipe (non-trivial weights), on ``device``."""
    torch.manual_seed(seed)
    recipe = CONFIGS[config]
    model = randomize_zero_init(build_component(recipe, "transformer"), seed=seed).to(device)
    projector = build_component(recipe, "projector").to(device)
    return model, projector


def autocast(device: torch.device, precision: str):
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_forward(model, inputs: dict, device: torch.device, precision: str):
    """A no-grad velocity prediction (what one sampling step costs, without guidance)."""

    def forward():
        with torch.no_grad(), autocast(device, precision):
            return model(inputs["x"], inputs["t"], inputs["y"]).sample

    return forward


def make_train_step(model, projector, inputs: dict, device: torch.device, precision: str, optimizer=None):
    """Forward (with hidden states for REPA) + denoising and alignment loss + backward (+ optimiser step)."""
    cfg = model.config
    depth = projector.config.encoder_depth
    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    generator = torch.Generator().manual_seed(1)
    batch = inputs["x"].shape[0]
    zs = [torch.randn(batch, tokens, z, generator=generator).to(device) for z in projector.config.z_dims]
    target = torch.randn(inputs["x"].shape, generator=generator).to(device)

    def step():
        with autocast(device, precision):
            out = model(inputs["x"], inputs["t"], inputs["y"], return_hidden_states_at=depth)
            projected = projector(out.hidden_states)
        denoise = (out.sample.float() - target).pow(2).mean()
        proj = torch.stack(
            [-(F.normalize(z, dim=-1) * F.normalize(p.float(), dim=-1)).sum(-1).mean() for z, p in zip(zs, projected)]
        ).mean()
        (denoise + 0.5 * proj).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            for p in list(model.parameters()) + list(projector.parameters()):
                p.grad = None

    return step


def meta_flops(config: str, batch: int) -> tuple[int, int]:
    """FLOPs of (forward, train step) counted on a meta-device copy: exact shapes, no compute, no memory."""
    meta = torch.device("meta")
    with meta:
        recipe = CONFIGS[config]
        model = build_component(recipe, "transformer").train()
        projector = build_component(recipe, "projector").train()
        cfg = model.config
        inputs = {
            "x": torch.empty(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            "t": torch.empty(batch),
            "y": torch.zeros(batch, dtype=torch.long),
        }
    forward = count_flops(make_forward(model, inputs, meta, "fp32"))
    return forward, count_flops(make_train_step(model, projector, inputs, meta, "fp32"))


def profile_call(fn, device: torch.device) -> tuple[int, float, str]:
    """FLOPs and peak memory of one call (also serves as the warm-up)."""
    holder = {}
    mem, method = peak_memory(lambda: holder.setdefault("flops", count_flops(fn)), device)
    return holder["flops"], mem, method


# The flags of the suites that run_all.py runs, here so that run_all.py builds one parser without importing the
# scripts; each script takes its own with ``suite_main`` and run_all.py runs it as a subprocess.


def add_sit_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--bf16_train", action="store_true", help="Also time bf16 fwd+bwd on CPU (slow without bf16 hardware)."
    )
    parser.add_argument("--configs", default="tiny,B,XL", help="Comma-separated SiT configs from tiny, B, XL.")
    parser.add_argument("--opt_config", default="B", choices=sorted(CONFIGS), help="SiT of the optimisation pairs.")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, fp32 on CPU."
    )
    return parser


def add_train_step_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--train_batch_size", type=int, default=8, help="Images per tiny-recipe training step.")
    parser.add_argument(
        "--ema_config", default="B", choices=["tiny", "B", "XL"], help="SiT config of the EMA and AdamW rows."
    )
    return parser


def add_sampling_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--steps", type=int, default=10, help="Sampler steps N (Heun uses 2N - 1 evaluations).")
    parser.add_argument("--sample_batch_size", type=int, default=4, help="Images per pipeline call.")
    return parser


def add_ldm_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return parser


def add_estimate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--mfu", default="0.35,0.40", help="Comma-separated assumed MFUs for the H100 estimate.")
    return parser


# run_all.py's suites: name -> (script in this folder, its own flags)
SUITES = {
    "sit": ("bench_sit.py", add_sit_args),
    "train": ("bench_train_step.py", add_train_step_args),
    "sampling": ("bench_sampling.py", add_sampling_args),
    "ldm": ("bench_ldm_data.py", add_ldm_data_args),
    "estimate": ("estimate.py", add_estimate_args),
}
