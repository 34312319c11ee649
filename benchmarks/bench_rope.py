"""RoPE benchmark: lladapter's fused q/k kernel vs eager HF-style (rotate_half) and Meta-style (complex) PyTorch,
forward and forward+backward, measured in the same run; on GPU also the fraction of copy bandwidth and
Liger-Kernel's rope when it is importable.

    python benchmarks/bench_rope.py [--device cpu|cuda] [--quick] [--iters N] [--json out.json]

Each lladapter layout is compared with the eager formulation of the same layout (rotate_half vs HF-style,
interleaved vs Meta-style). Eager versions gather cos/sin at the positions inside the timed call, as the models
do per layer; lladapter reads its [P, rd/2] tables directly. The "clone q,k" row is the floor of any
out-of-place implementation (fresh outputs written once); the in-place row shows the kernel without allocation.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Table, bench_group, common_args, copy_bandwidth  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lladapter_ext import ops, reference  # noqa: E402


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def hf_style(q, k, cos_tab, sin_tab, pos):
    # transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb: [.., d] tables (freqs duplicated), cast to x's
    # dtype, q * cos + rotate_half(q) * sin ([B, T, H, d] layout: heads at dim 2)
    cos = torch.cat((cos_tab, cos_tab), -1)[pos].to(q.dtype).unsqueeze(2)
    sin = torch.cat((sin_tab, sin_tab), -1)[pos].to(q.dtype).unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def meta_style(q, k, freqs_cis, pos):
    # Meta's llama: pairs as complex numbers times e^{i pos theta}, in fp32, cast back
    f = freqs_cis[pos].unsqueeze(2)
    qc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
    kc = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
    return torch.view_as_real(qc * f).flatten(3).type_as(q), torch.view_as_real(kc * f).flatten(3).type_as(k)


def liger_fn():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction  # noqa: F401
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        return liger_rotary_pos_emb
    except Exception:  # noqa: BLE001 - optional comparison
        return None


def main():
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if args.quick:
        cases = [("GQA q[1,256,32,128] k[1,256,8,128]", 1, 256, 32, 8, 128)]
        dtypes = [torch.float32, torch.bfloat16]
        warmup, iters = 1, args.iters or 3
    else:
        cases = [("GQA q[4,2048,32,128] k[4,2048,8,128]", 4, 2048, 32, 8, 128),
                 ("7B MHA q,k[4,2048,32,128]", 4, 2048, 32, 32, 128)]
        dtypes = [torch.float32, torch.bfloat16]
        warmup, iters = (2, args.iters or 5) if dev == "cpu" else (5, args.iters or 50)
    liger = liger_fn() if dev == "cuda" else None
    copy_bw = copy_bandwidth(dev) if dev == "cuda" else None
    table = Table("RoPE (q and k in one call)", dev)
    HF, META = "eager HF-style", "eager Meta-style"

    for name, B, T, Hq, Hk, d in cases:
        P = T
        cos, sin = reference.rope_cos_sin(P, d, 500000.0, device=dev)
        freqs_cis = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))  # Meta's complex table
        pos = torch.arange(T, device=dev).expand(B, T)
        for dtype in dtypes:
            q = torch.randn(B, T, Hq, d, device=dev, dtype=dtype)
            k = torch.randn(B, T, Hk, d, device=dev, dtype=dtype)
            gq, gk = torch.randn_like(q), torch.randn_like(k)
            nbytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read + write of q and k
            dt = str(dtype).replace("torch.", "")
            impls = {
                HF: (lambda a, b: hf_style(a, b, cos, sin, pos), None),
                "lladapter rotate_half": (lambda a, b: ops.rope(a, b, cos, sin), HF),
                META: (lambda a, b: meta_style(a, b, freqs_cis, pos), None),
                "lladapter interleaved": (lambda a, b: ops.rope(a, b, cos, sin, interleaved=True), META),
            }
            if liger is not None:
                qh, kh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # Liger wants [B, H, T, d]
                c2 = torch.cat((cos, cos), -1)[:T].unsqueeze(0).to(dtype)
                s2 = torch.cat((sin, sin), -1)[:T].unsqueeze(0).to(dtype)
            for mode in ("fwd", "fwd+bwd"):
                case = f"{name} {dt} {mode}"
                traffic = nbytes * (1 if mode == "fwd" else 2)
                runs, anchors, traffics = {}, {}, {}
                for impl, (fn, anchor) in impls.items():
                    if mode == "fwd":
                        def run(fn=fn):
                            with torch.no_grad():
                                fn(q, k)
                    else:
                        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()

                        def run(fn=fn, qg=qg, kg=kg):
                            qo, ko = fn(qg, kg)
                            torch.autograd.backward((qo, ko), (gq, gk))
                            qg.grad = kg.grad = None
                    runs[impl], anchors[impl], traffics[impl] = run, anchor, traffic
                if mode == "fwd":
                    # the floor of any out-of-place version: fresh q/k-sized outputs written once (on CPU the
                    # first-touch page faults of new memory dominate; THP_MEM_ALLOC_ENABLE=1 roughly halves them)
                    floor = "clone q,k (alloc+copy floor)"
                    runs[floor], anchors[floor], traffics[floor] = (lambda: (q.clone(), k.clone())), HF, nbytes
                    qi, ki = q.clone(), k.clone()

                    def run_inplace():
                        with torch.no_grad():
                            ops.rope_(qi, ki, cos, sin)  # repeated rotation: same memory traffic
                    inplace = "lladapter rope_ (in place)"
                    runs[inplace], anchors[inplace], traffics[inplace] = run_inplace, HF, nbytes
                if liger is not None:
                    if mode == "fwd":
                        def run_liger():
                            with torch.no_grad():
                                liger(qh, kh, c2, s2)
                    else:
                        qlg, klg = qh.clone().requires_grad_(), kh.clone().requires_grad_()
                        gqh, gkh = torch.randn_like(qh), torch.randn_like(kh)

                        def run_liger():
                            qo, ko = liger(qlg, klg, c2, s2)
                            torch.autograd.backward((qo, ko), (gqh, gkh))
                            qlg.grad = klg.grad = None
                    lg = "Liger-Kernel rope"
                    runs[lg], anchors[lg], traffics[lg] = run_liger, HF, traffic
                for impl, t in bench_group(runs, dev, warmup=warmup, iters=iters).items():
                    extra = {"copy_bw_frac": f"{(traffics[impl] / t) / copy_bw:.2f}"} if copy_bw else {}
                    table.add(case, impl, t, anchor=anchors[impl], **extra)
            del q, k, gq, gk
    if copy_bw:
        print(f"device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s")
    table.print()
    table.dump(args.json)


if __name__ == "__main__":
    main()
