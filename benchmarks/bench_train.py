"""Training-step benchmark of the adapted model: our kernels vs the same model on the reference ops
(lladapter_ext.reference patched in for ops.rms_norm / ops.rope / ops.gated_prompt_attention), same random
weights, batch and optimizer. Prints step time, tokens/s and peak memory, each variant in its own process
(peak RSS on CPU, torch.cuda.max_memory_allocated on GPU), and the ratio to the reference-ops variant.

    python benchmarks/bench_train.py [--device cpu|cuda] [--preset smollm2-135m] [--batch 4] [--seq 128]
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import common_args, host_rss_high_water, machine_name, run_child  # noqa: E402


def use_reference_ops():
    from lladapter_ext import ops, reference

    ops.rms_norm = reference.rms_norm
    ops.rope = reference.rope
    ops.swiglu = reference.swiglu
    ops.gated_prompt_attention = lambda *a, backend=None, **k: reference.gated_prompt_attention(*a, **k)


def run_variant(variant, args):
    """One variant, in this process: returns its measurements."""
    if variant == "reference ops":
        use_reference_ops()
    from lladapter_ext.model import LlamaForCausalLM, config_from_preset

    dev = args.device
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = config_from_preset(args.preset, adapter_len=10, adapter_layer=args.adapter_layer)
    model = LlamaForCausalLM(cfg, device=dev, dtype=dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # loss on the answer half, as instruction data has it

    def step():
        opt.zero_grad(set_to_none=True)
        model(ids, labels=labels).loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    t = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else host_rss_high_water()
    return dict(variant=variant, step_s=t, tokens_per_s=args.batch * args.seq / t, peak_bytes=peak)


def main():
    p = common_args(__doc__)
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--adapter-layer", type=int, default=30, help="adapted top layers (30: all of SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--variant", default=None, help=argparse_hide())
    args = p.parse_args()
    if args.quick:
        args.seq = min(args.seq, 64)
        args.batch = min(args.batch, 2)
    args.iters = args.iters or (3 if args.device == "cpu" else 10)
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args)))
        return
    rows = []
    for variant in ("lladapter kernels", "reference ops"):
        rows.append(run_child(__file__, variant, [
            "--device", args.device, "--preset", args.preset, "--adapter-layer", str(args.adapter_layer),
            "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype, "--iters", str(args.iters)]))
    base = rows[-1]
    print(f"\n== training step, {args.preset} ({args.dtype}), batch {args.batch} x {args.seq} tokens, adapter in the "
          f"top {args.adapter_layer} layers — {machine_name(args.device)}, torch {torch.__version__}")
    print(f"{'variant':20s} {'step':>10s} {'tokens/s':>10s} {'peak mem':>10s}  {'speed-up':>9s} {'memory':>8s}")
    for r in rows:
        print(f"{r['variant']:20s} {r['step_s'] * 1e3:8.0f}ms {r['tokens_per_s']:10.0f} "
              f"{r['peak_bytes'] / 2**20:8.0f}MiB  {base['step_s'] / r['step_s']:8.2f}x "
              f"{r['peak_bytes'] / base['peak_bytes']:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_name(args.device), rows=rows), f, indent=1)


def argparse_hide():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
