"""Gated prompt attention: our fused and split paths against anchors measured in the same run.

Anchors:
  eager_2softmax  eager PyTorch as PEFT / the official code do it: materialised scores, two fp32 softmaxes
  sdpa_x2_gated   two scaled_dot_product_attention calls (words causal, prompt) plus the gated add (LitGPT)
  sdpa_plain      plain causal SDPA without prompts (the floor: what the prompt costs)
Ratios are anchor_time / time (> 1: ours is faster). Forward and forward+backward (grads for q, k, v, pk, pv,
gate, as in adapter fine-tuning where activations also need gradients). On CUDA the fused op is measured with
each kernel set (LLADAPTER_CUDA_ATTN=mma: the tensor-core forward and backward, the default; =simt: the SIMT
kernels; both with LLADAPTER_CUDA_DECODE=off) and, on the decode rows, with the split-K decode kernels
(LLADAPTER_CUDA_DECODE=auto, the default, which takes them for Tq <= 4 and Tk >= 256). The variants of one case
are timed round-robin (bench_group), so load on a shared machine hits them alike.

  python benchmarks/bench_gated_prompt_attention.py [--device cpu|cuda] [--quick] [--json out.json]

--kernels times the two kernels alone (torch.ops.lladapter.gated_prompt_attention and its _backward, no autograd)
at the shapes of adapter fine-tuning (SmolLM2-135M: H 9 / Hkv 3; TinyLlama: H 32 / Hkv 4; d 64, K 10, causal,
fp32 and bf16), median of --iters calls (default 60) each; run it at 1 and 2 threads (torch.set_num_threads
follows OMP_NUM_THREADS) to compare builds.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the source tree's package (its compiled extension) rather than another installed copy
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import Table, bench_group, common_args  # noqa: E402

from lladapter_ext import ops  # noqa: E402


def eager_two_softmax(q, k, v, pk, pv, gate):
    """PEFT AdaptionPrompt / official LLaMA-Adapter style: materialised scores and two softmaxes."""
    B, T, H, d = q.shape
    rep = H // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(rep, 1)
    vt = v.transpose(1, 2).repeat_interleave(rep, 1)
    s = (qt @ kt.transpose(-1, -2)) / math.sqrt(d)
    mask = torch.full((T, T), float("-inf"), device=q.device).triu(1)
    a = F.softmax(s.float() + mask, dim=-1).to(q.dtype)
    out = a @ vt
    pkt = pk.transpose(1, 2).repeat_interleave(rep, 1)
    pvt = pv.transpose(1, 2).repeat_interleave(rep, 1)
    b = F.softmax(((qt @ pkt.transpose(-1, -2)) / math.sqrt(d)).float(), dim=-1).to(q.dtype)
    out = out + torch.tanh(gate).to(q.dtype).view(1, H, 1, 1) * (b @ pvt)
    return out.transpose(1, 2)


def sdpa_two_calls(q, k, v, pk, pv, gate):
    """LitGPT style: SDPA on the words (causal), SDPA on the prompt, gated add."""
    B, H = q.shape[0], q.shape[2]
    gqa = k.shape[2] != H
    qt = q.transpose(1, 2)
    word = F.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa)
    pkt = pk.transpose(1, 2).expand(B, -1, -1, -1)
    pvt = pv.transpose(1, 2).expand(B, -1, -1, -1)
    prompt = F.scaled_dot_product_attention(qt, pkt, pvt, enable_gqa=gqa)
    return (word + torch.tanh(gate).to(q.dtype).view(1, H, 1, 1) * prompt).transpose(1, 2)


def sdpa_plain(q, k, v, pk, pv, gate):
    gqa = k.shape[2] != q.shape[2]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=gqa).transpose(1, 2)


@contextlib.contextmanager
def env_vars(env):
    """Sets the environment variables in env (LLADAPTER_CUDA_ATTN: simt|mma, the CUDA forward and backward
    kernels; LLADAPTER_CUDA_DECODE: auto|splitk|off; both read on every call) inside the block and restores the
    previous values afterwards; None or {} leaves the environment alone."""
    prev = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for name, value in prev.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def ours(backend, env=None):
    """Our op, under env_vars(env). Autograd runs the backward op after f returns, so f.env tells the timing loop
    to hold the variables over .backward() too."""
    def f(q, k, v, pk, pv, gate):
        with env_vars(env):
            return ops.gated_prompt_attention(q, k, v, pk, pv, gate, causal=True, backend=backend)
    f.env = env
    return f


def decode_inputs(B, Tk, H, Hkv, d, K, dtype, device):
    q = torch.randn(B, 1, H, d, device=device, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, d, device=device, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, d, device=device, dtype=dtype)
    pk = torch.randn(1, K, Hkv, d, device=device, dtype=dtype)
    pv = torch.randn(1, K, Hkv, d, device=device, dtype=dtype)
    gate = torch.randn(H, device=device)
    return q, k, v, pk, pv, gate


KERNEL_SHAPES = [  # (name, B, T, H, Hkv, d, K)
    ("SmolLM2 B4 T128 H9/3", 4, 128, 9, 3, 64, 10),
    ("TinyLlama B4 T128 H32/4", 4, 128, 32, 4, 64, 10),
    ("TinyLlama B1 T512 H32/4", 1, 512, 32, 4, 64, 10),
]


def time_kernels(dev, iters, warm):
    """The forward and backward kernels alone (no autograd), fwd and bwd timed round-robin per case."""
    lib = torch.ops.lladapter
    table = Table(f"gated prompt attention kernels ({torch.get_num_threads()} threads)", dev)
    for (name, B, T, H, Hkv, d, K) in KERNEL_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            q, k, v, pk, pv, go = (torch.randn(*shape, generator=gen).to(device=dev, dtype=dtype)
                                   for shape in ((B, T, H, d), (B, T, Hkv, d), (B, T, Hkv, d), (1, K, Hkv, d),
                                                 (1, K, Hkv, d), (B, T, H, d)))
            gate = (torch.randn(H, generator=gen) * 0.1).to(dev)
            scale = 1 / math.sqrt(d)
            with torch.no_grad():
                out, lse, plse = lib.gated_prompt_attention(q, k, v, pk, pv, gate, None, True, "tanh", scale)
                runs = {"forward": lambda: lib.gated_prompt_attention(q, k, v, pk, pv, gate, None, True, "tanh", scale),
                        "backward": lambda: lib.gated_prompt_attention_backward(
                            go, q, k, v, pk, pv, gate, None, out, lse, plse, True, "tanh", scale)}
                for nm, t in bench_group(runs, dev, warmup=warm, iters=iters).items():
                    table.add(f"{name} d{d} K{K} {str(dtype).split('.')[-1]}", nm, t,
                              anchor="forward" if nm == "backward" else None)
    return table


def main():
    p = common_args(__doc__)
    p.add_argument("--kernels", action="store_true",
                   help="time the forward and backward kernels alone at fine-tuning shapes (see above)")
    args = p.parse_args()
    dev = args.device
    if args.kernels:
        table = time_kernels(dev, args.iters or 60, 5)
        table.print()
        table.dump(args.json)
        return
    if dev == "cuda":
        shapes = [(4, 512, 32, 32, 128, 10, torch.bfloat16), (4, 2048, 32, 32, 128, 10, torch.bfloat16),
                  (4, 2048, 32, 8, 128, 10, torch.bfloat16)]
        decode = [(4, 4096, 32, 8, 128, 10, torch.bfloat16)]
        impls = ["fused", "split"]
    elif args.quick:
        shapes = [(1, 256, 8, 8, 64, 10, torch.float32), (1, 256, 8, 2, 64, 10, torch.bfloat16)]
        decode = [(1, 2048, 8, 2, 64, 10, torch.float32)]
        impls = ["fused", "split"]
    else:
        shapes = [(1, 512, 8, 8, 128, 10, torch.float32), (1, 1024, 8, 8, 64, 10, torch.float32),
                  (1, 512, 8, 8, 128, 10, torch.bfloat16), (1, 512, 32, 8, 128, 10, torch.float32)]
        decode = [(1, 4096, 32, 8, 128, 10, torch.float32), (4, 2048, 32, 32, 128, 10, torch.float32)]
        impls = ["fused", "split"]
    iters = args.iters or (3 if args.quick else 5)
    warm = 1 if args.quick else 2
    table = Table("gated prompt attention", dev)
    anchors = {"eager_2softmax": eager_two_softmax, "sdpa_x2_gated": sdpa_two_calls, "sdpa_plain": sdpa_plain}
    impl_fns = {f"ours_{b}": ours(b) for b in impls}
    if dev == "cuda":
        # the fused op with each CUDA kernel set: tensor cores (wmma, the default for bf16/fp16) and SIMT, both
        # without the split-K decode kernels (timed on the decode rows as ours_fused_decode)
        impl_fns = {"ours_fused_mma": ours("fused", {"LLADAPTER_CUDA_ATTN": "mma", "LLADAPTER_CUDA_DECODE": "off"}),
                    "ours_fused_simt": ours("fused", {"LLADAPTER_CUDA_ATTN": "simt", "LLADAPTER_CUDA_DECODE": "off"}),
                    "ours_split": ours("split")}

    for (B, T, H, Hkv, d, K, dtype) in shapes:
        inputs = decode_inputs(B, T, H, Hkv, d, K, dtype, dev)
        q = torch.randn(B, T, H, d, device=dev, dtype=dtype)
        inputs = (q,) + inputs[1:]
        name = f"B{B} T{T} H{H}/{Hkv} d{d} K{K} {str(dtype).split('.')[-1]}"
        for mode in ("fwd", "fwd+bwd"):
            case = f"{name} {mode}"
            leaves = [t.detach().clone().requires_grad_(mode != "fwd") for t in inputs]
            g = torch.randn(B, T, H, d, device=dev, dtype=dtype)

            runs = {}
            for nm, fn in list(anchors.items()) + list(impl_fns.items()):
                if nm == "eager_2softmax" and T * T * B * H * 4 > (1 << 31):
                    continue  # the materialised score matrix alone would not fit comfortably
                if mode == "fwd":
                    def f(fn=fn):
                        with torch.no_grad():
                            fn(*leaves)
                else:
                    def f(fn=fn):
                        for t in leaves:
                            t.grad = None
                        with env_vars(getattr(fn, "env", None)):  # the backward kernels follow the variables too
                            fn(*leaves).backward(g)
                runs[nm] = f
            if mode == "fwd+bwd" and dev == "cpu":
                # the two kernels called directly, without autograd: what the op's autograd path adds over its
                # kernels is ours_fused's time over this one (grads reset each step, as a training step does)
                def raw_ops():
                    lib, scale = torch.ops.lladapter, 1 / math.sqrt(d)
                    with torch.no_grad():
                        out, lse, plse = lib.gated_prompt_attention(*inputs, None, True, "tanh", scale)
                        lib.gated_prompt_attention_backward(g, *inputs, None, out, lse, plse, True, "tanh", scale)
                runs["kernels_no_autograd"] = raw_ops
            for nm, t in bench_group(runs, dev, warmup=warm, iters=iters).items():
                anchor = "ours_fused" if nm == "kernels_no_autograd" else None if nm in anchors else "sdpa_x2_gated"
                table.add(case, nm, t, anchor=anchor)
            for nm in impl_fns:
                for a in ("eager_2softmax", "sdpa_plain"):
                    base = next((r for r in table.rows if r["case"] == case and r["impl"] == a), None)
                    me = next(r for r in table.rows if r["case"] == case and r["impl"] == nm)
                    if base is not None:
                        me[f"vs_{a}"] = f"{base['seconds'] / me['seconds']:.2f}x"

    for (B, Tk, H, Hkv, d, K, dtype) in decode:
        inputs = decode_inputs(B, Tk, H, Hkv, d, K, dtype, dev)
        case = f"decode B{B} Tq1 Tk{Tk} H{H}/{Hkv} d{d} {str(dtype).split('.')[-1]}"

        def sdpa_decode(q, k, v, pk, pv, gate):
            gqa = k.shape[2] != q.shape[2]
            qt = q.transpose(1, 2)
            word = F.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=gqa)
            prompt = F.scaled_dot_product_attention(qt, pk.transpose(1, 2).expand(B, -1, -1, -1),
                                                    pv.transpose(1, 2).expand(B, -1, -1, -1), enable_gqa=gqa)
            return word + torch.tanh(gate).to(q.dtype).view(1, -1, 1, 1) * prompt

        decode_fns = dict(impl_fns)
        if dev == "cuda":  # the split-K decode kernels (what the fused op takes for this shape by default)
            decode_fns["ours_fused_decode"] = ours("fused", {"LLADAPTER_CUDA_DECODE": "auto"})
        # k, v as a decode step passes them: the first Tk rows of a longer KV cache (dense rows, a larger batch
        # stride; for B > 1 not contiguous), anchored on the same op with contiguous k, v
        view_inputs = list(inputs)
        for i in (1, 2):
            buf = torch.empty((B, 2 * Tk, *inputs[i].shape[2:]), device=dev, dtype=dtype)
            buf[:, :Tk] = inputs[i]
            view_inputs[i] = buf[:, :Tk]
        with torch.no_grad():
            runs = {"sdpa_x2_gated": lambda: sdpa_decode(*inputs)}
            runs.update({nm: (lambda fn=fn: fn(*inputs)) for nm, fn in decode_fns.items()})
            if B > 1:
                runs["ours_fused_cache_view"] = lambda: ours("fused")(*view_inputs)
            for nm, t in bench_group(runs, dev, warmup=warm, iters=iters * 3).items():
                anchor = {"sdpa_x2_gated": None, "ours_fused_cache_view": "ours_fused"}.get(nm, "sdpa_x2_gated")
                table.add(case, nm, t, anchor=anchor)
    table.print()
    table.dump(args.json)


if __name__ == "__main__":
    main()
