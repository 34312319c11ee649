"""Decode-shaped forwards (few query rows, long Tk) of the gated prompt attention op.

CUDA: the split-K decode kernels of csrc/cuda/gated_prompt_attention.cu against reference.py, against the non-split
CUDA kernels (tensor-core and SIMT, forced with LLADAPTER_CUDA_DECODE=off and LLADAPTER_CUDA_ATTN), the
dispatch rule, the backward through them. LLADAPTER_CUDA_DECODE=splitk forces the split-K path for every shape
with chunks of one 32-key tile, so small Tk still has chunk edges (the kernels have never run on a GPU: these
tests are what `make gpu-check` runs). CPU: the CPU kernel's decode paths (split-K, GQA-shared rows, one item per
row) against reference.py for the same cases.
"""
import math

import pytest
import torch

from lladapter_ext import ops, reference

from conftest import CUDA_DEVICES, kernel_ops
from test_gated_prompt_attention import TOL, _check_grads, make_inputs, mma_tol

B = 3
TQS = [1, 2, 4]
TKS = [0, 1, 7, 64, 65, 1000, 4097]
DIMS = [64, 80, 96, 128]
# (H, Hkv, kv_start kind, Bp, K, gate_act): GQA ratios 1, 4, 8 (and 20: rows of a kv head span two row groups of
# the CUDA partial kernel), kv_start None / [B] / [B, Tq], shared and per-sample prompts, K None / 0 / 1 / 10.
VARIANTS = [
    (4, 4, None, 1, 10, "tanh"),
    (8, 2, "batch", B, 10, "identity"),
    (8, 1, "query", 1, 1, "tanh"),
    (4, 1, None, B, 0, "identity"),
    (16, 2, "query", B, 10, "tanh"),
    (3, 3, "batch", 1, None, "tanh"),
    (20, 1, None, 1, 10, "identity"),
]


def kv_starts(kind, Tq, Tk, device):
    """None, [B] (one row unpadded, one padded to the middle, one past the end: no word key) or [B, Tq] (random
    starts in [0, Tk + 1], so some queries have no word key)."""
    if kind is None:
        return None
    if kind == "batch":
        return torch.tensor([0, Tk // 2, Tk + 5], device=device)
    gen = torch.Generator().manual_seed(Tq * 10007 + Tk)
    return torch.randint(0, Tk + 2, (B, Tq), generator=gen).to(device)


def make_case(Tq, Tk, variant, d, dtype, device):
    H, Hkv, kind, Bp, K, gate_act = variant
    q, k, v, pk, pv, gate, _ = make_inputs(B=B, Tq=Tq, Tk=Tk, H=H, Hkv=Hkv, d=d, K=K, Bp=Bp, dtype=dtype,
                                           device=device)
    return (q, k, v, pk, pv, gate, kv_starts(kind, Tq, Tk, device)), gate_act


def run_op(inp, causal, gate_act):
    q, k, v, pk, pv, gate, ks = inp
    scale = 1 / math.sqrt(q.shape[-1])
    return kernel_ops().gated_prompt_attention(q, k, v, pk, pv, gate, ks, causal, gate_act, scale)


def oracle_lses(inp, causal):
    """fp64 log-sum-exps [B, H, Tq] of both branches from the same (rounded) inputs; -inf where a branch has no
    key. kv_start [B] or [B, Tq], Bp in {1, B}, GQA (query heads grouped by kv head, nothing repeated)."""
    q, k, v, pk, pv, gate, ks = inp
    Bq, Tq, H, d = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d)
    qg = q.double().view(Bq, Tq, Hkv, H // Hkv, d)
    s = torch.einsum("bigrd,bjgd->bgrij", qg, k.double()).reshape(Bq, H, Tq, Tk) * scale
    i = torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
    j = torch.arange(Tk, device=q.device).view(1, 1, 1, Tk)
    allowed = torch.ones(Bq, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & (j <= i + (Tk - Tq))
    if ks is not None:
        allowed = allowed & (j >= (ks.view(Bq, 1, 1, 1) if ks.dim() == 1 else ks.view(Bq, 1, Tq, 1)))
    lse = torch.logsumexp(s.masked_fill(~allowed, -math.inf), -1)
    if pk is None or pk.shape[1] == 0:
        return lse, torch.full_like(lse, -math.inf)
    pkb = pk.double().expand(Bq, -1, -1, -1)  # Bp = 1: one prompt for every batch row
    ps = torch.einsum("bigrd,bjgd->bgrij", qg, pkb).reshape(Bq, H, Tq, pk.shape[1]) * scale
    return lse, torch.logsumexp(ps, -1)


def oracles(inp, causal, gate_act):
    q, k, v, pk, pv, gate, ks = inp
    ref = reference.gated_prompt_attention(q, k, v, pk, pv, gate, causal=causal, gate_act=gate_act, kv_start=ks)
    return (ref,) + oracle_lses(inp, causal)


def check_against_oracles(result, want, dtype):
    out, lse, plse = result
    ref, ref_lse, ref_plse = want
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    # P stays fp32 in the decode kernels (as in the SIMT kernel): TOL is the final rounding of out to the dtype
    # (bf16/fp16) or fp32 reordering of sums of <= a few thousand terms (fp32)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    # fp32 scores of the same rounded inputs (~1e-6 relative); -inf (no key) must match exactly
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plse.double(), ref_plse, rtol=1e-5, atol=1e-5)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def emulated_share(device, keep):
    """The emulator runs the CUDA kernels thread by thread on the CPU: the full grid below costs it minutes (a
    4097-key case about 5 s on 2 cores). It runs a share: the dtype rotates over the (Tq, Tk, causal) cases, and
    the split-vs-non-split comparison takes its long Tk at Tq = 1 only; every Tq, Tk, causal flag, dtype, variant
    and head dim still occurs. A GPU runs them all."""
    if device.name == "emu" and not keep:
        pytest.skip("emulated: this combination runs on a GPU only (the emulator rotates dtypes, caps Tk)")


# CPU thread counts: 1 (GQA: the rows of a kv group share one item; else one item per (b, h)) and 8, where the
# variants with B * H < 2 * 8 items split the keys (split-K) and the others take one item per (b, h). More threads
# than this machine's cores would only oversubscribe it.
CPU_THREADS = [1, 8]


# ------------------------------------------------------------------------------------------------ vs reference
@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Tq", TQS)
@pytest.mark.parametrize("Tk", TKS)
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_decode_forward_matches_reference(device, monkeypatch, dtype, Tq, Tk, causal):
    rotated = DTYPES.index(dtype) == (TQS.index(Tq) + TKS.index(Tk) + causal) % 3
    emulated_share(device, rotated)
    monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "splitk")
    for vi, variant in enumerate(VARIANTS):
        d = DIMS[(vi + TKS.index(Tk) + Tq) % len(DIMS)]  # every variant meets every head dim across the Tk values
        inp, gate_act = make_case(Tq, Tk, variant, d, dtype, device)
        check_against_oracles(run_op(inp, causal, gate_act), oracles(inp, causal, gate_act), dtype)


@pytest.mark.parametrize("Tq", TQS)
@pytest.mark.parametrize("Tk", TKS)
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_decode_forward_matches_reference(Tq, Tk, causal):
    # the same cases on the CPU kernel, kept fast: the dtype rotates over the cases and the head dims are a
    # quarter of the CUDA ones (16, 20, 24, 32: the CPU kernel has no per-d code, 20 and 24 leave vector tails)
    dtype = [torch.float32, torch.bfloat16, torch.float16][(TKS.index(Tk) + Tq + causal) % 3]
    prev = torch.get_num_threads()
    try:
        for vi, variant in enumerate(VARIANTS):
            d = DIMS[(vi + TKS.index(Tk) + Tq) % len(DIMS)] // 4
            inp, gate_act = make_case(Tq, Tk, variant, d, dtype, "cpu")
            want = oracles(inp, causal, gate_act)
            for n in CPU_THREADS:
                torch.set_num_threads(n)
                check_against_oracles(run_op(inp, causal, gate_act), want, dtype)
    finally:
        torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------------ vs other kernels
@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Tq", TQS)
@pytest.mark.parametrize("Tk", [1, 65, 1000, 4097])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_split_k_agrees_with_non_split_kernels(device, monkeypatch, dtype, Tq, Tk, causal):
    rotated = DTYPES.index(dtype) == (TQS.index(Tq) + Tk + causal) % 3
    emulated_share(device, rotated and (Tk < 1000 or Tq == 1))
    for vi, variant in enumerate(VARIANTS):
        d = DIMS[(vi + Tq + Tk) % len(DIMS)]
        inp, gate_act = make_case(Tq, Tk, variant, d, dtype, device)
        monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "splitk")
        o_split, lse_split, plse_split = run_op(inp, causal, gate_act)
        monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "off")
        monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "simt")
        o_simt, lse_simt, plse_simt = run_op(inp, causal, gate_act)
        # both keep P in fp32: they differ by fp32 summation order, then each rounds out to the dtype once
        torch.testing.assert_close(o_split, o_simt, **TOL[dtype])
        torch.testing.assert_close(lse_split, lse_simt, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plse_split, plse_simt, rtol=1e-5, atol=1e-5)
        monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")  # where eligible (bf16/fp16, kv_start not [B, Tq])
        o_mma, lse_mma, plse_mma = run_op(inp, causal, gate_act)
        q, k, v, pk, pv, gate, ks = inp
        # the tensor-core kernel rounds P to the dtype before P V (mma_tol; fp32 falls back to SIMT: TOL)
        tol = mma_tol(dtype, v, pv, gate, gate_act) if dtype != torch.float32 else TOL[dtype]
        torch.testing.assert_close(o_split, o_mma, **tol)
        torch.testing.assert_close(lse_split, lse_mma, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plse_split, plse_mma, rtol=1e-5, atol=1e-5)
        monkeypatch.delenv("LLADAPTER_CUDA_ATTN")


# ------------------------------------------------------------------------------------------------ dispatch
@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_decode_dispatch_rule_and_env(device, monkeypatch):
    # fp32 so that the non-split path is the SIMT kernel in every case below
    heads = (32, 8) if device.name == "cuda" else (8, 2)  # the emulator: fewer heads, the same rule

    def call(Tq, Tk):
        torch.manual_seed(Tq * 7 + Tk)
        inp, _ = make_case(Tq, Tk, heads + ("batch", 1, 10, "tanh"), 128, torch.float32, device)
        monkeypatch.delenv("LLADAPTER_CUDA_DECODE", raising=False)
        auto = run_op(inp, True, "tanh")
        monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "off")
        off = run_op(inp, True, "tanh")
        monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "auto")
        assert all(torch.equal(a, b) for a, b in zip(run_op(inp, True, "tanh"), auto))  # "auto" is the default
        check_against_oracles(auto, oracles(inp, True, "tanh"), torch.float32)
        return auto, off

    # outside the decode regime (Tk < 256, or Tq > 4) auto is exactly the non-split kernel
    for Tq, Tk in [(1, 255), (5, 4096)]:
        auto, off = call(Tq, Tk)
        assert all(torch.equal(a, b) for a, b in zip(auto, off))
    # in it, the split-K kernels run: a different fp32 summation order changes the last bits of some of the
    # 3 * H * 128 outputs of one query over 4096 keys (the SIMT kernel sums them in one sequence)
    auto, off = call(1, 4096)
    assert not torch.equal(auto[0], off[0])
    torch.testing.assert_close(auto[0], off[0], **TOL[torch.float32])

    monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "flash")
    inp, _ = make_case(1, 300, VARIANTS[0], 64, torch.float32, device)
    with pytest.raises(RuntimeError, match=r"LLADAPTER_CUDA_DECODE must be 'auto', 'splitk' or 'off'"):
        run_op(inp, True, "tanh")


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_decode_misaligned_k_takes_scalar_loads(device, monkeypatch, dtype):
    # k, v whose storage starts one element past a 16-byte boundary cannot take the 16-byte vector loads; the
    # scalar loads read the same values, so the result is bit-identical
    monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "splitk")
    inp, gate_act = make_case(2, 1000, VARIANTS[1], 80, dtype, device)
    q, k, v, pk, pv, gate, ks = inp

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = buf[1:].view(t.shape).copy_(t)
        assert out.is_contiguous() and out.data_ptr() % 16 != 0
        return out

    aligned = run_op(inp, True, gate_act)
    odd = run_op((q, shifted(k), shifted(v), pk, pv, gate, ks), True, gate_act)
    assert all(torch.equal(a, b) for a, b in zip(aligned, odd))


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_zero_gate_is_plain_attention(device, monkeypatch, dtype):
    monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "splitk")
    inp, _ = make_case(1, 4097, VARIANTS[4], 128, dtype, device)
    q, k, v, pk, pv, gate, ks = inp
    adapted = ops.gated_prompt_attention(q, k, v, pk, pv, torch.zeros_like(gate), kv_start=ks, backend="fused")
    plain = ops.gated_prompt_attention(q, k, v, None, None, None, kv_start=ks, backend="fused")
    # same word path with or without a prompt; phi(0) / l_p adds exact zeros before the single rounding of out
    assert torch.equal(adapted, plain)


BACKWARD_CASES = [dict(Tq=1, Tk=1000, H=8, Hkv=2, kv_start=[0, 300], Bp=2), dict(Tq=2, Tk=65, H=4, Hkv=4, K=1),
                  dict(Tq=4, Tk=300, H=8, Hkv=1, kv_start=[[0, 0, 5, 5], [100, 100, 100, 299]])]


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype,case", [(torch.float32, c) for c in BACKWARD_CASES]
                         + [(torch.bfloat16, c) for c in BACKWARD_CASES[:2]])
def test_cuda_decode_forward_then_backward(device, monkeypatch, dtype, case):
    # the (unchanged) SIMT backward recomputes probabilities from the split-K forward's lse / prompt_lse and reads
    # its out; both follow the same contract as the other forwards, so GRAD_TOL of test_gated_prompt_attention holds.
    # bf16 only where every row sees many keys: the D = dout . out error of out's rounding shows most in dq of
    # rows averaging a few keys (the last case has rows with 0 and 1 key: fp32 only)
    monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "splitk")
    params = dict(B=2, d=128, K=10, dtype=dtype, device=device)
    params.update(case)
    _check_grads(make_inputs(**params), dtype)


# ------------------------------------------------------------------------------------------------ KV-cache views
def _copies(fn):
    """fn's result and the number of aten copies (copy_/clone) it makes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.name in ("aten::copy_", "aten::clone") for e in prof.events())


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_reads_kv_cache_views_in_place(device, monkeypatch, Tq, dtype):
    """k and v that are the first Tk rows of a longer cache ([B, max_len, Hkv, d][:, :Tk]: dense rows, a larger
    batch stride) give the split-K decode kernels' result for their contiguous copies bit for bit, and the call makes
    no more copies than with contiguous k, v (the kernels read the cache in place, not a copy of it every step); the
    other kernels (LLADAPTER_CUDA_DECODE=off) get them made contiguous, with the same result as contiguous inputs."""
    Tk, max_len = 300, 333
    for variant in VARIANTS[:3]:
        inp, gate_act = make_case(Tq, Tk, variant, 64, dtype, device)
        q, k, v, pk, pv, gate, ks = inp
        kbuf = torch.randn(B, max_len, *k.shape[2:], dtype=dtype, device=k.device)
        vbuf = torch.randn(B, max_len, *v.shape[2:], dtype=dtype, device=v.device)
        kbuf[:, :Tk], vbuf[:, :Tk] = k, v
        views = (q, kbuf[:, :Tk], vbuf[:, :Tk], pk, pv, gate, ks)
        assert not views[1].is_contiguous()
        monkeypatch.delenv("LLADAPTER_CUDA_DECODE", raising=False)  # Tq <= 4, Tk >= 256: the decode kernels
        want, copies_contiguous = _copies(lambda: run_op(inp, True, gate_act))
        got, copies_views = _copies(lambda: run_op(views, True, gate_act))
        assert all(torch.equal(w, g) for w, g in zip(want, got))
        assert copies_views == copies_contiguous
        check_against_oracles(got, oracles(inp, True, gate_act), dtype)
        monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "off")
        want = run_op(inp, True, gate_act)
        got, copies_views = _copies(lambda: run_op(views, True, gate_act))
        assert all(torch.equal(w, g) for w, g in zip(want, got))
        assert copies_views >= 2  # k and v made contiguous for the non-split kernels


@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_reads_kv_cache_views_in_place(Tq, dtype):
    """k and v that are the first Tk rows of a longer cache ([B, max_len, Hkv, d][:, :Tk]: dense rows, a larger
    batch stride) give exactly the result of their contiguous copies, forward and backward, every variant; the
    kernel reads them in place instead of copying the cache every decode step (docs/gated_prompt_attention.md)."""
    Tk, max_len = 65, 100
    for variant in VARIANTS:
        inp, gate_act = make_case(Tq, Tk, variant, 16, dtype, "cpu")
        q, k, v, pk, pv, gate, ks = inp
        kbuf = torch.randn(B, max_len, *k.shape[2:], dtype=dtype)
        vbuf = torch.randn(B, max_len, *v.shape[2:], dtype=dtype)
        kbuf[:, :Tk], vbuf[:, :Tk] = k, v
        k_view, v_view = kbuf[:, :Tk], vbuf[:, :Tk]
        assert not k_view.is_contiguous() and k_view.stride(0) == max_len * k.shape[2] * k.shape[3]
        for causal in (True, False):
            want = run_op((q, k, v, pk, pv, gate, ks), causal, gate_act)
            got = run_op((q, k_view, v_view, pk, pv, gate, ks), causal, gate_act)
            for w, g in zip(want, got):
                assert torch.equal(w, g)
        kg = kbuf.clone().requires_grad_()
        vg = vbuf.clone().requires_grad_()
        qg = q.clone().requires_grad_()
        out = ops.gated_prompt_attention(qg, kg[:, :Tk], vg[:, :Tk], pk, pv, gate, causal=True, gate_act=gate_act,
                                         kv_start=ks, backend="fused")
        kc, vc, qc = k.clone().requires_grad_(), v.clone().requires_grad_(), q.clone().requires_grad_()
        ref = ops.gated_prompt_attention(qc, kc, vc, pk, pv, gate, causal=True, gate_act=gate_act, kv_start=ks,
                                         backend="fused")
        assert torch.equal(out, ref)
        gout = torch.randn_like(out)
        out.backward(gout)
        ref.backward(gout)
        assert torch.equal(qg.grad, qc.grad)
        assert torch.equal(kg.grad[:, :Tk], kc.grad) and not kg.grad[:, Tk:].any()
        assert torch.equal(vg.grad[:, :Tk], vc.grad) and not vg.grad[:, Tk:].any()
