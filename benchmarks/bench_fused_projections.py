"""Fused projections (issue 22, item 1): does one GEMM over concatenated weights beat the separate ones?

For each model shape, on R token rows, the two groups of projections that read the same input:
  qkv      q = x Wq^T, k = x Wk^T, v = x Wv^T     vs  one x [Wq; Wk; Wv]^T
  gate/up  a = x W1^T, b = x W3^T                 vs  one x [W1; W3]^T
forward, and the input-gradient of the frozen base's backward:
  qkv      dq Wq + dk Wk + dv Wv                  vs  one [dq, dk, dv] [Wq; Wk; Wv]
  gate/up  da W1 + db W3                          vs  one [da, db] [W1; W3]
(the base is frozen: no weight gradient). The fused forward's output is used as it comes (the q/k/v and gate/up
slices are views of it), and the fused backward's gradient is taken as already concatenated, so the fused side
is timed at its best case: what a fused layout could gain at most. Times are medians of round-robin rounds
(_common.bench_group); the ratio is separate / fused (> 1: fusing wins). The closing lines give the per-layer
and per-step difference (forward + backward, every layer adapted) against the step's whole matmul work.

    python benchmarks/bench_fused_projections.py [--device cpu|cuda] [--rows R] [--dtype float32|bfloat16]
        [--shapes smollm2-135m,tinyllama-1.1b] [--iters N] [--json out.json]
Defaults: CPU fp32, 512 rows (bench_e2e's batch 4 x 128), SmolLM2-135M and TinyLlama-1.1B; CUDA bf16, 2048 rows
(batch 4 x 512), plus LLaMA-7B.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Table, bench_group, common_args  # noqa: E402

from lladapter_ext.model import config_from_preset  # noqa: E402


def groups(c) -> dict[str, list[int]]:
    """Output widths of the projections that share an input, per group."""
    return {"qkv": [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim],
            "gate/up": [c.ffn_dim, c.ffn_dim]}


def main():
    p = common_args(__doc__)
    p.add_argument("--rows", type=int, default=None, help="token rows (default: 512 on cpu, 2048 on cuda)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--shapes", default=None, help="comma-separated presets (lladapter_ext.model.PRESETS)")
    args = p.parse_args()
    dev = args.device
    rows = args.rows or (512 if dev == "cpu" else 2048)
    dtype = getattr(torch, args.dtype or ("float32" if dev == "cpu" else "bfloat16"))
    shapes = (args.shapes or ("smollm2-135m,tinyllama-1.1b" if dev == "cpu" else
                              "smollm2-135m,tinyllama-1.1b,llama-7b")).split(",")
    if args.quick:
        shapes, rows = shapes[:1], min(rows, 128)
    iters = args.iters or (15 if dev == "cpu" else 50)
    table = Table(f"Fused projections, {rows} rows, {str(dtype).replace('torch.', '')}", dev)
    summary = []
    for shape in shapes:
        c = config_from_preset(shape)
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(rows, c.dim, device=dev, dtype=dtype, generator=g)
        per_layer = 0.0  # separate - fused, forward + backward, seconds
        per_layer_total = 0.0  # separate, forward + backward of these groups
        for group, widths in groups(c).items():
            ws = [torch.randn(n, c.dim, device=dev, dtype=dtype, generator=g) * 0.02 for n in widths]
            fused_w = torch.cat(ws)
            grads = [torch.randn(rows, n, device=dev, dtype=dtype, generator=g) for n in widths]
            fused_g = torch.cat(grads, dim=1)

            def bwd_separate(ws=ws, grads=grads):
                out = grads[0] @ ws[0]
                for gr, w in zip(grads[1:], ws[1:]):
                    out.add_(gr @ w)
                return out

            fns = {"forward, separate": lambda ws=ws: [F.linear(x, w) for w in ws],
                   "forward, fused": lambda fw=fused_w: F.linear(x, fw),
                   "backward dX, separate": bwd_separate,
                   "backward dX, fused": lambda fg=fused_g, fw=fused_w: fg @ fw}
            t = bench_group(fns, dev, iters=iters)
            case = f"{shape} {group} ({'+'.join(map(str, widths))} x {c.dim})"
            for what in ("forward", "backward dX"):
                table.add(case, f"{what}, separate", t[f"{what}, separate"])
                table.add(case, f"{what}, fused", t[f"{what}, fused"], anchor=f"{what}, separate")
            per_layer += t["forward, separate"] + t["backward dX, separate"] - t["forward, fused"] - \
                t["backward dX, fused"]
            per_layer_total += t["forward, separate"] + t["backward dX, separate"]
        summary.append((shape, c.n_layers, per_layer, per_layer_total))
    table.print()
    for shape, n_layers, gain, total in summary:
        print(f"{shape}: fusing would save {gain * 1e3:+.2f} ms per layer, {gain * n_layers * 1e3:+.1f} ms per "
              f"step over {n_layers} layers ({gain / total:+.1%} of these projections' own time, forward + backward)")
    table.dump(args.json)


if __name__ == "__main__":
    main()
