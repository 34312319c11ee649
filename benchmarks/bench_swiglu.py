"""SwiGLU benchmark: lladapter's fused op vs eager `F.silu(gate) * up` (with autograd), forward and forward+backward
at the LLaMA MLP widths of SmolLM2-135M (1536) and TinyLlama (5632) at 512 rows, ratios measured in the same run. On
GPU also the achieved bandwidth as a fraction of a device-to-device copy.

    python benchmarks/bench_swiglu.py [--device cpu|cuda] [--quick] [--json out.json]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Table, bench_group, common_args, copy_bandwidth  # noqa: E402

from lladapter_ext import ops  # noqa: E402


def main():
    p = common_args(__doc__)
    args = p.parse_args()
    dev = args.device
    shapes = [(512, 1536)] if args.quick else [(512, 1536), (512, 5632)]
    dtypes = [torch.float32, torch.bfloat16]
    iters = args.iters or (20 if dev == "cpu" else 100)
    impls = {
        "lladapter": ops.swiglu,
        "eager F.silu(g) * u": lambda g, u: F.silu(g) * u,
    }
    bw = copy_bandwidth(dev) if dev == "cuda" else None
    table = Table("SwiGLU", dev)
    for rows, n in shapes:
        for dtype in dtypes:
            g = torch.randn(rows, n, device=dev, dtype=dtype)
            u = torch.randn(rows, n, device=dev, dtype=dtype)
            gy = torch.randn_like(g)
            elt = g.element_size()
            name = f"{rows}x{n} {str(dtype).replace('torch.', '')}"
            times = bench_group({impl: (lambda fn=fn: fn(g, u)) for impl, fn in impls.items()}, dev, iters=iters)
            for impl, t in times.items():
                extra = {}
                if bw:  # read gate and up, write y
                    extra["copy_bw_frac"] = f"{3 * g.numel() * elt / t / bw:.2f}"
                table.add(name + " fwd", impl, t, anchor="eager F.silu(g) * u", **extra)
            gg = g.clone().requires_grad_()
            ug = u.clone().requires_grad_()

            def step(fn):
                gg.grad = None
                ug.grad = None
                fn(gg, ug).backward(gy)

            times = bench_group({impl: (lambda fn=fn: step(fn)) for impl, fn in impls.items()}, dev, iters=iters)
            for impl, t in times.items():
                extra = {}
                if bw:  # fwd: read g, u, write y; bwd: read dy, g, u, write dg, du (the fused minimum)
                    extra["copy_bw_frac"] = f"{8 * g.numel() * elt / t / bw:.2f}"
                table.add(name + " fwd+bwd", impl, t, anchor="eager F.silu(g) * u", **extra)
            del g, u, gy, gg, ug
    if bw:
        print(f"device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s")
    table.print()
    table.dump(args.json)


if __name__ == "__main__":
    main()
