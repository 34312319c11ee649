"""A quantized frozen base (--quantize): memory, training step and decode speed of fp32, bf16, int8 and int4 bases,
each variant in its own process (so peak memory is its own), at the SmolLM2-135M and TinyLlama-1.1B shapes (random
weights, every layer adapted, K 10). Ratios are against the bf16 base measured in the same run (the issue's anchor)
and against fp32.

Per variant: bytes of the base's projections as stored, resident memory after loading (and its peak while loading:
a load that held the float weights would show them), median training-step time (forward + backward to the adapter,
batch x tokens as printed) with the peak resident memory of training, and greedy decode tokens/s at batch 1 with
the bytes/s of weights it reads (every projection and the LM head per token) as a fraction of the machine's read
bandwidth (_common.read_bandwidth, measured in the same run, as bench_e2e does): decode is bound by that traffic,
so 1.0 is its floor.

    python benchmarks/bench_quant.py [--shapes smollm2-135m,tinyllama-1.1b] [--quick] [--json OUT.json]
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _common import Table, common_args, host_rss_high_water, read_bandwidth, run_child  # noqa: E402

VARIANTS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
            "int4": (torch.float32, "int4")}
# (batch, tokens, timed steps, decoded tokens) per shape: the TinyLlama step is ~10 s on a 2-core CPU
SHAPES = {"smollm2-135m": (4, 128, 3, 24), "tinyllama-1.1b": (1, 64, 2, 8)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    from lladapter_ext.loaders import load_model
    from lladapter_ext.quantize import QuantizedLinear, is_quantizable

    dtype, fmt = VARIANTS[args.variant]
    B, T, steps, new = SHAPES[args.shape]
    if args.quick:
        B, T, steps, new = 2, 32, 1, 4
    dev = args.device
    overrides = dict(n_layers=2) if args.quick else {}
    from lladapter_ext.model import LlamaForCausalLM, config_from_preset
    # building a model on the meta device (every loader does) imports ~900 modules (~150 MiB) the first time:
    # imported here, before the baseline, so that the resident sizes compare weights, not imports
    LlamaForCausalLM(config_from_preset(args.shape, n_layers=1), device="meta")
    torch.manual_seed(0)
    base_rss = _rss()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, _ = load_model(args.shape, dtype=dtype, device=dev, quantize=fmt, adapter_len=10, adapter_layer=10**6,
                          **overrides)
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_allocated() if dev == "cuda" else host_rss_high_water() - base_rss
    after_load = torch.cuda.memory_allocated() if dev == "cuda" else _rss() - base_rss
    proj = sum(m.weight_nbytes for m in model.modules() if isinstance(m, QuantizedLinear))
    proj += sum(p.numel() * p.element_size() for n, p in model.named_parameters() if is_quantizable(n))
    # what one decode token must read: every projection and the LM head (the embeddings when tied)
    head = model.output if isinstance(model.output, QuantizedLinear) else None
    head_bytes = head.weight_nbytes if head is not None else model.lm_head_weight().nbytes
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, T), device=dev)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    # bf16 matmuls on a CPU without native bf16 run ~20x slower than fp32 (measured: 3.6 s -> 80 s per SmolLM2
    # step): one timed step there, and none for the larger shape (its memory and decode are still measured)
    slow_bf16 = dtype == torch.bfloat16 and dev == "cpu" and not args.quick
    if slow_bf16:
        steps = 0 if args.shape != "smollm2-135m" else 1
    else:
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    train_peak = torch.cuda.max_memory_allocated() if dev == "cuda" else host_rss_high_water() - base_rss
    # greedy decode at batch 1 after a 16-token prompt
    with torch.no_grad():
        cache = model.new_cache(1, 16 + new + 1)
        tok = model(ids[:1, :16], cache=cache).logits[:, -1:].argmax(-1)
        tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)  # first decode step: warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(new - 1):
            tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
        if dev == "cuda":
            torch.cuda.synchronize()
        decode_s = (time.perf_counter() - t) / max(new - 1, 1)
    times.sort()
    return dict(load_s=load_s, load_peak=load_peak, after_load=after_load, proj_bytes=proj,
                decode_bytes=proj + head_bytes,
                step_s=times[len(times) // 2] if times else None, train_peak=train_peak, decode_s=decode_s, B=B,
                T=T)


def main():
    p = common_args(__doc__.split("\n\n")[0])
    p.add_argument("--variant", default=None, help=argparse_hidden())
    p.add_argument("--shape", default=None, help=argparse_hidden())
    p.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b", help="comma-separated presets")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    args = p.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    shapes = ["smollm2-135m"] if args.quick else args.shapes.split(",")
    table = Table("quantized base: memory, training step, decode (ratios vs the bf16 and fp32 bases)", args.device)
    # decode is bound by reading the weights: its bytes/s against the machine's read bandwidth (as bench_e2e) is
    # the distance to that floor
    read_bw = read_bandwidth(args.device)
    print(f"read bandwidth: {read_bw / 1e9:.1f} GB/s", flush=True)
    mib = 2 ** 20
    for shape in shapes:
        res = {}
        for v in args.variants.split(","):
            argv = ["--shape", shape, "--device", args.device] + (["--quick"] if args.quick else [])
            res[v] = r = run_child(os.path.abspath(__file__), v, argv)
            print(f"{shape} {v}: {r}", flush=True)
        def ratio(a, b):
            return f"{a / b:.2f}x" if a is not None and b is not None else "n/a"

        for v, r in res.items():
            ref = res.get("bf16")
            extra = {}
            if ref:
                extra = dict(proj_vs_bf16=ratio(r["proj_bytes"], ref["proj_bytes"]),
                             step_vs_bf16=ratio(r["step_s"], ref["step_s"]),
                             decode_vs_bf16=ratio(ref["decode_s"], r["decode_s"]))
            if "fp32" in res:
                f = res["fp32"]
                extra.update(step_vs_fp32=ratio(r["step_s"], f["step_s"]),
                             decode_vs_fp32=ratio(f["decode_s"], r["decode_s"]))
            case = f"{shape} B{r['B']}xT{r['T']}"
            table.add(case, f"{v} train step", r["step_s"] or float("nan"), None,
                      proj=f"{r['proj_bytes'] / mib:.0f}MiB",
                      resident=f"{r['after_load'] / mib:.0f}MiB", load_peak=f"{r['load_peak'] / mib:.0f}MiB",
                      train_peak=f"{r['train_peak'] / mib:.0f}MiB", **extra)
            table.add(case, f"{v} decode (per token)", r["decode_s"], None,
                      tokens_per_s=f"{1 / r['decode_s']:.1f}",
                      weights_read=f"{r['decode_bytes'] / r['decode_s'] / 1e9:.1f}GB/s",
                      of_read_bw=f"{r['decode_bytes'] / r['decode_s'] / read_bw:.2f}")
    table.print()
    table.dump(args.json)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
