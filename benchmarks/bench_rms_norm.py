"""RMSNorm benchmark: lladapter's kernel vs eager PyTorch (reference.rms_norm) and torch.nn.functional.rms_norm,
forward and forward+backward at LLaMA shapes, ratios measured in the same run. On GPU also the achieved bandwidth
as a fraction of a device-to-device copy, and Liger-Kernel's RMSNorm when importable.

    python benchmarks/bench_rms_norm.py [--device cpu|cuda] [--quick] [--json out.json]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Table, bench_group, common_args, copy_bandwidth  # noqa: E402

from lladapter_ext import ops, reference  # noqa: E402


def liger_rms_norm():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception:  # noqa: BLE001 - optional anchor
        return None
    return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)


def main():
    p = common_args(__doc__)
    args = p.parse_args()
    dev = args.device
    if args.quick:
        shapes = [(4096, 4096)]
        dtypes = [torch.float32, torch.bfloat16]
    else:
        shapes = [(4096, 4096), (4096, 8192), (16384, 4096), (16384, 8192)]
        dtypes = [torch.float32, torch.bfloat16]
    iters = args.iters or (5 if dev == "cpu" else 50)
    eps = 1e-6
    impls = {
        "lladapter": lambda x, w: ops.rms_norm(x, w, eps),
        "eager (reference.py)": lambda x, w: reference.rms_norm(x, w, eps),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, eps),
    }
    liger = liger_rms_norm() if dev == "cuda" else None
    if liger is not None:
        impls["liger"] = lambda x, w: liger(x, w, eps)
    bw = copy_bandwidth(dev) if dev == "cuda" else None
    table = Table("RMSNorm", dev)
    for rows, n in shapes:
        for dtype in dtypes:
            x = torch.randn(rows, n, device=dev, dtype=dtype)
            w = (torch.rand(n, device=dev) + 0.5).to(dtype)
            gy = torch.randn_like(x)
            elt = x.element_size()
            name = f"{rows}x{n} {str(dtype).replace('torch.', '')}"
            times = bench_group({impl: (lambda fn=fn: fn(x, w)) for impl, fn in impls.items()}, dev, iters=iters)
            for impl, t in times.items():
                extra = {}
                if bw:  # read x, write y
                    extra["copy_bw_frac"] = f"{2 * x.numel() * elt / t / bw:.2f}"
                table.add(name + " fwd", impl, t, anchor="eager (reference.py)", **extra)
            xg = x.clone().requires_grad_()
            wg = w.clone().requires_grad_()
            def step(fn):
                xg.grad = None
                wg.grad = None
                fn(xg, wg).backward(gy)
            times = bench_group({impl: (lambda fn=fn: step(fn)) for impl, fn in impls.items()}, dev, iters=iters)
            for impl, t in times.items():
                extra = {}
                if bw:  # fwd: read x, write y; bwd: read dy and x, write dx (minimal traffic)
                    extra["copy_bw_frac"] = f"{5 * x.numel() * elt / t / bw:.2f}"
                table.add(name + " fwd+bwd", impl, t, anchor="eager (reference.py)", **extra)
            # ratio against F.rms_norm too (the second anchor the targets name)
            for kind in ("fwd", "fwd+bwd"):
                ours = next(r for r in table.rows if r["case"] == f"{name} {kind}" and r["impl"] == "lladapter")
                fr = next(r for r in table.rows if r["case"] == f"{name} {kind}" and r["impl"] == "F.rms_norm")
                ours["vs_F.rms_norm"] = f"{fr['seconds'] / ours['seconds']:.2f}x"
            del x, gy, xg
    if bw:
        print(f"device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s")
    table.print()
    table.dump(args.json)


if __name__ == "__main__":
    main()
