"""SiT speed: forward and train step for the tiny / B/2 / XL/2 recipes, FLOPs, FLOP/s, MFU, peak memory,
and the model-level optimisations (SDPA vs naive attention, conditioning once vs per block, bf16, compile).

    .venv/bin/python benchmarks/bench_sit.py [--quick] [--configs tiny,B,XL] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import time
import types

import torch
import torch.nn.functional as F

from common import (
    CONFIGS,
    Table,
    add_sit_args,
    build_sit,
    device_peak_flops,
    make_forward,
    make_train_step,
    max_abs_diff,
    measure,
    measure_pair,
    meta_flops,
    peak_memory,
    speedup,
    suite_main,
)
from diffusers_repae.models.transformer_sit import SiTAttention, modulate

# Batch per config: CPU batches keep SiT-XL/2 fwd+bwd under ~6 GB; CUDA batches are training-sized.
CPU_BATCH = {"tiny": 8, "B": 1, "XL": 1}
CUDA_BATCH = {"tiny": 256, "B": 64, "XL": 32}


def sit_inputs(model, batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator)
    t = torch.rand(batch, generator=generator)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=generator)
    return {"x": x.to(device), "t": t.to(device), "y": y.to(device)}


def sit_speed_table(args, device: torch.device, precision: str) -> Table:
    """Forward and train step per config: time, throughput, FLOPs, FLOP/s, MFU and peak memory."""
    peak = device_peak_flops(device)
    table = Table(
        f"SiT forward / train step ({device.type}, {precision})",
        [
            "config",
            "params_M",
            "batch",
            "tokens",
            "pass",
            "ms",
            "ms_per_img",
            "img_per_s",
            "GFLOP_per_img",
            "TFLOP_per_s",
            "MFU",
            "peak_mem_MiB",
        ],
    )
    configs = ["tiny"] if args.quick else args.configs.split(",")
    for config in configs:
        if config not in CONFIGS:
            raise ValueError(f"--configs entries must be in {sorted(CONFIGS)}, got {config!r}.")
        batch = 2 if args.quick else (CUDA_BATCH if device.type == "cuda" else CPU_BATCH)[config]
        flops = meta_flops(config, batch)
        model, projector = build_sit(config, device, args.seed)
        inputs = sit_inputs(model, batch, device, args.seed)
        big_on_cpu = config == "XL" and device.type == "cpu"
        # SiT-XL/2 on CPU: one timed call, and no AdamW: its state would add 5.4 GB (params + grads + 2 moments
        # > 8 GB), so fwd+bwd only there.
        repeats = args.repeats
        optimizer = None
        if not big_on_cpu:
            params = list(model.parameters()) + list(projector.parameters())
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        model.train()
        projector.train()
        passes = [
            ("forward", make_forward(model, inputs, device, precision)),
            (
                "train_step" if optimizer else "fwd+bwd",
                make_train_step(model, projector, inputs, device, precision, optimizer),
            ),
        ]
        tokens = (model.config.sample_size // model.config.patch_size) ** 2
        for name, fn in passes:
            # First call: peak memory (gradients and optimiser state are allocated here) and warm-up; for
            # SiT-XL/2 on CPU it is also the one timed call (it includes the first touch of the gradients).
            first: list = []
            mem, method = peak_memory(lambda fn=fn, first=first: first.append(measure(fn, device, 1, 0)), device)
            if big_on_cpu:
                timing = first[0]
            else:
                timing = measure(fn, device, repeats=repeats, warmup=max(0, args.warmup - 1))
            achieved = flops[name != "forward"] / timing.median
            table.add(
                config=f"{config} ({CONFIGS[config]})",
                params_M=sum(p.numel() for p in model.parameters()) / 1e6,
                batch=batch,
                tokens=tokens,
                **{"pass": name},
                ms=timing.median * 1e3,
                ms_per_img=timing.median * 1e3 / batch,
                img_per_s=batch / timing.median,
                GFLOP_per_img=flops[name != "forward"] / batch / 1e9,
                TFLOP_per_s=achieved / 1e12,
                MFU=None if peak is None else achieved / peak,
                peak_mem_MiB=mem,
            )
        if f"peak memory: {method}" not in table.notes:
            table.notes.append(f"peak memory: {method}")
        del model, projector, optimizer
    table.notes.append(
        "FLOPs from torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; CPU SDPA registered here). "
        "train_step = forward with REPA hidden states + projector + losses + backward + AdamW; "
        "fwd+bwd = the same without the optimiser (SiT-XL/2 on CPU, to stay under 8 GB)."
    )
    if device.type == "cpu":
        table.notes.append(
            "CPU peak memory = growth of the process RSS during the first call (glibc free lists trimmed before), "
            "gradients and optimiser state included; weights are not."
        )
    if peak is not None:
        table.notes.append(f"MFU against a dense bf16 peak of {peak / 1e12:.0f} TFLOP/s.")
    return table


def naive_attention_forward(self: SiTAttention, x: torch.Tensor) -> torch.Tensor:
    """The textbook ``softmax(QK^T / sqrt(d)) V``, materialising the attention matrix ("before")."""
    batch, tokens, dim = x.shape
    q, k, v = (
        linear(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        for linear in (self.to_q, self.to_k, self.to_v)
    )
    q, k = self.q_norm(q), self.k_norm(k)
    weights = (q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))).softmax(dim=-1)
    return self.to_out[0]((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


def use_naive_attention(model, naive: bool) -> None:
    for module in model.modules():
        if isinstance(module, SiTAttention):
            if naive:
                module.forward = types.MethodType(naive_attention_forward, module)
            elif "forward" in module.__dict__:
                del module.forward


def attention_op_row(shape: tuple[int, int, int, int], device: torch.device, repeats: int, warmup: int) -> dict:
    """The attention op alone (batch, heads, tokens, head_dim): in a whole SiT forward it is a few % of the time."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator).to(device) for _ in range(3))
    scale = 1.0 / math.sqrt(shape[-1])

    def naive():
        return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v)

    before, after = measure_pair(naive, sdpa, device, max(repeats, 5), warmup)
    return {
        "optimisation": f"attention op only {list(shape)}",
        "before": "naive softmax(QK^T)V",
        "after": "SDPA",
        "before_ms": before.median * 1e3,
        "after_ms": after.median * 1e3,
        "speedup": speedup(before, after),
        "max_abs_diff": max_abs_diff(naive(), sdpa()),
    }


def forward_conditioning_per_block(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The SiT forward with ``SiLU(t_emb + y_emb)`` recomputed inside every block ("before")."""
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    for block in model.transformer_blocks:
        tokens = block(tokens, model.embed_conditioning(t, y))
    shift, scale = model.adaln_out(model.embed_conditioning(t, y)).chunk(2, dim=1)
    return model.unpatchify(model.proj_out(modulate(model.norm_out(tokens), shift, scale)))


def optimisation_table(args, device: torch.device) -> Table:
    """Before/after pairs of the model-level optimisations, timed interleaved on one config."""
    config = "tiny" if args.quick else args.opt_config
    model, projector = build_sit(config, device, args.seed)
    model.eval()
    batch = 1 if args.quick or device.type == "cpu" else 32
    inputs = sit_inputs(model, batch, device, args.seed)
    x, t, y = inputs["x"], inputs["t"], inputs["y"]
    table = Table(
        f"SiT optimisations (SiT {config} = {CONFIGS[config]}, batch {batch}, forward, no grad, {device.type})",
        ["optimisation", "before", "after", "before_ms", "after_ms", "speedup", "max_abs_diff"],
    )
    reps = args.repeats

    def forward():
        with torch.no_grad():
            return model(x, t, y).sample

    def naive():
        use_naive_attention(model, True)
        try:
            return forward()
        finally:
            use_naive_attention(model, False)

    before, after = measure_pair(naive, forward, device, reps, args.warmup)
    table.add(
        optimisation="attention",
        before="naive softmax(QK^T)V",
        after="SDPA",
        before_ms=before.median * 1e3,
        after_ms=after.median * 1e3,
        speedup=speedup(before, after),
        max_abs_diff=max_abs_diff(naive(), forward()),
    )

    for shape in [(1, 3, 64, 64)] if args.quick else [(4, 12, 256, 64), (1, 16, 1024, 72)]:
        table.rows.append(attention_op_row(shape, device, reps, args.warmup))

    def per_block():
        with torch.no_grad():
            return forward_conditioning_per_block(model, x, t, y)

    before, after = measure_pair(per_block, forward, device, reps, args.warmup)
    table.add(
        optimisation="conditioning",
        before="per block",
        after="once per forward",
        before_ms=before.median * 1e3,
        after_ms=after.median * 1e3,
        speedup=speedup(before, after),
        max_abs_diff=max_abs_diff(per_block(), forward()),
    )

    if args.quick:  # the smoke run stops here
        return _finish(table)

    def bf16():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return model(x, t, y).sample

    # CPUs without bf16 matrix units emulate it (5-10x slower here): one interleaved pair shows the trend.
    cpu = device.type == "cpu"
    before, after = measure_pair(forward, bf16, device, 1 if cpu else reps, 0 if cpu else args.warmup)
    table.add(
        optimisation="bf16 autocast",
        before="fp32",
        after="bf16 autocast",
        before_ms=before.median * 1e3,
        after_ms=after.median * 1e3,
        speedup=speedup(before, after),
        max_abs_diff=max_abs_diff(forward(), bf16()),
    )
    if not cpu or args.bf16_train:  # ~100 s for SiT-B/2 fwd+bwd in emulated bf16 on CPU: opt-in there
        model.train()
        projector.train()
        step_fp32 = make_train_step(model, projector, inputs, device, "fp32")
        step_bf16 = make_train_step(model, projector, inputs, device, "bf16")
        before, after = measure_pair(step_fp32, step_bf16, device, reps, args.warmup)
        table.add(
            optimisation="bf16 autocast (fwd+bwd)",
            before="fp32",
            after="bf16 autocast",
            before_ms=before.median * 1e3,
            after_ms=after.median * 1e3,
            speedup=speedup(before, after),
        )
        model.eval()
    if not args.no_compile:
        table.rows.append(compile_row(model, x, t, y, device, reps))
    return _finish(table)


def _finish(table: Table) -> Table:
    table.notes.append("max_abs_diff: largest |before - after| of the predicted velocity (random non-zero adaLN).")
    table.notes.append("before/after timed interleaved (b, a, b, a, ...), median of repeats: load hits both alike.")
    return table


def compile_row(model, x, t, y, device: torch.device, repeats: int) -> dict:
    """torch.compile of the forward: compile time (first call) reported apart from the steady-state time."""
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad():
        compiled_out = compiled(x, t, y).sample
    compile_s = time.perf_counter() - start

    def eager():
        with torch.no_grad():
            return model(x, t, y).sample

    def fast():
        with torch.no_grad():
            return compiled(x, t, y).sample

    before, after = measure_pair(eager, fast, device, repeats, warmup=1)
    return {
        "optimisation": f"torch.compile (compile {compile_s:.1f} s)",
        "before": "eager",
        "after": "compiled",
        "before_ms": before.median * 1e3,
        "after_ms": after.median * 1e3,
        "speedup": speedup(before, after),
        "max_abs_diff": max_abs_diff(eager(), compiled_out),
    }


def run(args: argparse.Namespace, device: torch.device) -> list[Table]:
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return [sit_speed_table(args, device, precision), optimisation_table(args, device)]


if __name__ == "__main__":
    suite_main(__doc__, add_sit_args, run)
