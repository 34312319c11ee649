"""A LLaMA-7B-shaped model on a small CPU machine: the llama-7b preset (random weights: the architecture and the
arithmetic are what count here) with an int4 base, one adapter training step and a few greedy decode steps.

In fp32 the base alone is 27 GB (13.5 GB in bf16); with --quantize int4 it is built layer by layer straight into
4.5-bit codes, so the whole model fits in a few GB. Prints the peak resident memory, the load, step and decode
times, and that the adapter received a gradient.

    python examples/quantized_7b.py [--preset llama-7b] [--quantize int4] [--tokens 32] [--new-tokens 4]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from lladapter_ext.loaders import load_model
from lladapter_ext.quantize import quantized_summary


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-7b")
    p.add_argument("--quantize", default="int4", choices=("int8", "int4"))
    p.add_argument("--tokens", type=int, default=32, help="training sequence length (batch 1)")
    p.add_argument("--new-tokens", type=int, default=4, help="greedy decode steps")
    args = p.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, _ = load_model(args.preset, quantize=args.quantize)
    load_s = time.perf_counter() - t0
    s = quantized_summary(model)
    print(f"{args.preset} with a {args.quantize} base: built in {load_s:.0f}s; {s[args.quantize][0]} layers, "
          f"{s[args.quantize][1] / 2**30:.2f} GiB quantized + {s['float'] / 2**30:.2f} GiB fp32 (embeddings, head, "
          f"norms, adapter); peak RSS so far {peak_rss_gib():.2f} GiB", flush=True)
    print(f"trainable adapter parameters: {model.count_trainable():,}", flush=True)

    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    t0 = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grad = sum(p.grad.abs().sum().item() for p in model.adapter_parameters() if p.grad is not None)
    opt.step()
    step_s = time.perf_counter() - t0
    print(f"training step (1 x {args.tokens} tokens): {step_s:.1f}s, loss {loss.item():.3f}, adapter gradient "
          f"L1 {grad:.3g}; peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    assert grad > 0, "no gradient reached the adapter"

    with torch.no_grad():
        cache = model.new_cache(1, 8 + args.new_tokens + 1)
        t0 = time.perf_counter()
        tok = model(ids[:, :8], cache=cache).logits[:, -1:].argmax(-1)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.new_tokens):
            tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
        decode_s = (time.perf_counter() - t0) / args.new_tokens
    print(f"greedy decode: prefill of 8 tokens {prefill_s:.1f}s, {decode_s:.2f}s per token "
          f"({1 / decode_s:.2f} tokens/s); peak RSS {peak_rss_gib():.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
