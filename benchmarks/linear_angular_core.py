"""Linear-angular attention core against its matmul floor and SDPA softmax (issue 9).

Inference (default): for each token count N, in one process and interleaved
(:func:`attnbench.measure.time_interleaved`: warm-up, then round-robin blocks, median), under
``torch.inference_mode()``, q, k, v of shape (B, h, N, d) float32:

- ``matmuls``       q (k^T v): the two matmuls alone, the floor;
- ``sdpa``          ``F.scaled_dot_product_attention`` (softmax attention);
- ``fast``          the fast linear-angular core with the official 9-tap DWConv (the inference form);
- ``fast-kernel``   the same without the DWConv residual;
- ``reference``     the plain reference core with the DWConv (``F.normalize`` x3, ``F.conv2d``);
- ``reference-kernel`` the same without the DWConv;
- ``compile``       the fast core under ``torch.compile`` (skipped with ``--no-compile``; timed
                    only if it really compiled, i.e. did not fall back to eager).

and prints each time as a ratio to ``matmuls`` and to ``sdpa``.

Training (``--training``): forward + backward (grads of q, k, v and the DWConv weight) of
Castling's core with the auxiliary masked-softmax branch on, against SDPA forward + backward
plus the linear-angular core's forward + backward.

    python benchmarks/linear_angular_core.py                      # CPU, 2 threads, 197..12545 tokens
    python benchmarks/linear_angular_core.py --no-compile         # eager paths only (no compile time)
    python benchmarks/linear_angular_core.py --training --tokens 197,785
    python benchmarks/linear_angular_core.py --device cuda --json results/la_core_cuda.json

Timings on a shared machine are noisy: compare ratios from one process, repeat across processes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from attnbench import allocator, measure, provenance
from attnbench_variants.castling import CastlingAttention
from attnbench_variants.linear_angular import LinearAngularAttention
from attnbench_variants.ops import linear_angular as la


def _qkv(batch, heads, tokens, head_dim, device, requires_grad=False):
    g = torch.Generator().manual_seed(tokens)
    return tuple(torch.randn(batch, heads, tokens, head_dim, generator=g).to(device).requires_grad_(requires_grad)
                 for _ in range(3))


def inference_callables(tokens, args) -> dict[str, tuple[Callable, tuple]]:
    q, k, v = _qkv(args.batch, args.heads, tokens, args.head_dim, args.device)
    weight = (0.1 * torch.randn(args.heads, 1, 9, 1, generator=torch.Generator().manual_seed(0))).to(args.device)
    calls = {
        "matmuls": (lambda q, k, v: q @ (k.transpose(-2, -1) @ v), (q, k, v)),
        "sdpa": (F.scaled_dot_product_attention, (q, k, v)),
        "fast": (lambda q, k, v: la.linear_angular_fast(q, k, v, conv_weight=weight), (q, k, v)),
        "fast-kernel": (la.linear_angular_fast, (q, k, v)),
        "reference": (lambda q, k, v: la.linear_angular_naive(q, k, v, conv_weight=weight), (q, k, v)),
        "reference-kernel": (la.linear_angular_naive, (q, k, v)),
    }
    if args.compile:
        def compiled(q, k, v):
            with la.use_impl("compile"):
                return la.linear_angular(q, k, v, conv_weight=weight)
        with torch.inference_mode():
            compiled(q, k, v)                         # compiles this shape (or falls back, warning)
        if not la.compile_fell_back():
            calls["compile"] = (compiled, (q, k, v))
    expected = la.linear_angular_naive(q, k, v, conv_weight=weight)
    for name in ("fast", "compile"):
        if name in calls:
            with torch.inference_mode():
                err = (calls[name][0](q, k, v) - expected).abs().max().item()
            print(f"  N={tokens} {name}: max |out - reference| = {err:.2e}", file=sys.stderr)
    return calls


def training_callables(tokens, args) -> dict[str, tuple[Callable, tuple]]:
    dim = args.heads * args.head_dim
    torch.manual_seed(0)
    castling = CastlingAttention(dim, args.heads, mask_schedule="fixed").to(args.device).train()
    linear = LinearAngularAttention(dim, args.heads).to(args.device).train()
    q, k, v = _qkv(args.batch, args.heads, tokens, args.head_dim, args.device, requires_grad=True)
    grad = torch.randn_like(q)

    def step(core, impl="fast"):
        def run(q, k, v):
            # time_interleaved times under inference_mode; a training step leaves it.
            with torch.inference_mode(False), torch.enable_grad(), la.use_impl(impl):
                for t in (q, k, v, *castling.parameters(), *linear.parameters()):
                    t.grad = None
                core(q, k, v).backward(grad)
        return run

    return {
        "castling": (step(lambda q, k, v: castling.attend(q, k, v, None)), (q, k, v)),
        "castling-ref": (step(lambda q, k, v: castling.attend(q, k, v, None), "reference"), (q, k, v)),
        "sdpa": (step(F.scaled_dot_product_attention), (q, k, v)),
        "linear-angular": (step(lambda q, k, v: linear.attend(q, k, v, None)), (q, k, v)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default=None, help="comma-separated token counts "
                        "(default 197,785,3137,12545; training 197,785)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, set explicitly (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=21, help="timed blocks per callable (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the torch.compile path (inference; default on)")
    parser.add_argument("--training", action="store_true", help="forward+backward of Castling's training form")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here (e.g. results/...)")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in (args.tokens or ("197,785" if args.training else "197,785,3137,12545")).split(",")]
    torch.set_num_threads(args.threads)
    allocator.tune_malloc()   # as the attnbench command does; ATTNBENCH_MALLOC=system keeps glibc's defaults

    rows = []
    for n in tokens:
        calls = (training_callables if args.training else inference_callables)(n, args)
        times = measure.time_interleaved(calls, threads=args.threads, warmup=args.warmup,
                                         repeats=args.repeats, device=args.device)
        row = {"tokens": n, **{f"{name}_ms": t.median_ms for name, t in times.items()},
               **{f"{name}_iqr_pct": t.iqr_pct for name, t in times.items()}}
        if args.training:
            budget = times["sdpa"].median_ms + times["linear-angular"].median_ms
            row["castling_vs_sdpa_plus_la"] = times["castling"].median_ms / budget
            row["castling_ref_vs_sdpa_plus_la"] = times["castling-ref"].median_ms / budget
        else:
            for name, t in times.items():
                row[f"{name}_vs_matmuls"] = t.median_ms / times["matmuls"].median_ms
                row[f"{name}_vs_sdpa"] = t.median_ms / times["sdpa"].median_ms
        rows.append(row)
        print(_format(row, list(times), args.training), flush=True)

    env = provenance.environment(args.device, args.threads)
    print(f"# {env['device_name']}, {args.threads} threads, torch {env['torch_version']}, B={args.batch} "
          f"h={args.heads} d={args.head_dim} float32, median of {args.repeats} interleaved blocks, "
          f"allocator: {env['allocator']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "environment": env,
                                         "rows": rows}, indent=2, default=str))
    return 0


def _format(row, names, training) -> str:
    n = row["tokens"]
    parts = [f"N={n:>6}"]
    for name in names:
        parts.append(f"{name} {row[f'{name}_ms']:.3g} ms (±{row[f'{name}_iqr_pct'] / 2:.0f}%)")
    if training:
        parts.append(f"castling / (sdpa + linear-angular) = {row['castling_vs_sdpa_plus_la']:.2f} "
                     f"(reference: {row['castling_ref_vs_sdpa_plus_la']:.2f})")
    else:
        for name in names:
            if name not in ("matmuls", "sdpa"):
                parts.append(f"{name}: {row[f'{name}_vs_matmuls']:.2f}x matmuls, "
                             f"{row[f'{name}_vs_sdpa']:.3f}x sdpa")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
