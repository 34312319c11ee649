"""Gated prompt attention op: kernels vs reference.py, gradients, opcheck, zero-init identity, long sequences,
the split path, bad inputs (CPU; CUDA mirrors via DEVICES)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lladapter_ext import ops, reference

from conftest import CUDA_DEVICES, DEVICES, kernel_ops

# Forward tolerances. fp32: kernel and reference differ in summation order and exp implementation (a few ulp
# of fp32 per term, sums over <= a few hundred terms). bf16/fp16: the inputs are the same rounded values on both
# sides and both accumulate in fp32; the only extra error is the final rounding of out to the dtype (1/2 ulp,
# plus one ulp when the fp32 results straddle a rounding boundary): 2 ulp of the dtype.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2 * 2**-8, atol=2 * 2**-8),
    torch.float16: dict(rtol=2 * 2**-11, atol=2 * 2**-11),
}
# Gradients: the kernel's backward reads out (rounded to the dtype) for D_i = dout.out_i, as flash attention does,
# and rounds each gradient once; compared with fp32 reference gradients from the same rounded inputs. The
# reductions (over Tq, over heads of a group, over the batch for a shared prompt) add fp32 reordering only.
GRAD_TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=4 * 2**-8, atol=4 * 2**-8),
    torch.float16: dict(rtol=4 * 2**-11, atol=4 * 2**-11),
}
# gate gradients are sums over B * Tq * d products: compare relative to their magnitude
GATE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_inputs(B=2, Tq=5, Tk=None, H=4, Hkv=None, d=16, K=3, Bp=1, dtype=torch.float32, device="cpu",
                gate_scale=1.0, kv_start=None):
    Tk = Tq if Tk is None else Tk
    Hkv = H if Hkv is None else Hkv
    q = torch.randn(B, Tq, H, d, device=device).to(dtype)
    k = torch.randn(B, Tk, Hkv, d, device=device).to(dtype)
    v = torch.randn(B, Tk, Hkv, d, device=device).to(dtype)
    if K is None:
        pk = pv = gate = None
    else:
        pk = torch.randn(Bp, K, Hkv, d, device=device).to(dtype)
        pv = torch.randn(Bp, K, Hkv, d, device=device).to(dtype)
        gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        gate = (gate_scale * torch.randn(H, device=device)).to(gate_dtype)
    ks = None if kv_start is None else torch.tensor(kv_start, device=device, dtype=torch.long)
    return q, k, v, pk, pv, gate, ks


def run_both(inp, causal=True, gate_act="tanh", backend="fused"):
    q, k, v, pk, pv, gate, ks = inp
    out = ops.gated_prompt_attention(q, k, v, pk, pv, gate, causal=causal, gate_act=gate_act, kv_start=ks,
                                     backend=backend)
    ref = reference.gated_prompt_attention(q, k, v, pk, pv, gate, causal=causal, gate_act=gate_act, kv_start=ks)
    return out, ref


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("K", [None, 0, 1, 10, 30])
def test_forward_matches_reference(device, dtype, causal, K):
    if device.cuda_kernels and dtype == torch.float64:
        pytest.skip("fp64 is the CPU gradcheck path; CUDA refuses it (tested in test_bad_inputs)")
    d = 64 if device.cuda_kernels else 24
    inp = make_inputs(B=2, Tq=37, H=4, d=d, K=K, dtype=dtype, device=device)
    out, ref = run_both(inp, causal=causal)
    assert out.dtype == dtype and out.shape == inp[0].shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,Hkv", [(3, 3), (6, 2), (8, 2), (8, 1)])  # GQA ratios 1, 3, 4, 8
@pytest.mark.parametrize("Bp", [1, 3])
@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
def test_forward_gqa_bp_gate_act(device, H, Hkv, Bp, gate_act):
    d = 64 if device.cuda_kernels else 8
    inp = make_inputs(B=3, Tq=19, H=H, Hkv=Hkv, d=d, K=10, Bp=Bp, device=device)
    out, ref = run_both(inp, gate_act=gate_act)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 77), (1, 300), (3, 130), (4, 3), (16, 100), (33, 129), (7, 7), (70, 70),
                                   (100, 37)])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_offsets_decode_and_chunked_prefill(device, Tq, Tk, causal):
    # Tq < Tk: queries are the last Tq positions (KV cache); Tq > Tk: the first rows see no key when causal
    d = 64 if device.cuda_kernels else 16
    inp = make_inputs(B=2, Tq=Tq, Tk=Tk, H=4, Hkv=2, d=d, K=10, device=device)
    out, ref = run_both(inp, causal=causal)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_forward_left_padding(device, causal):
    d = 64 if device.cuda_kernels else 16
    # row 1 starts at 5, row 2 at 70 (past some whole key blocks), row 3 is all padding (no allowed key)
    inp = make_inputs(B=4, Tq=80, H=2, d=d, K=4, kv_start=[0, 5, 70, 80], device=device)
    out, ref = run_both(inp, causal=causal)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    # the all-padding row gets exactly the gated prompt branch (word branch 0)
    q, k, v, pk, pv, gate, ks = inp
    prompt_only = ops.gated_prompt_attention(q[3:], k[3:, :0], v[3:, :0], pk, pv, gate, causal=False,
                                             backend="fused")
    torch.testing.assert_close(out[3:], prompt_only, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_start_int32_and_decode_left_padding(device):
    d = 64 if device.cuda_kernels else 16
    q, k, v, pk, pv, gate, _ = make_inputs(B=3, Tq=1, Tk=200, H=4, Hkv=1, d=d, K=10, device=device)
    ks = torch.tensor([0, 17, 150], dtype=torch.int32, device=device)
    out = ops.gated_prompt_attention(q, k, v, pk, pv, gate, kv_start=ks, backend="fused")
    ref = reference.gated_prompt_attention(q, k, v, pk, pv, gate, kv_start=ks)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_decode_split_k_is_used_and_exact():
    # B*H = 1 with one query and many keys: the forward splits the keys over threads and merges the partial
    # softmax states; the result must not depend on the number of threads beyond fp32 rounding of the merge.
    q, k, v, pk, pv, gate, _ = make_inputs(B=1, Tq=1, Tk=1000, H=1, d=32, K=10)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o1 = ops.gated_prompt_attention(q, k, v, pk, pv, gate, backend="fused")
        torch.set_num_threads(max(prev, 4))
        o4 = ops.gated_prompt_attention(q, k, v, pk, pv, gate, backend="fused")
    finally:
        torch.set_num_threads(prev)
    ref = reference.gated_prompt_attention(q, k, v, pk, pv, gate)
    torch.testing.assert_close(o1, ref, **TOL[torch.float32])
    torch.testing.assert_close(o4, ref, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_lse_outputs(device):
    d = 64 if device.cuda_kernels else 8
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=6, Tk=9, H=2, d=d, K=5, device=device)
    scale = 1 / math.sqrt(d)
    out, lse, plse = kernel_ops().gated_prompt_attention(q, k, v, pk, pv, gate, None, True, "tanh", scale)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    allowed = torch.arange(9, device=device)[None, :] <= torch.arange(6, device=device)[:, None] + 3
    ref_lse = torch.logsumexp(s.masked_fill(~allowed, -math.inf), -1)
    ref_plse = torch.logsumexp(torch.einsum("bihd,pjhd->bhij", q.double(), pk.double()) * scale, -1)
    assert lse.dtype == plse.dtype == torch.float32 and lse.shape == (2, 2, 6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plse.double(), ref_plse, rtol=1e-5, atol=1e-5)
    # no prompt: the prompt LSE is -inf
    _, _, plse0 = kernel_ops().gated_prompt_attention(q, k, v, None, None, None, None, True, "tanh", scale)
    assert torch.isneginf(plse0).all()


# ------------------------------------------------------------------------------------------------ zero-init
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_gate_is_plain_attention(device, dtype):
    d = 64 if device.cuda_kernels else 32
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=40, H=4, Hkv=2, d=d, K=10, dtype=dtype, device=device)
    zero = torch.zeros_like(gate)
    adapted = ops.gated_prompt_attention(q, k, v, pk, pv, zero, backend="fused")
    plain = ops.gated_prompt_attention(q, k, v, None, None, None, backend="fused")
    # bit-for-bit: phi(0) = 0 adds exactly 0 to the fp32 accumulator before the single rounding of out
    assert torch.equal(adapted, plain)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                          v.transpose(1, 2).float(), is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(plain.float(), sdpa, **(TOL[torch.float32] if dtype == torch.float32 else TOL[dtype]))


@pytest.mark.parametrize("device", DEVICES)
def test_word_branch_equals_sdpa(device):
    d = 64 if device.cuda_kernels else 16
    for causal in (True, False):
        q, k, v, *_ = make_inputs(B=2, Tq=50, H=4, d=d, K=None, device=device)
        out = ops.gated_prompt_attention(q, k, v, causal=causal, backend="fused")
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)
        torch.testing.assert_close(out, sdpa, **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------ backward
def _grads(fn, inp, gout, causal, gate_act, before_backward=None):
    q, k, v, pk, pv, gate, ks = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point()
                                 else t for t in inp]
    out = fn(q, k, v, pk, pv, gate, causal=causal, gate_act=gate_act, kv_start=ks)
    if before_backward is not None:
        before_backward()
    out.backward(gout)
    return [t.grad if t is not None else None for t in (q, k, v, pk, pv, gate)]


def d_rounding_bound(q, k, out, gout, dtype):
    """Bound on the error the flash-style backward adds to dk of a key whose queries attend to it alone (a packed
    sequence of length 1: P = 1, exact dk = 0). The kernels compute D_i = dout_i . out_i from out rounded to the
    dtype, so dS = P (dP - D) is off by at most u * sum_c |dout_ic out_ic|, and dk_j = scale * sum over the
    rep heads of the kv group of dS q_i gathers that rep times: grows with the head dim (more terms in D) and the
    group size."""
    if dtype not in (torch.bfloat16, torch.float16):
        return 0.0
    u = 2**-8 if dtype == torch.bfloat16 else 2**-11
    rep = q.shape[2] // k.shape[2]
    d_err = u * (gout.float() * out.float()).abs().sum(-1).max().item()
    return rep * d_err * q.float().abs().max().item() / math.sqrt(q.shape[-1])


def _check_grads(inp, dtype, causal=True, gate_act="tanh", backend="fused", before_backward=None,
                 single_query_keys=False):
    """single_query_keys: some keys are attended by one query row only (packed sequences of length 1): their dk
    also carries the D rounding bound (d_rounding_bound)."""
    out = ops.gated_prompt_attention(*inp[:6], causal=causal, gate_act=gate_act, kv_start=inp[6], backend=backend)
    gout = torch.randn_like(out)
    dk_extra = d_rounding_bound(inp[0], inp[1], out, gout, dtype) if single_query_keys else 0.0
    got = _grads(lambda *a, **kw: ops.gated_prompt_attention(*a, **kw, backend=backend), inp, gout, causal, gate_act,
                 before_backward)
    f32 = [t.float() if t is not None and t.is_floating_point() and dtype != torch.float64 else t for t in inp]
    want = _grads(reference.gated_prompt_attention, f32, gout.to(f32[0].dtype), causal, gate_act)
    names = ["dq", "dk", "dv", "dpk", "dpv", "dgate"]
    for name, g, w, t in zip(names, got, want, inp[:6]):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        if w is None:  # the reference does not use it (K = 0): ours must be an exact zero gradient
            assert not g.any(), name
            continue
        if name == "dgate":
            tol = GATE_RTOL[dtype] * w.abs().max().item() + 1e-6
            torch.testing.assert_close(g.to(w.dtype), w, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")
        else:
            tol = dict(GRAD_TOL[dtype])
            if name == "dk":
                tol["atol"] += dk_extra
            torch.testing.assert_close(g.to(w.dtype), w, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_backward_matches_reference(device, dtype, causal):
    d = 64 if device.cuda_kernels else 16
    inp = make_inputs(B=2, Tq=70, H=4, Hkv=2, d=d, K=10, dtype=dtype, device=device)
    if device.cuda_kernels and dtype != torch.float32:
        # the default CUDA path for bf16/fp16 is the tensor-core forward and backward: their rounding bounds
        _check_fused_grads_mma(inp, causal, "tanh")
    else:
        _check_grads(inp, dtype, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(Tq=1, Tk=90, Bp=2), dict(Tq=20, Tk=100, Bp=1), dict(Tq=40, Tk=30, Bp=2),
    dict(Tq=70, kv_start=[3, 66], Bp=1), dict(Tq=30, kv_start=[30, 0], Bp=2), dict(Tq=9, K=0), dict(Tq=9, K=None),
    dict(Tq=9, K=40, H=8, Hkv=1), dict(Tq=12, H=6, Hkv=2, gate_act="identity")])
def test_backward_cases(device, case):
    case = dict(case)
    gate_act = case.pop("gate_act", "tanh")
    d = 64 if device.cuda_kernels else 8
    params = dict(B=2, H=4, Hkv=2, d=d, K=10, device=device)
    params.update(case)
    _check_grads(make_inputs(**params), torch.float32, gate_act=gate_act)


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 16), (torch.float16, 16), (torch.float32, 20)])
@pytest.mark.parametrize("Bp", [1, 2])
def test_cpu_backward_single_prompt_key(dtype, d, Bp):
    # K = 1: dpk, dpv are products of P' / dS' viewed as a [1, Tq] matrix, one row whose leading dimension BLAS still
    # checks. The converted-block route (bf16/fp16, or fp32 with d not a multiple of the vector width) passed 1, MKL
    # refused the call, and dpv came out 0 (until 2026-12-01). Causal: query 0 attends key 0 alone (P = 1), so dk of
    # key 0 carries the D rounding bound (the fp16 case exceeded the plain tolerance by 10% on the torch 2.11 build)
    _check_grads(make_inputs(B=2, Tq=40, H=4, Hkv=2, d=d, K=1, Bp=Bp, dtype=dtype), dtype, single_query_keys=True)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.bfloat16, 24), (torch.float64, 8)])
@pytest.mark.parametrize("Bp", [1, 2])
def test_cpu_prompt_of_two_key_blocks(dtype, d, Bp):
    # The CPU kernel takes the prompt branch of more than 4 query rows keys x queries, in blocks of 128 prompt keys:
    # K = 150 makes two, so the forward's online softmax and the backward's D_prompt span both. fp32 with d = 16
    # reads the prompt rows in place, bf16 and d = 24 convert them (padded to the vector width).
    inp = make_inputs(B=2, Tq=37, H=4, Hkv=2, d=d, K=150, Bp=Bp, dtype=dtype)
    out, ref = run_both(inp)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    _check_grads(inp, dtype)


def test_gradcheck_float64_prompt_of_two_key_blocks():
    q, k, v, pk, pv, gate, _ = make_inputs(B=1, Tq=6, H=2, Hkv=1, d=3, K=130, dtype=torch.float64)
    args = [t.requires_grad_() for t in (q, k, v, pk, pv, gate)]
    assert torch.autograd.gradcheck(lambda *a: ops.gated_prompt_attention(*a, backend="fused"), args)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
@pytest.mark.parametrize("Bp", [1, 2])
def test_gradcheck_float64(causal, gate_act, Bp):
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=5, Tk=7, H=4, Hkv=2, d=3, K=3, Bp=Bp, dtype=torch.float64)
    ks = torch.tensor([0, 2])
    args = [t.requires_grad_() for t in (q, k, v, pk, pv, gate)]
    def fn(*a):
        return ops.gated_prompt_attention(*a, causal=causal, gate_act=gate_act, kv_start=ks, backend="fused")
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_float64_no_prompt_and_row_without_keys():
    # Tq > Tk with causal: the first two rows have no allowed key (word branch 0, zero gradient there)
    q, k, v, pk, pv, gate, _ = make_inputs(B=1, Tq=6, Tk=4, H=2, d=4, K=2, dtype=torch.float64)
    args = [t.requires_grad_() for t in (q, k, v, pk, pv, gate)]
    assert torch.autograd.gradcheck(lambda *a: ops.gated_prompt_attention(*a, backend="fused"), args)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.gated_prompt_attention(a, b, c, backend="fused"),
                                    args[:3])


def test_backward_deterministic_across_threads():
    # B * Hkv = 1: one thread takes the single-pass backward, two threads the two-pass one (dk/dv per key block,
    # dq per query block); both must give bit-identical gradients
    _assert_same_on_one_and_more_threads(make_inputs(B=1, Tq=100, H=4, Hkv=1, d=16, K=10, Bp=1))


def test_backward_deterministic_across_threads_any_scale():
    # d = 80: the scale 1/sqrt(80) is not a power of two, so a score product that scales q first and one that scales
    # the product round differently; both backward modes must make the same products. Tq = 300: several key blocks,
    # each with causal row chunks on its diagonal
    _assert_same_on_one_and_more_threads(make_inputs(B=1, Tq=300, H=4, Hkv=1, d=80, K=10, Bp=1))


def _assert_same_on_one_and_more_threads(inp):
    """Output and gradients of the fused op on 1 thread and on >= 2 threads are bit-identical."""
    prev = torch.get_num_threads()
    res = []
    try:
        for n in (1, max(2, prev)):
            torch.set_num_threads(n)
            out = ops.gated_prompt_attention(*inp[:6], kv_start=inp[6], backend="fused")
            res.append(_grads(lambda *a, **kw: ops.gated_prompt_attention(*a, **kw, backend="fused"), inp,
                              torch.ones_like(out), True, "tanh") + [out])
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*res):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ split path
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [dict(Tq=33), dict(Tq=1, Tk=80), dict(Tq=20, Tk=50, kv_start=[0, 45]),
                                  dict(Tq=30, Tk=10), dict(Tq=16, K=None)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_split_backend_matches_reference(device, case, causal, dtype):
    d = 64 if device.cuda_kernels else 16
    params = dict(B=2, H=4, Hkv=2, d=d, K=10, Bp=2, device=device, dtype=dtype)
    params.update(case)
    inp = make_inputs(**params)
    out, ref = run_both(inp, causal=causal, backend="split")
    torch.testing.assert_close(out, ref, **TOL[dtype])
    _check_grads(inp, dtype, causal=causal, backend="split")


@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2), (6, 1)])  # GQA ratios 1, 3, 6
@pytest.mark.parametrize("Bp", [1, 2])
@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
@pytest.mark.parametrize("Tq", [7, 1])
def test_gradcheck_float64_split(H, Hkv, Bp, gate_act, Tq):
    # the split backend's own prompt-branch backward (ops._PromptBranch) and SDPA's word branch, in float64
    inp = make_inputs(B=2, Tq=Tq, Tk=9, H=H, Hkv=Hkv, d=8, K=5, Bp=Bp, dtype=torch.float64, gate_scale=0.5)
    args = tuple(t.requires_grad_() for t in inp[:6])

    def fn(*a):
        return ops.gated_prompt_attention(*a, causal=True, gate_act=gate_act, scale=0.3, backend="split")

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("Bp", [1, 2])
def test_split_prompt_branch_saves_no_copy_of_q(Bp):
    # the prompt branch's backward keeps q itself (the word branch keeps it too), the prompt, and the [B, H, T, K]
    # probabilities: no fp32 copy of q or of the branch's output (q-sized, per layer) as plain autograd would
    B, T, H, Hkv, d, K = 2, 40, 4, 2, 16, 3
    q, _, _, pk, pv, gate, _ = make_inputs(B=B, Tq=T, H=H, Hkv=Hkv, d=d, K=K, Bp=Bp, dtype=torch.bfloat16)
    inputs = [t.requires_grad_() for t in (q, pk, pv, gate)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops._PromptBranch.apply(*inputs, "tanh", 0.25)
    assert saved
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    own = [t for t in saved if t.untyped_storage().data_ptr() not in storages]
    assert sum(t.numel() for t in own) <= B * H * T * K + H, [(tuple(t.shape), t.dtype) for t in own]
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in inputs)


def test_split_prompt_branch_is_fp32_under_autocast():
    # training's bf16/fp16 autocast would run the branch's GEMMs in bf16 (scores rounded to 8 bits): the branch
    # turns it off inside, forward and backward, so the results are the same bits with or without it
    q, _, _, pk, pv, gate, _ = make_inputs(B=2, Tq=9, H=4, Hkv=2, d=16, K=3, dtype=torch.bfloat16)
    results = []
    for autocast in (False, True):
        inputs = [t.detach().clone().requires_grad_() for t in (q, pk, pv, gate)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ops._PromptBranch.apply(*inputs, "tanh", 0.7)
            out.float().square().sum().backward()
        results.append([out] + [t.grad for t in inputs])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_split_backend_compiles_without_graph_breaks():
    # the split path traced whole (torch.compile on CUDA): no break at the argument checks or in the prompt branch.
    # kv_start takes the masked SDPA call; the unmasked one on the CPU asks whether q and k are finite (a .item())
    q, k, v, pk, pv, gate, ks = make_inputs(B=2, Tq=8, H=4, Hkv=2, d=16, K=3, kv_start=[0, 2])
    for t in (q, pk, pv, gate):
        t.requires_grad_()

    def f(q):
        return ops.gated_prompt_attention(q * 2, k, v, pk, pv, gate, kv_start=ks, backend="split")

    explained = torch._dynamo.explain(f)(q)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q)
    ref = reference.gated_prompt_attention(q * 2, k, v, pk, pv, gate, kv_start=ks)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    out.sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0 and pk.grad.abs().sum() > 0


def test_auto_backend_choice():
    assert ops._auto_attention_backend(torch.empty(1, 1, 1, 128)) == "fused"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.gated_prompt_attention(*make_inputs()[:3], backend="flash")


# ------------------------------------------------------------------------------------------------ long sequences
def _peak_cpu_alloc(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, max(e.cpu_memory_usage for e in prof.key_averages())


def test_long_sequence_does_not_materialise_scores():
    # Tq = Tk = 4096, one head: a materialised fp32 score matrix is 64 MiB. The profiler records every ATen
    # allocation of the op (out, LSEs); the kernel's own scratch is a few fixed-size blocks per thread.
    T, d = 4096, 16
    q, k, v, pk, pv, gate, _ = make_inputs(B=1, Tq=T, H=1, d=d, K=10)
    out, peak = _peak_cpu_alloc(lambda: ops.gated_prompt_attention(q, k, v, pk, pv, gate, backend="fused"))
    limit = T * T * 4 // 16  # 1/16 of one score matrix
    assert peak < limit, f"op allocated {peak} bytes"
    # the measurement can fail: the materialising reference at a quarter of the length exceeds the same limit
    Tr = T // 4
    _, ref_peak = _peak_cpu_alloc(lambda: reference.gated_prompt_attention(
        q[:, :Tr], k[:, :Tr], v[:, :Tr], pk, pv, gate))
    assert ref_peak > limit
    # spot-check a few rows against a direct fp64 computation (the reference would materialise 64 MiB)
    rows = torch.tensor([0, 1, 2047, 4095])
    s = (q[0, rows, 0].double() @ k[0, :, 0].double().T) / math.sqrt(d)
    s = s.masked_fill(torch.arange(T)[None, :] > rows[:, None], -math.inf)
    word = torch.softmax(s, -1) @ v[0, :, 0].double()
    ps = torch.softmax((q[0, rows, 0].double() @ pk[0, :, 0].double().T) / math.sqrt(d), -1)
    expect = word + torch.tanh(gate[0].double()) * (ps @ pv[0, :, 0].double())
    torch.testing.assert_close(out[0, rows, 0].double(), expect, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_prompt", [True, False])
def test_opcheck(device, with_prompt):
    d = 64 if device.cuda_kernels else 8
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=5, Tk=7, H=4, Hkv=2, d=d, K=3 if with_prompt else None,
                                           device=device)
    ks = torch.tensor([0, 2], device=device)
    for t in (q, k, v, pk, pv, gate):
        if t is not None:
            t.requires_grad_()
    args = (q, k, v, pk, pv, gate, ks, True, "tanh", 1 / math.sqrt(d))
    torch.library.opcheck(kernel_ops().gated_prompt_attention.default, args)
    out, lse, plse = kernel_ops().gated_prompt_attention(*args)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), None if pk is None else pk.detach(),
             None if pv is None else pv.detach(), None if gate is None else gate.detach(), ks, out.detach(), lse, plse,
             True, "tanh", 1 / math.sqrt(d))
    torch.library.opcheck(kernel_ops().gated_prompt_attention_backward.default, bargs)


def test_torch_compile():
    q, k, v, pk, pv, gate, _ = make_inputs(B=1, Tq=8, H=2, d=8, K=3)
    gate.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q):
        return ops.gated_prompt_attention(q * 2, k, v, pk, pv, gate, backend="fused").sum()

    loss = f(q)
    torch.testing.assert_close(loss, reference.gated_prompt_attention(q * 2, k, v, pk, pv, gate).sum(),
                               rtol=1e-4, atol=1e-4)
    loss.backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    d = 64 if device.cuda_kernels else 8
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=4, H=4, Hkv=2, d=d, K=3, device=device)

    def call(**kw):
        a = dict(q=q, k=k, v=v, pk=pk, pv=pv, gate=gate)
        a.update(kw)
        return ops.gated_prompt_attention(a["q"], a["k"], a["v"], a["pk"], a["pv"], a["gate"],
                                          kv_start=kw.get("kv_start"), gate_act=kw.get("gate_act", "tanh"),
                                          backend="fused")

    cases = [
        (dict(k=k[:, :, :1].expand(2, 4, 3, d).contiguous(), v=v[:, :, :1].expand(2, 4, 3, d).contiguous()),
         r"multiple of the number of kv heads Hkv = 3"),
        (dict(k=k[..., :d // 2].contiguous(), v=v[..., :d // 2].contiguous()), r"k must have q's head dim"),
        (dict(v=v[:, :3]), r"v must have k's shape"),
        (dict(k=k.double(), v=v.double()), r"k must have q's dtype"),
        (dict(pk=pk.half()), r"pv must have pk's shape|pk must have q's dtype"),
        (dict(pk=pk.expand(3, -1, -1, -1), pv=pv.expand(3, -1, -1, -1)), r"pk's batch dim Bp must be 1"),
        (dict(pk=pk[:, :, :1], pv=pv[:, :, :1]), r"pk must have k's number of kv heads"),
        (dict(pk=pk[..., :4], pv=pv[..., :4]), r"pk must have q's head dim"),
        (dict(pv=None), r"pk and pv must be given together"),
        (dict(gate=None), r"gate must be given"),
        (dict(gate=gate[:3]), r"gate must have shape \[4\]"),
        (dict(kv_start=torch.zeros(3, dtype=torch.long, device=device)), r"kv_start must have shape \[2\]"),
        (dict(kv_start=torch.zeros(2, device=device)), r"kv_start must have dtype in"),
        (dict(gate_act="relu"), r"gate_act must be 'tanh' or 'identity'"),
        (dict(q=q[0]), r"q must have shape \[B, Tq, H, d\]"),
        (dict(q=q.int()), r"q must have dtype in"),
    ]
    for kw, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call(**kw)


def test_backward_bad_inputs():
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=4, H=2, d=8, K=3)
    out, lse, plse = kernel_ops().gated_prompt_attention(q, k, v, pk, pv, gate, None, True, "tanh", 0.3)
    bwd = kernel_ops().gated_prompt_attention_backward
    with pytest.raises(RuntimeError, match=r"grad_out must have q's shape"):
        bwd(out[:, :2], q, k, v, pk, pv, gate, None, out, lse, plse, True, "tanh", 0.3)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[2, 2, 4\]"):
        bwd(out, q, k, v, pk, pv, gate, None, out, lse[:, :1], plse, True, "tanh", 0.3)
    with pytest.raises(RuntimeError, match=r"prompt_lse must have dtype Float"):
        bwd(out, q, k, v, pk, pv, gate, None, out, lse, plse.double(), True, "tanh", 0.3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for cross-device and fp64 refusals")
def test_cuda_device_mismatch_and_fp64_refused():
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=4, H=2, d=64, K=3, device="cuda")
    with pytest.raises(RuntimeError, match=r"pk must be a CUDA tensor"):
        ops.gated_prompt_attention(q, k, v, pk.cpu(), pv.cpu(), gate, backend="fused")
    with pytest.raises(RuntimeError, match=r"gate must be a CUDA tensor"):
        ops.gated_prompt_attention(q, k, v, pk, pv, gate.cpu(), backend="fused")
    with pytest.raises(RuntimeError, match=r"q must have dtype in"):
        ops.gated_prompt_attention(q.double(), k.double(), v.double(), backend="fused")
    qb, kb, vb, *_ = make_inputs(B=1, Tq=4, H=2, d=40, K=None, device="cuda")
    with pytest.raises(RuntimeError, match=r"head_dim"):
        ops.gated_prompt_attention(qb, kb, vb, backend="fused")


# ---------------------------------------------------------------------------------------------- layouts, partial grads
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    # models produce q/k/v as transposes of [B, H, T, d] projections; the op must read them through their strides
    d = 64 if device.cuda_kernels else 16
    B, T, H, Hkv = 2, 21, 4, 2
    q = torch.randn(B, H, T, d, device=device).transpose(1, 2)
    k = torch.randn(B, Hkv, T, d, device=device).transpose(1, 2)
    v = torch.randn(B, Hkv, T, d, device=device).transpose(1, 2)
    pk = torch.randn(1, Hkv, 5, d, device=device).transpose(1, 2)
    pv = torch.randn(1, Hkv, 5, d, device=device).transpose(1, 2)
    gate = torch.randn(H, device=device)
    assert not q.is_contiguous()
    out = ops.gated_prompt_attention(q, k, v, pk, pv, gate, backend="fused")
    ref = reference.gated_prompt_attention(q, k, v, pk, pv, gate)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_only_adapter_parameters_require_grad(device):
    # the first adapted layer of a frozen model: only the prompt K/V (through the prompt) and the gate train
    d = 64 if device.cuda_kernels else 16
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=12, H=4, Hkv=2, d=d, K=10, device=device)
    pk.requires_grad_()
    pv.requires_grad_()
    gate.requires_grad_()
    ops.gated_prompt_attention(q, k, v, pk, pv, gate, backend="fused").square().sum().backward()
    pk2, pv2, g2 = (t.detach().clone().requires_grad_() for t in (pk, pv, gate))
    reference.gated_prompt_attention(q, k, v, pk2, pv2, g2).square().sum().backward()
    for got, want in ((pk.grad, pk2.grad), (pv.grad, pv2.grad), (gate.grad, g2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert q.grad is None and k.grad is None


# ------------------------------------------------------------------------------------------------ non-finite inputs
# Issue 20, finding 4. The rule: every output and gradient that depends on a NaN or inf input is non-finite, on
# every backend and kernel path (the fused kernels once dropped a NaN score in their running max and returned a
# finite row). The dependence is gated_prompt_attention_rows' (each query over only the keys it may see). The
# converse is not
# promised: a product with a zero weight (0 * NaN, a masked key in P @ V or dS^T Q) may also spread a non-finite
# value to entries that do not depend on it, as reference.py's dense products and torch's SDPA do.
NONFINITE_SITES = [  # (input, index): rows, keys and prompt keys at block edges and in the middle
    ("q", (0, 0, 1, 3)), ("q", (1, 4, 0, 0)), ("k", (0, 0, 0, 5)), ("k", (1, 3, 0, 1)), ("v", (0, 2, 0, 7)),
    ("v", (1, 5, 0, 0)), ("pk", (0, 1, 0, 2)), ("pv", (0, 2, 0, 4)), ("gate", (1,)),
]
GRAD_NAMES = ["dq", "dk", "dv", "dpk", "dpv", "dgate"]


def assert_not_hidden(name, got, oracle):
    hidden = torch.isfinite(got.double().cpu()) & ~torch.isfinite(oracle)
    assert not hidden.any(), f"{name}: finite at {hidden.nonzero().tolist()[:4]} where it depends on a non-finite input"


def check_non_finite_propagation(device, dtype, special, backend="fused", B=2, Tq=6, Tk=None, d=64,
                                 kv_start=(0, 2), cuda_tol=False):
    from gated_prompt_attention_rows import gated_prompt_attention_rows

    torch.manual_seed(0)
    for site, index in NONFINITE_SITES:
        index = (min(index[0], B - 1),) + tuple(min(i, n - 1) for i, n in zip(index[1:], (Tq if site == "q" else
                                                                                             (Tk or Tq), 9, d)))
        inp = list(make_inputs(B=B, Tq=Tq, Tk=Tk, H=2, Hkv=1, d=d, K=3, dtype=dtype, device=device,
                               kv_start=list(kv_start[:B])))
        target = inp[["q", "k", "v", "pk", "pv", "gate"].index(site)]
        target[index if site != "gate" else index[0]] = special
        gout = torch.randn(B, Tq, 2, d, dtype=torch.float64)
        got = _grads(lambda *a, **kw: ops.gated_prompt_attention(*a, **kw, backend=backend), inp,
                     gout.to(device=device, dtype=dtype), True, "tanh")
        out = ops.gated_prompt_attention(*inp[:6], kv_start=inp[6], backend=backend)
        want = _grads(gated_prompt_attention_rows, [t.cpu() if t is not None else t for t in inp], gout, True, "tanh")
        want_out = gated_prompt_attention_rows(*[t.cpu() for t in inp[:6]], kv_start=inp[6])
        where = f"{special} in {site}{list(index)} ({dtype}, {backend})"
        assert_not_hidden(f"out, {where}", out, want_out)
        for name, g, w in zip(GRAD_NAMES, got, want):
            assert_not_hidden(f"{name}, {where}", g, w)
        # and the entries that depend on no non-finite input keep their values
        fin = torch.isfinite(want_out) & torch.isfinite(out.double().cpu())
        finite = [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (inp[2], inp[4], inp[5])]
        tol = mma_tol(dtype, *finite) if cuda_tol else TOL[dtype]
        torch.testing.assert_close(out.cpu()[fin], want_out[fin].to(dtype), **tol, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("special", [math.nan, math.inf])
def test_non_finite_inputs_are_never_hidden(device, dtype, special):
    # CPU: the few-rows path and the blocked path (Tq > 4 rows of a block); CUDA: SIMT (fp32), tensor cores (bf16)
    check_non_finite_propagation(device, dtype, special, cuda_tol=device.cuda_kernels and dtype != torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_inputs_are_never_hidden_in_decode(device, monkeypatch):
    # one query over many keys: the CPU kernel's split-K path, the CUDA split-K decode kernels (forced)
    monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "splitk")
    check_non_finite_propagation(device, torch.float32, math.nan, B=1, Tq=1, Tk=300, kv_start=(0,))


@pytest.mark.parametrize("backend, special", [("reference", math.nan), ("reference", math.inf), ("split", math.nan)])
def test_non_finite_inputs_are_never_hidden_by_other_backends(backend, special):
    # (split with inf: a row whose allowed keys all score -inf comes out 0 from torch's SDPA, which cannot tell it
    # from a fully masked row; docs/reliability.md)
    check_non_finite_propagation("cpu", torch.float32, special, backend=backend, d=16)


# ------------------------------------------------------------------------------------------------ tensor-core forward
# The CUDA forward takes csrc/cuda/gated_prompt_attention_mma.cu (wmma) for bf16/fp16, d in {64, 80, 96, 128} and
# kv_start None or [B] on sm_80+; LLADAPTER_CUDA_ATTN=simt|mma picks the kernel (read on every call). The backward
# only needs the forward's lse / prompt_lse and out, whichever kernels ran; its tensor-core kernels are tested in the
# last section.
UNIT_ROUNDOFF = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


def mma_tol(dtype, v, pv, gate, gate_act="tanh"):
    """Tolerance of the tensor-core forward against the fp32 reference. Besides the final rounding of out (TOL),
    the kernel rounds the softmax numerators P = exp(s - m) to the dtype before P @ V (tensor cores take 16-bit
    operands) while the normaliser l sums the fp32 values: every weight p_j / l gets a relative error <= u, so the
    word branch moves by at most u * max|v| and the prompt branch by u * max|phi| * max|pv|. The scores are fp32
    sums of exact products of the same rounded inputs, as in the reference (a few fp32 ulp)."""
    u = UNIT_ROUNDOFF[dtype]
    bound = v.float().abs().max().item() if v.numel() else 0.0
    if pv is not None and pv.shape[1] > 0:
        phi = gate.tanh() if gate_act == "tanh" else gate
        bound += phi.abs().max().item() * pv.float().abs().max().item()
    return dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] + u * bound)


def reference_lses(q, k, pk, causal, kv_start, scale):
    """fp64 log-sum-exps of both branches [B, H, Tq] (-inf where a branch has no key), from the same inputs."""
    B, Tq, H, _ = q.shape
    Tk, rep = k.shape[1], H // k.shape[2]
    qd = q.double()
    s = torch.einsum("bihd,bjhd->bhij", qd, k.double().repeat_interleave(rep, 2)) * scale
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    i, j = torch.arange(Tq, device=q.device), torch.arange(Tk, device=q.device)
    if causal:
        allowed = allowed & (j[None, :] <= i[:, None] + (Tk - Tq))
    if kv_start is not None:
        allowed = allowed & (j.view(1, 1, 1, Tk) >= kv_start.view(B, 1, 1, 1))
    lse = torch.logsumexp(s.masked_fill(~allowed, -math.inf), -1)
    if pk is None or pk.shape[1] == 0:
        return lse, torch.full_like(lse, -math.inf)
    pkb = pk.double().repeat_interleave(rep, 2).expand(B, -1, -1, -1)  # Bp = 1: one prompt for every batch row
    ps = torch.einsum("bihd,bjhd->bhij", qd, pkb) * scale
    return lse, torch.logsumexp(ps, -1)


MMA_CASES = [
    dict(Tq=37, Tk=37),                                  # one partial query block and one partial key block
    dict(Tq=1, Tk=77),                                   # decode (one valid row of the 64-row block)
    dict(Tq=1, Tk=1, K=1),
    dict(Tq=70, Tk=200, K=30, Bp=2),                     # KV-cache offset, per-sample prompt, 4 key blocks
    dict(Tq=130, Tk=70, K=0),                            # causal: the first 60 rows have no key; K = 0
    dict(Tq=100, Tk=100, K=None, kv_start=[3, 70]),      # left padding past a whole key block, no prompt
    dict(Tq=65, Tk=65, K=70),                            # two prompt blocks (the prompt is reloaded per pass)
    dict(Tq=33, Tk=0),                                   # no word keys: prompt branch only
    dict(Tq=64, Tk=129, K=1, kv_start=[129, 0]),         # batch row 0 is all padding
    dict(Tq=257, Tk=257, H=8, Hkv=2, Bp=2, kv_start=[0, 100]),  # several query and key blocks, GQA 4
    dict(Tq=45, Tk=90, H=4, Hkv=4, Bp=2),                # no GQA
]


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cuda_mma_forward_matches_reference(device, monkeypatch, dtype, d, causal, case):
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")
    params = dict(B=2, H=4, Hkv=1, K=10, Bp=1)  # default GQA 4: heads 0-3 share kv head 0
    params.update(case)
    q, k, v, pk, pv, gate, ks = make_inputs(d=d, dtype=dtype, device=device, **params)
    scale = 1 / math.sqrt(d)
    out, lse, plse = kernel_ops().gated_prompt_attention(q, k, v, pk, pv, gate, ks, causal, "tanh", scale)
    ref = reference.gated_prompt_attention(q, k, v, pk, pv, gate, causal=causal, kv_start=ks)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **mma_tol(dtype, v, pv, gate))
    ref_lse, ref_plse = reference_lses(q, k, pk, causal, ks, scale)
    # fp32 scores of exact bf16/fp16 products: ~1e-6 relative; -inf (no key) must match exactly
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plse.double(), ref_plse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
def test_cuda_mma_and_simt_forward_agree(device, monkeypatch, dtype, gate_act):
    q, k, v, pk, pv, gate, ks = make_inputs(B=2, Tq=150, Tk=300, H=8, Hkv=2, d=128, K=10, Bp=2, dtype=dtype,
                                            device=device, kv_start=[0, 40])
    scale = 1 / math.sqrt(128)

    def call():
        return kernel_ops().gated_prompt_attention(q, k, v, pk, pv, gate, ks, True, gate_act, scale)

    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "simt")
    o_simt, lse_simt, plse_simt = call()
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")
    o_mma, lse_mma, plse_mma = call()
    monkeypatch.delenv("LLADAPTER_CUDA_ATTN")
    o_default, _, _ = call()
    assert torch.equal(o_default, o_mma)  # mma is the default; the kernel is deterministic (no atomics)
    # the variable is read on every call: the two runs took different kernels (rounding P to the dtype in the
    # mma kernel changes the last bit of some of the 307k outputs; the SIMT kernel keeps P in fp32)
    assert not torch.equal(o_simt, o_mma)
    ref = reference.gated_prompt_attention(q, k, v, pk, pv, gate, gate_act=gate_act, kv_start=ks)
    tol = mma_tol(dtype, v, pv, gate, gate_act)
    torch.testing.assert_close(o_simt, ref, **TOL[dtype])
    torch.testing.assert_close(o_mma, ref, **tol)
    torch.testing.assert_close(o_mma, o_simt, **tol)
    torch.testing.assert_close(lse_mma, lse_simt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plse_mma, plse_simt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_mma_env_value_is_checked_and_unsupported_cases_fall_back(device, monkeypatch):
    q, k, v, pk, pv, gate, ks = make_inputs(B=2, Tq=40, Tk=60, H=4, Hkv=2, d=64, K=10, dtype=torch.bfloat16,
                                            device=device)
    scale = 0.125

    def call(q, k, v, pk=pk, pv=pv):
        return kernel_ops().gated_prompt_attention(q, k, v, pk, pv, gate, None, True, "tanh", scale)[0]

    def call_fp32():  # every input in fp32 (the prompt too: the op wants one dtype)
        return call(q.float(), k.float(), v.float(), pk.float(), pv.float())

    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "tensorcore")
    with pytest.raises(RuntimeError, match=r"LLADAPTER_CUDA_ATTN must be 'mma' or 'simt'"):
        call(q, k, v)
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "simt")
    o_simt = call(q, k, v)
    o32_simt = call_fp32()
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")
    # fp32 has no tensor-core path: the SIMT kernel runs, bit-identical
    assert torch.equal(call_fp32(), o32_simt)
    # a contiguous q whose storage starts 2 bytes past a 16-byte boundary cannot take 16-byte vector loads
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=device)
    q_odd = buf[1:].view(q.shape).copy_(q)
    assert q_odd.is_contiguous() and q_odd.data_ptr() % 16 != 0
    assert torch.equal(call(q_odd, k, v), o_simt)
    assert not torch.equal(call(q, k, v), o_simt)  # while the aligned q takes the mma kernel


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [80, 128])
def test_cuda_mma_zero_gate_is_plain_attention(device, monkeypatch, dtype, d):
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=100, Tk=130, H=4, Hkv=2, d=d, K=10, dtype=dtype, device=device)
    adapted = ops.gated_prompt_attention(q, k, v, pk, pv, torch.zeros_like(gate), backend="fused")
    plain = ops.gated_prompt_attention(q, k, v, None, None, None, backend="fused")
    # the word branch takes the same path with or without a prompt, and phi(0) / l_p = 0 adds exact zeros to the
    # fp32 accumulator before the single rounding of out
    assert torch.equal(adapted, plain)


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [dict(Tq=50, Tk=120, kv_start=[0, 30], Bp=1, d=128),
                                  dict(Tq=1, Tk=90, Bp=2, d=80), dict(Tq=40, Tk=100, K=70, Bp=2, d=96)])
def test_cuda_mma_forward_then_simt_backward(device, monkeypatch, dtype, case):
    # the SIMT backward (the variable is read again when autograd runs the backward op: "simt" from then on)
    # recomputes probabilities from the mma forward's lse / prompt_lse and reads its out for
    # D = dout . out. The mma out differs from the reference by about as much as rounding out to the dtype does
    # (which GRAD_TOL already carries); every row here sees >= 40 keys (no row averages only a few v / k rows,
    # where the D error shows most in dq), so GRAD_TOL holds with margin.
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")
    params = dict(B=2, H=8, Hkv=2, K=10, dtype=dtype, device=device)
    params.update(case)
    def simt_backward():  # after the mma forward
        monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "simt")
    _check_grads(make_inputs(**params), dtype, before_backward=simt_backward)


# ------------------------------------------------------------------------------------------------ per-query kv_start
def packed_starts(rows, Tq, device="cpu"):
    """kv_start [B, Tq] of packed rows: rows[b] lists the sequence lengths of row b (the rest of the row, if any,
    is one more sequence); each token's start is the index of the first token of its sequence."""
    out = torch.empty(len(rows), Tq, dtype=torch.long)
    for b, lengths in enumerate(rows):
        pos = 0
        for n in list(lengths) + [Tq - sum(lengths)]:
            out[b, pos:pos + n] = pos
            pos += n
    return out.to(device)


# sequences of length 1, sequences crossing the query and key blocks (64 on CUDA, 128 on CPU), one filling a row
PACKED_ROWS = [[1, 70, 1, 1, 50], [150], [3, 64, 65, 1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,K", [(4, 4, None), (4, 2, 10), (6, 2, 0)])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_packed_kv_start_matches_reference(device, dtype, H, Hkv, K, causal):
    d = 64 if device.cuda_kernels else 16
    q, k, v, pk, pv, gate, _ = make_inputs(B=3, Tq=150, H=H, Hkv=Hkv, d=d, K=K, dtype=dtype, device=device)
    ks = packed_starts(PACKED_ROWS, 150, device)
    out, ref = run_both((q, k, v, pk, pv, gate, ks), causal=causal)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [None, 10])
def test_packed_row_equals_each_sequence_alone(device, K):
    # the point of per-query kv_start: a packed sequence's outputs are those of the sequence run alone (causal),
    # and every query still sees the whole prompt
    d = 64 if device.cuda_kernels else 16
    lengths = PACKED_ROWS[0] + [150 - sum(PACKED_ROWS[0])]
    q, k, v, pk, pv, gate, _ = make_inputs(B=1, Tq=150, H=4, Hkv=2, d=d, K=K, device=device)
    ks = packed_starts([PACKED_ROWS[0]], 150, device)
    out = ops.gated_prompt_attention(q, k, v, pk, pv, gate, kv_start=ks, backend="fused")
    pos = 0
    for n in lengths:
        s = slice(pos, pos + n)
        alone = ops.gated_prompt_attention(q[:, s], k[:, s], v[:, s], pk, pv, gate, backend="fused")
        torch.testing.assert_close(out[:, s], alone, **TOL[torch.float32])
        pos += n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(1, 300), (3, 130), (20, 100), (40, 30), (70, 70)])
def test_forward_arbitrary_per_query_kv_start(device, causal, Tq, Tk):
    # any per-query bounds, not only packed ones: decreasing, past i (no allowed key when causal), past Tk,
    # negative; with a KV-cache offset (Tq < Tk: decode and its split-K / grouped-head paths) or Tq > Tk
    d = 64 if device.cuda_kernels else 16
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=Tq, Tk=Tk, H=4, Hkv=2, d=d, K=10, device=device)
    ks = torch.randint(-3, Tk + 3, (2, Tq), device=device)
    ks[0, 0] = Tk  # a row with every key masked
    out, ref = run_both((q, k, v, pk, pv, gate, ks), causal=causal)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    out32, _ = run_both((q, k, v, pk, pv, gate, ks.int()), causal=causal)
    assert torch.equal(out32, out)


# GQA 8 runs in fp32 only: a sequence of length 1 has an exact dk of 0 (P = 1, dP = D), and the kernel's
# D = dout.out uses out rounded to the dtype (flash-style), so its dk there is the sum over the group's heads of that
# rounding error; with 8 heads per kv head in bf16 that exceeds GRAD_TOL's per-element bound.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,case", [
    (torch.float32, dict(H=4, Hkv=2, K=10, Bp=1)), (torch.bfloat16, dict(H=4, Hkv=2, K=10, Bp=1)),
    (torch.float32, dict(H=8, Hkv=1, K=5, Bp=3)),
    (torch.float32, dict(H=4, Hkv=4, K=None)), (torch.bfloat16, dict(H=4, Hkv=4, K=None))])
def test_backward_packed_kv_start(device, dtype, case):
    d = 64 if device.cuda_kernels else 16
    q, k, v, pk, pv, gate, _ = make_inputs(B=3, Tq=150, d=d, dtype=dtype, device=device, **case)
    _check_grads((q, k, v, pk, pv, gate, packed_starts(PACKED_ROWS, 150, device)), dtype, single_query_keys=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(1, 90), (20, 100), (40, 30)])
def test_backward_arbitrary_per_query_kv_start(device, causal, Tq, Tk):
    d = 64 if device.cuda_kernels else 8
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=Tq, Tk=Tk, H=4, Hkv=2, d=d, K=10, Bp=2, device=device)
    ks = torch.randint(-3, Tk + 3, (2, Tq), device=device)
    _check_grads((q, k, v, pk, pv, gate, ks), torch.float32, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Bp", [1, 2])
def test_gradcheck_float64_per_query_kv_start(causal, Bp):
    # two packed rows with sequences of length 1, and a row whose second query sees no key (start past it)
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=6, H=4, Hkv=2, d=3, K=3, Bp=Bp, dtype=torch.float64)
    ks = torch.tensor([[0, 1, 1, 3, 3, 3], [0, 5, 2, 2, 4, 5]])
    args = [t.requires_grad_() for t in (q, k, v, pk, pv, gate)]
    def fn(*a):
        return ops.gated_prompt_attention(*a, causal=causal, kv_start=ks, backend="fused")
    assert torch.autograd.gradcheck(fn, args)


def test_backward_per_query_kv_start_deterministic_across_threads():
    # single-pass (1 thread) and two-pass backward skip different blocks of fully masked keys: still bit-identical
    q, k, v, pk, pv, gate, _ = make_inputs(B=1, Tq=200, H=4, Hkv=1, d=16, K=10, Bp=1)
    _assert_same_on_one_and_more_threads((q, k, v, pk, pv, gate, packed_starts([[5, 90, 1, 70]], 200)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_split_backend_per_query_kv_start(device, causal):
    d = 64 if device.cuda_kernels else 16
    q, k, v, pk, pv, gate, _ = make_inputs(B=3, Tq=150, H=4, Hkv=2, d=d, K=10, Bp=3, device=device)
    inp = (q, k, v, pk, pv, gate, packed_starts(PACKED_ROWS, 150, device))
    out, ref = run_both(inp, causal=causal, backend="split")
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    _check_grads(inp, torch.float32, causal=causal, backend="split")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_per_query_kv_start(device):
    d = 64 if device.cuda_kernels else 8
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=5, H=4, Hkv=2, d=d, K=3, device=device)
    ks = torch.tensor([[0, 0, 2, 2, 4], [0, 1, 2, 3, 3]], device=device)
    for t in (q, k, v, pk, pv, gate):
        t.requires_grad_()
    args = (q, k, v, pk, pv, gate, ks, True, "tanh", 1 / math.sqrt(d))
    torch.library.opcheck(kernel_ops().gated_prompt_attention.default, args)
    out, lse, plse = kernel_ops().gated_prompt_attention(*args)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), pk.detach(), pv.detach(), gate.detach(), ks,
             out.detach(), lse, plse, True, "tanh", 1 / math.sqrt(d))
    torch.library.opcheck(kernel_ops().gated_prompt_attention_backward.default, bargs)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_per_query_kv_start_names_the_argument(device):
    d = 64 if device.cuda_kernels else 8
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=4, Tk=6, H=4, Hkv=2, d=d, K=3, device=device)
    # [B, Tk] instead of [B, Tq], a 3-D tensor, a transposed [Tq, B]
    for bad in (torch.zeros(2, 6), torch.zeros(2, 4, 1), torch.zeros(4, 2)):
        with pytest.raises(RuntimeError, match=r"kv_start must have shape \[2\] .* or \[2, 4\] .*got \["):
            ops.gated_prompt_attention(q, k, v, pk, pv, gate, kv_start=bad.long().to(device), backend="fused")
    with pytest.raises(RuntimeError, match=r"kv_start must have dtype in"):
        ops.gated_prompt_attention(q, k, v, pk, pv, gate, kv_start=torch.zeros(2, 4, device=device), backend="fused")
    # the traced function sees a plain torch device: dynamo before torch 2.14 cannot proxy a str subclass
    torch_device = torch.device(device)
    with pytest.raises(RuntimeError, match=r"kv_start must have shape \[2\] .* or \[2, 4\] .*got \[2, 6\]"):
        torch.compile(lambda a: ops.gated_prompt_attention(a, k, v, pk, pv, gate, kv_start=torch.zeros(
            2, 6, dtype=torch.long, device=torch_device), backend="fused"), backend="eager", fullgraph=True)(q)


def _bad_attention_calls(device):
    """(what is wrong, the call's arguments) for inputs every backend must refuse, most found by adversarial testing:
    the split backend handed k/v to SDPA unchecked (v shorter than k read out of bounds, Hkv = 0 returned zeros)."""
    d = 64 if device.cuda_kernels else 8
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=4, Tk=6, H=4, Hkv=2, d=d, K=3, device=device)
    base = dict(q=q, k=k, v=v, pk=pk, pv=pv, gate=gate)
    return [
        ("v shorter than k", dict(base, v=v[:, :5])),
        ("v with another head dim", dict(base, v=torch.randn(2, 6, 2, d // 2, device=device))),
        ("no kv heads", dict(base, k=k[:, :, :0], v=v[:, :, :0])),
        ("H not a multiple of Hkv", dict(base, k=torch.randn(2, 6, 3, d, device=device),
                                         v=torch.randn(2, 6, 3, d, device=device))),
        ("k with another batch", dict(base, k=k[:1], v=v[:1])),
        ("k of another dtype", dict(base, k=k.double(), v=v.double())),
        ("pk without pv", dict(base, pv=None)),
        ("pk with another head dim", dict(base, pk=pk[..., :d // 2], pv=pv[..., :d // 2])),
        ("prompt without a gate", dict(base, gate=None)),
        ("gate of the wrong length", dict(base, gate=gate[:3])),
        ("kv_start of floats", dict(base, kv_start=torch.zeros(2, device=device))),
        ("kv_start of another shape", dict(base, kv_start=torch.zeros(3, dtype=torch.long, device=device))),
        ("a 3-d q", dict(base, q=q[0])),
        ("head dim 0", dict(base, q=q[..., :0], k=k[..., :0], v=v[..., :0], pk=pk[..., :0], pv=pv[..., :0])),
        ("a meta gate", dict(base, gate=gate.to("meta"))),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_every_backend_refuses_the_same_inputs(device):
    for what, args in _bad_attention_calls(device):
        messages = {}
        for backend in ("fused", "split", "reference"):
            with pytest.raises(RuntimeError) as info:
                ops.gated_prompt_attention(**args, backend=backend)
            messages[backend] = str(info.value).splitlines()[0]
        assert len(set(messages.values())) == 1, (what, messages)
        assert messages["fused"].startswith("lladapter::gated_prompt_attention: "), (what, messages)


@pytest.mark.parametrize("device", DEVICES)
def test_meta_tensors_mixed_with_real_ones_are_refused(device):
    # such a call dispatches to the fake implementation, which returned an uninitialised tensor on the real device
    x = torch.ones(2, 4, device=device)
    with pytest.raises(RuntimeError, match=r"lladapter::rms_norm: weight is on meta but x is on"):
        ops.rms_norm(x, torch.empty(4, device="meta"))
    q, k = torch.randn(1, 3, 2, 8, device=device), torch.randn(1, 3, 2, 8, device=device)
    cos, sin = reference.rope_cos_sin(8, 8, device=device)
    with pytest.raises(RuntimeError, match=r"lladapter::rope: cos is on meta but q is on"):
        ops.rope(q, k, cos.to("meta"), sin)
    with pytest.raises(RuntimeError, match=r"lladapter::rope: position_ids is on meta but q is on"):
        ops.rope(q, k, cos, sin, position_ids=torch.zeros(1, 3, dtype=torch.long, device="meta"))
    d = 64 if device.cuda_kernels else 8
    q, k, v, pk, pv, gate, _ = make_inputs(B=1, Tq=2, H=2, d=d, K=2, device=device)
    with pytest.raises(RuntimeError, match=r"lladapter::gated_prompt_attention: pk is on meta but q is on"):
        ops.gated_prompt_attention(q, k, v, pk.to("meta"), pv, gate, backend="fused")
    # all-meta calls still trace (shapes only)
    out = ops.gated_prompt_attention(*(t.to("meta") for t in (q, k, v, pk, pv, gate)), backend="fused")
    assert out.device.type == "meta" and out.shape == q.shape


# ------------------------------------------------------------------------------------------------ tensor-core backward
# The CUDA backward takes the wmma kernels of csrc/cuda/gated_prompt_attention_mma.cu for dq (word and prompt keys)
# and the
# word keys' dk, dv under the forward's conditions (bf16/fp16, d in {64, 80, 96, 128}, kv_start None or [B], sm_80+);
# LLADAPTER_CUDA_ATTN=simt forces the SIMT kernels (read on every call). dpk, dpv and dgate, and the D pass, stay on
# the SIMT kernels in every case.
def mma_grad_bounds(inp, gout, out, causal, gate_act, scale):
    """Elementwise bounds [dq, dk, dv] on |tensor-core gradient - fp32 reference gradient| beyond GRAD_TOL (which
    carries the final rounding of each gradient and fp32 reordering), first order in u, the dtype's unit roundoff
    (|fl(x) - x| <= u |x|). With P, dS the fp32 probabilities and dS = P (dP - D) of the reference:
      - D_i = dout_i . out_i reads the forward's out: rounded to the dtype (u |out_i|), and from the tensor-core
        forward, whose P rounding moves out_i by up to u sum_j P_ij |v_j| (+ u |phi| sum_p P'_ip |pv_p|, see
        mma_tol). So |dD_i| <= sum_c |dout_ic| err(out_ic); dS_ij moves by P_ij dD_i: dq_i by
        scale dD_i sum_j P_ij |k_j|, dk_j by scale sum_i P_ij dD_i |q_i|.
      - dS is rounded to the dtype before dq += dS K and dk += dS^T Q: scale u (|dS| |K| + |dS'| |PK|) for dq
        (dS' the prompt's, phi included), scale u |dS|^T |Q| for dk, summed over the heads of the kv group.
      - P is rounded to the dtype before dv += P^T dout: u P^T |dout|.
    The kernels' fp32 P and dS differ from the reference's by fp32 rounding only (the scores are fp32 sums of
    exact products of the same rounded inputs), which the callers' factor 2 on these bounds carries together with
    the second-order terms."""
    q, k, v, pk, pv, gate, ks = inp
    u = UNIT_ROUNDOFF[q.dtype]
    B, Tq, H, d = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    rep = H // Hkv

    def heads(t):  # [Bx, T, Hkv, d] -> fp32 [Bx, H, T, d], query head h reading kv head h // rep
        return t.float().repeat_interleave(rep, 2).transpose(1, 2)

    qh, kh, vh = q.float().transpose(1, 2), heads(k), heads(v)
    g = gout.float().transpose(1, 2)
    i, j = torch.arange(Tq, device=q.device), torch.arange(Tk, device=q.device)
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & (j[None, :] <= i[:, None] + (Tk - Tq))
    if ks is not None:
        allowed = allowed & (j.view(1, 1, 1, Tk) >= ks.view(B, 1, 1, 1))
    s = (qh @ kh.transpose(-1, -2)) * scale
    P = torch.softmax(s.masked_fill(~allowed, torch.finfo(torch.float32).min), -1) * allowed
    dP = g @ vh.transpose(-1, -2)
    dS = P * (dP - (P * dP).sum(-1, keepdim=True))
    out_err = u * (out.float().abs().transpose(1, 2) + P @ vh.abs())
    dq_b = u * dS.abs() @ kh.abs()
    if pk is not None and pk.shape[1] > 0:
        phi = (gate.tanh() if gate_act == "tanh" else gate).float().view(1, H, 1, 1)
        pkh, pvh = heads(pk), heads(pv)  # Bp = 1 broadcasts over the batch in the products
        Pp = torch.softmax((qh @ pkh.transpose(-1, -2)) * scale, -1)
        dPp = phi * (g @ pvh.transpose(-1, -2))
        dSp = Pp * (dPp - (Pp * dPp).sum(-1, keepdim=True))
        out_err = out_err + u * phi.abs() * (Pp @ pvh.abs())
        dq_b = dq_b + u * dSp.abs() @ pkh.abs()
    dD = (g.abs() * out_err).sum(-1, keepdim=True)
    dq_b = scale * (dq_b + dD * (P @ kh.abs()))
    dk_b = scale * (P * dD + u * dS.abs()).transpose(-1, -2) @ qh.abs()
    dv_b = u * P.transpose(-1, -2) @ g.abs()

    def group(t):  # [B, H, Tk, d] -> [B, Tk, Hkv, d], summed over the heads of each kv group
        return t.reshape(B, Hkv, rep, Tk, d).sum(2).transpose(1, 2)

    return [dq_b.transpose(1, 2), group(dk_b), group(dv_b)]


def assert_within(name, got, want, dtype, extra=None):
    """|got - want| <= GRAD_TOL(dtype) (+ 2 * extra elementwise); got must be finite (NaN fails every comparison)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.to(want.dtype) - want).abs()
    allowed = GRAD_TOL[dtype]["atol"] + GRAD_TOL[dtype]["rtol"] * want.abs()
    if extra is not None:
        allowed = allowed + 2 * extra
    bad = err > allowed
    if bad.any():
        worst = (err - allowed).flatten().argmax().item()
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements outside the bound; worst at flat "
                             f"index {worst}: got {got.flatten()[worst].item():.6g}, want "
                             f"{want.flatten()[worst].item():.6g}, allowed {allowed.flatten()[worst].item():.3g}")


def _check_mma_grads(got, want, inp, gout, out, causal, gate_act):
    """got (the CUDA op's gradients) against want (fp32 reference gradients): dq, dk, dv within GRAD_TOL plus the
    tensor-core bounds; dpk, dpv (SIMT kernels) within GRAD_TOL, dgate within GATE_RTOL of its largest entry."""
    dtype = inp[0].dtype
    bounds = mma_grad_bounds(inp, gout, out, causal, gate_act, 1 / math.sqrt(inp[0].shape[-1]))
    names = ["dq", "dk", "dv", "dpk", "dpv", "dgate"]
    for n, (name, g, w, t) in enumerate(zip(names, got, want, inp[:6])):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        if w is None:  # the reference does not use it (K = 0): ours must be an exact zero gradient
            assert not g.any(), name
        elif name == "dgate":
            tol = GATE_RTOL[dtype] * w.abs().max().item() + 1e-6
            torch.testing.assert_close(g.to(w.dtype), w, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")
        else:
            assert_within(name, g, w, dtype, bounds[n] if n < 3 else None)


def _reference_grads(inp, gout, causal, gate_act):
    f32 = [t.float() if t is not None and t.is_floating_point() else t for t in inp]
    return _grads(reference.gated_prompt_attention, f32, gout.float(), causal, gate_act)


def _check_fused_grads_mma(inp, causal, gate_act):
    """The fused op's forward and backward (whichever CUDA kernels the variable picks) against the reference."""
    def fused(*a, **kw):
        return ops.gated_prompt_attention(*a, **kw, backend="fused")
    out = fused(*inp[:6], causal=causal, gate_act=gate_act, kv_start=inp[6])
    gout = torch.randn_like(out)
    got = _grads(fused, inp, gout, causal, gate_act)
    _check_mma_grads(got, _reference_grads(inp, gout, causal, gate_act), inp, gout, out, causal, gate_act)


MMA_BWD_CASES = [
    dict(Tq=1, Tk=1, K=1, d=64),                                          # one key, one row
    dict(Tq=1, Tk=130, H=8, Hkv=1, K=70, Bp=2, d=80),                     # decode, GQA 8, two prompt blocks
    dict(Tq=63, Tk=63, H=4, Hkv=4, K=0, d=96),                            # no GQA, K = 0
    dict(Tq=65, Tk=65, H=8, Hkv=2, K=10, d=128, gate_act="identity"),     # one full block and one row
    dict(Tq=130, Tk=130, K=10, Bp=2, d=64, kv_start=[0, 70]),             # GQA 4, padding past a key block
    dict(Tq=65, Tk=130, K=1, d=128),                                      # chunked prefill (Tq < Tk)
    dict(Tq=130, Tk=63, K=10, d=80, gate_act="identity"),                 # Tq > Tk: causal rows without keys
    dict(Tq=63, Tk=65, K=None, d=96, kv_start=[65, 3]),                   # batch row 0 all padding, no prompt
    dict(Tq=33, Tk=0, K=10, d=64),                                        # no word keys: prompt part of dq only
    dict(Tq=100, Tk=100, H=8, Hkv=1, K=70, Bp=1, d=128, kv_start=[3, 64]),  # GQA 8, shared prompt over 2 blocks
    dict(Tq=1, Tk=65, K=10, Bp=2, d=96, kv_start=[64, 0]),                # decode, one allowed key in batch row 0
]


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", MMA_BWD_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cuda_mma_backward_matches_reference(device, monkeypatch, dtype, causal, case):
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")
    params = dict(B=2, H=4, Hkv=1, Bp=1)  # default GQA 4
    params.update(case)
    gate_act = params.pop("gate_act", "tanh")
    _check_fused_grads_mma(make_inputs(dtype=dtype, device=device, **params), causal, gate_act)


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
def test_cuda_mma_and_simt_backward_agree(device, monkeypatch, dtype, gate_act):
    inp = make_inputs(B=2, Tq=150, Tk=300, H=8, Hkv=2, d=128, K=10, Bp=2, dtype=dtype, device=device,
                      kv_start=[0, 40])
    q, k, v, pk, pv, gate, ks = inp
    scale = 1 / math.sqrt(128)
    out, lse, plse = kernel_ops().gated_prompt_attention(q, k, v, pk, pv, gate, ks, True, gate_act, scale)
    gout = torch.randn_like(out)

    def backward():  # the same saved forward for every run: only the backward kernels change
        return kernel_ops().gated_prompt_attention_backward(gout, q, k, v, pk, pv, gate, ks, out, lse, plse,
                                                                   True, gate_act, scale)

    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "simt")
    g_simt = backward()
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")
    g_mma, g_mma_again = backward(), backward()
    monkeypatch.delenv("LLADAPTER_CUDA_ATTN")
    g_default = backward()
    for name, a, b, c in zip(["dq", "dk", "dv", "dpk", "dpv", "dgate"], g_mma, g_mma_again, g_default):
        # mma is the default, and deterministic (no atomics, a fixed order)
        assert torch.equal(a, b) and torch.equal(a, c), name
    for a, b in zip(g_simt[3:], g_mma[3:]):
        assert torch.equal(a, b)  # dpk, dpv, dgate come from the same SIMT kernels in both runs
    # the variable was read: dv took another kernel (the mma kernel rounds P to the dtype, the SIMT one keeps fp32)
    assert not torch.equal(g_simt[2], g_mma[2])
    want = _reference_grads(inp, gout, True, gate_act)
    _check_mma_grads(g_simt, want, inp, gout, out, True, gate_act)
    _check_mma_grads(g_mma, want, inp, gout, out, True, gate_act)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_mma_backward_env_value_is_checked_and_unsupported_cases_fall_back(device, monkeypatch):
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=40, Tk=60, H=4, Hkv=2, d=64, K=10, dtype=torch.bfloat16,
                                            device=device)
    scale = 0.125
    gout = torch.randn(q.shape, device=device).to(q.dtype)
    per_query = torch.randint(-3, 63, (2, 40), device=device)  # kv_start [B, Tq]: SIMT kernels only
    low = (q, k, v, pk, pv)
    f32 = tuple(t.float() for t in low)

    def saved_forward(qkv, ks):
        return kernel_ops().gated_prompt_attention(*qkv, gate, ks, True, "tanh", scale)

    def backward(gout, qkv, ks, saved):
        return kernel_ops().gated_prompt_attention_backward(gout, *qkv, gate, ks, *saved, True, "tanh", scale)

    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "simt")  # every forward below: the SIMT kernel, saved once
    saved, saved32, saved_pq = saved_forward(low, None), saved_forward(f32, None), saved_forward(low, per_query)
    simt = backward(gout, low, None, saved)
    simt32 = backward(gout.float(), f32, None, saved32)
    simt_pq = backward(gout, low, per_query, saved_pq)

    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "tensorcore")
    with pytest.raises(RuntimeError, match=r"LLADAPTER_CUDA_ATTN must be 'mma' or 'simt'"):
        backward(gout, low, None, saved)
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")
    # fp32 and per-query kv_start have no tensor-core backward: the SIMT kernels run, bit-identical
    for a, b in zip(backward(gout.float(), f32, None, saved32), simt32):
        assert torch.equal(a, b)
    for a, b in zip(backward(gout, low, per_query, saved_pq), simt_pq):
        assert torch.equal(a, b)
    # a contiguous dout whose storage starts 2 bytes past a 16-byte boundary cannot take 16-byte vector loads
    buf = torch.empty(gout.numel() + 1, dtype=gout.dtype, device=device)
    gout_odd = buf[1:].view(gout.shape).copy_(gout)
    assert gout_odd.is_contiguous() and gout_odd.data_ptr() % 16 != 0
    for a, b in zip(backward(gout_odd, low, None, saved), simt):
        assert torch.equal(a, b)
    assert not torch.equal(backward(gout, low, None, saved)[2], simt[2])  # the aligned call takes the mma kernels


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_mma_backward_zero_gate_is_plain_attention(device, monkeypatch, dtype):
    monkeypatch.setenv("LLADAPTER_CUDA_ATTN", "mma")
    q, k, v, pk, pv, gate, _ = make_inputs(B=2, Tq=100, Tk=130, H=4, Hkv=2, d=96, K=10, dtype=dtype, device=device)
    gout = torch.randn(q.shape, device=device).to(dtype)

    def word_grads(pk, pv, gate):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ops.gated_prompt_attention(*leaves, pk, pv, gate, backend="fused").backward(gout)
        return [t.grad for t in leaves]

    # phi(0) = 0: out and lse equal plain attention's bit for bit, D_word = dout . out - 0 * D_prompt is the same
    # value, and the prompt part of dq adds dS' = 0 * P' * (...) = +-0 products to the fp32 accumulators
    for name, a, b in zip(["dq", "dk", "dv"], word_grads(pk, pv, torch.zeros_like(gate)), word_grads(None, None, None)):
        assert torch.equal(a, b), name


def test_recorded_attention_products_replay_the_same_calls():
    """The CPU kernels' BLAS block products, which bench_e2e's matmul floor times alone: recorded between start and
    stop only, forward and backward; their work lies between the causal triangle's and the full square's products;
    the replay makes exactly the recorded calls; bad rows raise naming the argument."""
    from lladapter_ext import _C

    B, T, H, Hkv, d, K = 2, 256, 4, 2, 64, 10
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, T, Hkv, d, generator=gen, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(1, K, Hkv, d, generator=gen, requires_grad=True) for _ in range(2))
    gate = torch.zeros(H, requires_grad=True)

    def flop(products):
        return int((2 * products[:, 0] * products[:, 1] * products[:, 2]).sum())

    ops.gated_prompt_attention(q, k, v, pk, pv, gate, causal=True).sum().backward()  # not recorded
    _C.start_recording_attention_products()
    assert _C.stop_recording_attention_products().shape == (0, 9)
    _C.start_recording_attention_products()
    out = ops.gated_prompt_attention(q, k, v, pk, pv, gate, causal=True)
    forward = _C.stop_recording_attention_products()
    _C.start_recording_attention_products()
    out.sum().backward()
    backward = _C.stop_recording_attention_products()
    # per (b, h): each word product is 2 d flops per (query, key) pair it covers, at least the causal triangle's
    # T (T + 1) / 2 pairs and at most T^2; each prompt product 2 d K T. Forward: scores and probabilities x values
    # of both branches; backward: the scores again, dP, dv, dk and dq of the word branch, at least 5 word products.
    triangle, square, prompt = (2 * d * B * H * n for n in (T * (T + 1) // 2, T * T, K * T))
    assert 2 * (triangle + prompt) <= flop(forward) <= 2 * (square + prompt)
    assert 5 * triangle <= flop(backward) <= 5 * (square + prompt)
    assert (forward[:, 0:3] > 0).all() and (backward[:, 0:3] > 0).all()

    _C.start_recording_attention_products()
    _C.replay_attention_products(backward)
    replayed = _C.stop_recording_attention_products()
    assert sorted(map(tuple, replayed.tolist())) == sorted(map(tuple, backward.tolist()))

    with pytest.raises(RuntimeError, match=r"replay_attention_products: products must be a CPU int64 tensor \[N, 9\]"):
        _C.replay_attention_products(torch.zeros(3, 8, dtype=torch.long))
    bad = backward[:2].clone()
    bad[1, 3] = 0  # lda below A's row width
    with pytest.raises(RuntimeError, match="products row 1 is not a valid product"):
        _C.replay_attention_products(bad)
