"""RoPE op: kernels vs reference.py, transformers' apply_rotary_pos_emb, Meta's complex formulation, gradients,
opcheck, compile, in-place, the module and bad inputs (CPU; CUDA mirrors)."""
import pytest
import torch

from lladapter_ext import nn as lnn
from lladapter_ext import ops, reference

from conftest import DEVICES, kernel_ops

# Tolerances by dtype. Kernel and reference form the same fp32 products a*cos, b*sin from the same fp32 tables;
# they can differ only by FMA contraction (one rounding of a product skipped): a few fp32 ulp of values that are
# O(1) here. In bf16/fp16 that fp32 difference can flip the final rounding to the dtype: at most one ulp of the
# dtype, i.e. 2^-7 relative for bf16 (8-bit significand) and 2^-10 for fp16 (11-bit significand).
TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# head dims: 128 (LLaMA), 64, 18 (half = 9: one 8-lane vector plus a scalar tail), 4 (tail only), 2 (one pair)
HEAD_DIMS = [128, 64, 18, 4, 2]


def _tables(P, rd, device, base=10000.0, scaling=None):
    return reference.rope_cos_sin(P, rd, base, scaling, device=device)


def _qk(B, T, Hq, Hk, d, dtype, device):
    return (torch.randn(B, T, Hq, d, dtype=dtype, device=device),
            torch.randn(B, T, Hk, d, dtype=dtype, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_forward_matches_reference(device, dtype, interleaved, d):
    # odd head counts and GQA (3 query heads, 1 kv head)
    q, k = _qk(2, 5, 3, 1, d, dtype, device)
    cos, sin = _tables(16, d, device)
    qo, ko = ops.rope(q, k, cos, sin, offset=3, interleaved=interleaved)
    qr, kr = reference.rope(q, k, cos, sin, offset=3, interleaved=interleaved)
    assert qo.dtype == dtype and ko.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    torch.testing.assert_close(qo, qr, **TOL[dtype])
    torch.testing.assert_close(ko, kr, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads", [(32, 8), (40, 40), (1, 1)])
def test_head_counts(device, dtype, interleaved, heads):
    # LLaMA-3-8B GQA (32/8), an MHA wider than one CUDA block's head threads (40/40), and a single head
    Hq, Hk = heads
    q, k = _qk(1, 3, Hq, Hk, 128, dtype, device)
    cos, sin = _tables(8, 128, device)
    pos = torch.tensor([[5, 0, 7]], device=device)
    qo, ko = ops.rope(q, k, cos, sin, position_ids=pos, interleaved=interleaved)
    qr, kr = reference.rope(q, k, cos, sin, position_ids=pos, interleaved=interleaved)
    torch.testing.assert_close(qo, qr, **TOL[dtype])
    torch.testing.assert_close(ko, kr, **TOL[dtype])


def test_forward_float64_cpu():
    q, k = _qk(2, 4, 2, 2, 10, torch.float64, "cpu")
    cos, sin = _tables(8, 10, "cpu")
    for interleaved in (False, True):
        qo, ko = ops.rope(q, k, cos, sin, interleaved=interleaved)
        qr, kr = reference.rope(q, k, cos, sin, interleaved=interleaved)
        torch.testing.assert_close(qo, qr, **TOL[torch.float64])
        torch.testing.assert_close(ko, kr, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_matches_transformers_apply_rotary_pos_emb(device):
    # HF's own rotate_half formulation, with HF's [.., d] cos/sin built from our [.., d/2] tables duplicated the way
    # LlamaRotaryEmbedding does (emb = cat(freqs, freqs)), gathered at per-sample position ids.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    B, T, Hq, Hk, d = 2, 7, 4, 2, 64
    q, k = _qk(B, T, Hq, Hk, d, torch.float32, device)
    cos, sin = _tables(32, d, device, base=500000.0)
    pos = torch.stack([torch.arange(3, 3 + T), torch.tensor([0, 0, 0, 1, 2, 3, 4])]).to(device)  # 2nd: left-padded
    hf_cos, hf_sin = torch.cat([cos, cos], -1)[pos], torch.cat([sin, sin], -1)[pos]  # [B, T, d]
    qh, kh = apply_rotary_pos_emb(q, k, hf_cos, hf_sin, unsqueeze_dim=2)  # q in [B, T, H, d]: heads at dim 2
    qo, ko = ops.rope(q, k, cos, sin, position_ids=pos, interleaved=False)
    torch.testing.assert_close(qo, qh, **TOL[torch.float32])
    torch.testing.assert_close(ko, kh, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_interleaved_matches_meta_complex_formulation(device):
    # Meta's formulation: view consecutive pairs as complex numbers and multiply by e^{i pos theta} built with
    # torch.polar from its own fp32 angles (independent of our fp64-angle tables: differences ~ pos * 2^-24 rad).
    B, T, Hq, Hk, d, offset = 2, 6, 3, 3, 32, 5
    q, k = _qk(B, T, Hq, Hk, d, torch.float32, device)
    theta = 10000.0 ** (-torch.arange(0, d, 2, device=device).float() / d)
    ang = torch.outer(torch.arange(offset, offset + T, device=device).float(), theta)  # [T, d/2]
    freqs_cis = torch.polar(torch.ones_like(ang), ang).view(1, T, 1, d // 2)

    def meta(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis).flatten(3)

    cos, sin = _tables(16, d, device)
    qo, ko = ops.rope(q, k, cos, sin, offset=offset, interleaved=True)
    torch.testing.assert_close(qo, meta(q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko, meta(k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_position_ids(device, interleaved):
    B, T, d, P = 3, 6, 16, 40
    q, k = _qk(B, T, 2, 1, d, torch.float32, device)
    cos, sin = _tables(P, d, device)
    pos = torch.randint(0, P, (B, T), device=device)  # arbitrary (packed / shuffled) positions
    qo, ko = ops.rope(q, k, cos, sin, position_ids=pos, interleaved=interleaved)
    qr, kr = reference.rope(q, k, cos, sin, position_ids=pos, interleaved=interleaved)
    torch.testing.assert_close(qo, qr, **TOL[torch.float32])
    torch.testing.assert_close(ko, kr, **TOL[torch.float32])
    # ids equal to offset + t give exactly the offset path; a [1, T] row is shared by the batch
    ids = torch.arange(9, 9 + T, device=device)
    a = ops.rope(q, k, cos, sin, offset=9, interleaved=interleaved)
    b = ops.rope(q, k, cos, sin, position_ids=ids.expand(B, T), interleaved=interleaved)
    c = ops.rope(q, k, cos, sin, position_ids=ids.view(1, T), interleaved=interleaved)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    # int32 ids are widened by the Python wrapper
    e = ops.rope(q, k, cos, sin, position_ids=pos.int(), interleaved=interleaved)
    assert torch.equal(e[0], qo) and torch.equal(e[1], ko)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_step_offsets(device):
    # KV-cache decoding: rotating a sequence all at once equals rotating its tokens one at a time with offset = t
    T, d = 9, 32
    q, k = _qk(2, T, 4, 2, d, torch.float32, device)
    cos, sin = _tables(T, d, device)
    qa, ka = ops.rope(q, k, cos, sin)
    for t in range(T):
        qt, kt = ops.rope(q[:, t:t + 1], k[:, t:t + 1], cos, sin, offset=t)
        assert torch.equal(qt, qa[:, t:t + 1]) and torch.equal(kt, ka[:, t:t + 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary(device, dtype, interleaved):
    d, rd = 64, 32  # e.g. GPT-NeoX / Phi style partial rotary
    q, k = _qk(2, 5, 3, 1, d, dtype, device)
    cos, sin = _tables(8, rd, device)
    qo, ko = ops.rope(q, k, cos, sin, interleaved=interleaved)
    qr, kr = reference.rope(q, k, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(qo, qr, **TOL[dtype])
    torch.testing.assert_close(ko, kr, **TOL[dtype])
    assert torch.equal(qo[..., rd:], q[..., rd:]) and torch.equal(ko[..., rd:], k[..., rd:])
    with torch.no_grad():
        qi, ki = q.clone(), k.clone()
        ops.rope_(qi, ki, cos, sin, interleaved=interleaved)
    assert torch.equal(qi, qo) and torch.equal(ki, ko)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_equals_out_of_place(device, dtype, interleaved):
    q, k = _qk(2, 5, 6, 2, 128, dtype, device)
    cos, sin = _tables(64, 128, device)
    pos = torch.randint(0, 64, (2, 5), device=device)
    qo, ko = ops.rope(q, k, cos, sin, position_ids=pos, interleaved=interleaved)
    qi, ki = q.clone(), k.clone()
    q_ptr, k_ptr = qi.data_ptr(), ki.data_ptr()
    with torch.no_grad():
        r = ops.rope_(qi, ki, cos, sin, position_ids=pos, interleaved=interleaved)
    assert r[0] is qi and r[1] is ki and qi.data_ptr() == q_ptr and ki.data_ptr() == k_ptr
    assert torch.equal(qi, qo) and torch.equal(ki, ko)


def test_inplace_allocates_nothing_cpu():
    q, k = _qk(2, 8, 4, 2, 64, torch.float32, "cpu")
    cos, sin = _tables(16, 64, "cpu")
    with torch.no_grad():
        ops.rope_(q, k, cos, sin, offset=1)  # warm up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            ops.rope_(q, k, cos, sin, offset=1)
            ops.rope(q, k, cos, sin, offset=1)  # the out-of-place call must show up as allocating (control)
    by_name = {e.key: e.cpu_memory_usage for e in prof.key_averages()}  # bytes allocated, children included
    assert by_name.get("lladapter::rope", 0) > 0, by_name  # the profiler does see allocations
    assert by_name.get("lladapter::rope_", 0) == 0, by_name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_strided_views_of_fused_qkv(device, interleaved):
    # q, k as slices of one fused projection [B, T, (Hq + 2 Hk) * d]: strided in seq and batch, contiguous in d
    B, T, Hq, Hk, d = 2, 5, 4, 2, 32
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * d, device=device)
    q = qkv[..., :Hq * d].view(B, T, Hq, d)
    k = qkv[..., Hq * d:(Hq + Hk) * d].view(B, T, Hk, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = _tables(8, d, device)
    qr, kr = reference.rope(q, k, cos, sin, interleaved=interleaved)
    qo, ko = ops.rope(q, k, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(qo, qr, **TOL[torch.float32])
    torch.testing.assert_close(ko, kr, **TOL[torch.float32])
    v_before = qkv[..., (Hq + Hk) * d:].clone()
    with torch.no_grad():
        ops.rope_(q, k, cos, sin, interleaved=interleaved)
    assert torch.equal(q, qo) and torch.equal(k, ko)
    assert torch.equal(qkv[..., (Hq + Hk) * d:], v_before)  # v untouched
    # heads-major layout ([B, H, T, d] transposed to [B, T, H, d]) and a strided last dim (copied internally)
    qt = torch.randn(B, Hq, T, d, device=device).transpose(1, 2)
    kt = torch.randn(B, d, T, Hk, device=device).permute(0, 2, 3, 1)
    assert kt.stride(-1) != 1
    for a, b in zip(ops.rope(qt, kt, cos, sin, interleaved=interleaved),
                    reference.rope(qt, kt, cos, sin, interleaved=interleaved)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    qr, kr = reference.rope(qt, kt, cos, sin, interleaved=interleaved)
    with torch.no_grad():
        ops.rope_(qt, kt, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(qt, qr, **TOL[torch.float32])
    torch.testing.assert_close(kt, kr, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_misaligned_storage(device, dtype, interleaved):
    # data starting one element into the storage: no 16-byte alignment, so the CUDA kernel takes its scalar path
    B, T, H, d = 2, 3, 2, 64
    q = torch.randn(B * T * H * d + 1, dtype=dtype, device=device)[1:].view(B, T, H, d)
    k = torch.randn(B * T * H * d + 1, dtype=dtype, device=device)[1:].view(B, T, H, d)
    cos, sin = _tables(8, d, device)
    qr, kr = reference.rope(q, k, cos, sin, offset=2, interleaved=interleaved)
    qo, ko = ops.rope(q, k, cos, sin, offset=2, interleaved=interleaved)
    torch.testing.assert_close(qo, qr, **TOL[dtype])
    torch.testing.assert_close(ko, kr, **TOL[dtype])
    with torch.no_grad():
        ops.rope_(q, k, cos, sin, offset=2, interleaved=interleaved)
    assert torch.equal(q, qo) and torch.equal(k, ko)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_backward_matches_reference(device, dtype, interleaved):
    d, rd = 48, 32  # partial rotary in the backward too
    q, k = _qk(2, 5, 3, 1, d, dtype, device)
    cos, sin = _tables(16, rd, device)
    pos = torch.randint(0, 16, (2, 5), device=device)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = ops.rope(q1, k1, cos, sin, position_ids=pos, interleaved=interleaved)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    qr, kr = reference.rope(q2, k2, cos, sin, position_ids=pos, interleaved=interleaved)
    torch.autograd.backward((qr, kr), (gq, gk))
    assert q1.grad.dtype == dtype and k1.grad.dtype == dtype
    torch.testing.assert_close(q1.grad, q2.grad, **TOL[dtype])
    torch.testing.assert_close(k1.grad, k2.grad, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_only_q_used(device):
    # k's output unused: its incoming gradient is None/zeros; q's gradient is still the inverse rotation
    q, k = _qk(1, 4, 2, 1, 16, torch.float32, device)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = _tables(8, 16, device)
    qo, _ = ops.rope(q, k, cos, sin, offset=2)
    qo.sum().backward()
    # d(sum qo)/dq = R(-angle) applied to ones, written out for the rotate_half layout
    c, s = cos[2:6].view(1, 4, 1, 8), sin[2:6].view(1, 4, 1, 8)
    expect = torch.cat([c + s, c - s], -1).expand_as(q)
    torch.testing.assert_close(q.grad, expect, **TOL[torch.float32])
    assert k.grad is None or torch.count_nonzero(k.grad) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_inverse_undoes_rotation(device, interleaved):
    q, k = _qk(2, 6, 3, 1, 64, torch.float32, device)
    cos, sin = _tables(32, 64, device)
    pos = torch.randint(0, 32, (2, 6), device=device)
    qo, ko = kernel_ops().rope(q, k, cos, sin, pos, 0, interleaved, False)
    qb, kb = kernel_ops().rope(qo, ko, cos, sin, pos, 0, interleaved, True)
    # cos^2 + sin^2 = 1 up to fp32 rounding of the tables and of the two rotations
    torch.testing.assert_close(qb, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kb, k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(interleaved):
    d, rd = 10, 6  # half = 3 and a pass-through tail
    q = torch.randn(2, 3, 3, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, d, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(8, rd, "cpu")
    pos = torch.tensor([[0, 5, 7], [2, 2, 1]])
    assert torch.autograd.gradcheck(
        lambda a, b: ops.rope(a, b, cos, sin, position_ids=pos, interleaved=interleaved), (q, k))
    assert torch.autograd.gradgradcheck(
        lambda a, b: ops.rope(a, b, cos, sin, offset=4, interleaved=interleaved), (q, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_opcheck(device, dtype, interleaved):
    q, k = _qk(2, 3, 3, 1, 16, dtype, device)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = _tables(8, 12, device)
    pos = torch.tensor([[1, 0, 7], [3, 4, 5]], device=device)
    torch.library.opcheck(kernel_ops().rope.default, (q, k, cos, sin, None, 2, interleaved, False))
    torch.library.opcheck(kernel_ops().rope.default, (q, k, cos, sin, pos, 0, interleaved, False))
    with torch.no_grad():
        torch.library.opcheck(kernel_ops().rope_.default,
                              (q.detach().clone(), k.detach().clone(), cos, sin, pos, 0, interleaved, True))
    if not device.cuda_kernels:
        qd = torch.randn(1, 2, 2, 8, dtype=torch.float64, requires_grad=True)
        kd = torch.randn(1, 2, 1, 8, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(kernel_ops().rope.default, (qd, kd, cos[:, :4], sin[:, :4], None, 1,
                                                                 interleaved, False))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    cos, sin = _tables(4, 8, device)
    q, k = _qk(0, 3, 2, 1, 8, torch.float32, device)
    qo, ko = ops.rope(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape
    q, k = _qk(2, 0, 2, 1, 8, torch.float32, device)
    q.requires_grad_()
    qo, ko = ops.rope(q, k, cos, sin, offset=4)  # offset + 0 <= 4 is fine
    qo.sum().backward()
    assert q.grad.shape == q.shape
    with torch.no_grad():
        ops.rope_(q.detach(), k, cos, sin)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    cos, sin = _tables(8, 16, device)
    q, k = _qk(2, 4, 3, 1, 16, torch.float32, device)

    def call(q=q, k=k, cos=cos, sin=sin, pos=None, offset=0):
        return ops.rope(q, k, cos, sin, position_ids=pos, offset=offset)

    with pytest.raises(RuntimeError, match=r"head_dim must be even.*got head_dim 15"):
        call(q=torch.randn(2, 4, 3, 15, device=device), k=torch.randn(2, 4, 1, 15, device=device), cos=cos[:, :7],
             sin=sin[:, :7])
    with pytest.raises(ValueError, match=r"rotary_dim must be a positive even number, got 7"):
        reference.rope_cos_sin(8, 7)
    with pytest.raises(RuntimeError,
                       match=r"rotary_dim \(2 \* cos.size\(1\), cos.size\(1\) = 16\) must be <= head_dim \(16\)"):
        call(cos=_tables(8, 32, device)[0], sin=_tables(8, 32, device)[1])
    with pytest.raises(RuntimeError, match=r"offset \+ seq = 6 \+ 4 exceed the cos/sin table of 8 positions"):
        call(offset=6)
    with pytest.raises(RuntimeError, match=r"offset must be >= 0, got -1"):
        call(offset=-1)
    with pytest.raises(RuntimeError, match=r"k's head_dim must equal q's head_dim \(16\), got 8"):
        call(k=torch.randn(2, 4, 1, 8, device=device))
    with pytest.raises(RuntimeError, match=r"k must have q's batch and seq sizes"):
        call(k=torch.randn(2, 5, 1, 16, device=device))
    with pytest.raises(RuntimeError, match=r"k must have q's dtype \(Float\), got BFloat16"):
        call(k=k.bfloat16())
    with pytest.raises(RuntimeError, match=r"q must have dtype in"):
        call(q=q.int(), k=k.int())
    with pytest.raises(RuntimeError, match=r"q must have shape \[batch, seq, heads, head_dim\], got \[4, 3, 16\]"):
        call(q=q[0])
    with pytest.raises(RuntimeError, match=r"cos must be a float32 table, got BFloat16"):
        call(cos=cos.bfloat16())
    with pytest.raises(RuntimeError, match=r"sin must be a float32 table, got Double"):
        call(sin=sin.double())
    with pytest.raises(RuntimeError, match=r"sin must have cos's shape \[8, 8\], got \[8, 4\]"):
        call(sin=sin[:, :4])
    with pytest.raises(RuntimeError, match=r"cos must have shape \[max_positions, rotary_dim / 2\]"):
        call(cos=cos.flatten(), sin=sin.flatten())
    with pytest.raises(RuntimeError, match=r"position_ids must be int64, got Float"):
        call(pos=torch.zeros(2, 4, device=device))
    with pytest.raises(RuntimeError, match=r"position_ids must have shape \[2, 4\] or \[1, 4\]"):
        call(pos=torch.zeros(3, 4, dtype=torch.long, device=device))
    with pytest.raises(RuntimeError, match=r"q and k share memory"), torch.no_grad():
        ops.rope_(q, q, cos, sin)
    with pytest.raises(RuntimeError, match=r"q has overlapping elements"), torch.no_grad():
        ops.rope_(torch.randn(2, 4, 1, 16, device=device).expand(2, 4, 3, 16), k, cos, sin)
    with pytest.raises(RuntimeError, match=r"in-place variant is for inference"):
        ops.rope_(q.clone().requires_grad_(), k, cos, sin)


@pytest.mark.parametrize("device", DEVICES)
def test_bounds_do_not_overflow_int64(device):
    # offset + T and 2 * rotary pairs were computed in int64 before the comparison: offset = 2^63 - 1 wrapped to a
    # negative end position (garbage rows) and 2^63 - T/2 with a long T read far outside the table (segfault)
    cos, sin = _tables(8, 16, device)
    for T, offset in ((4, 2**63 - 1), (4096, 2**63 - 2048), (2, 2**62)):
        q, k = _qk(1, T, 1, 1, 16, torch.float32, device)
        with pytest.raises(RuntimeError, match=rf"offset \+ seq = {offset} \+ {T} exceed the cos/sin table of 8"):
            ops.rope(q, k, cos, sin, offset=offset)
        with pytest.raises(RuntimeError, match=r"exceed the cos/sin table"), torch.no_grad():
            ops.rope_(q, k, cos, sin, offset=offset)
    # a stride-0 table claiming 2^62 rotary pairs (2 * 2^62 wraps to a negative rotary dim)
    q, k = _qk(1, 1, 1, 1, 16, torch.float32, device)
    huge = torch.zeros(1, 1, device=device).expand(1, 2**62)
    with pytest.raises(RuntimeError, match=r"rotary_dim .* must be <= head_dim \(16\)"):
        ops.rope(q, k, huge, huge)


def test_position_ids_out_of_table_cpu():
    # CPU checks explicit ids on the host before writing anything (CUDA: device-side assert, see ops.rope)
    cos, sin = _tables(8, 16, "cpu")
    q, k = _qk(2, 4, 3, 1, 16, torch.float32, "cpu")
    pos = torch.tensor([[0, 1, 2, 3], [4, 5, 8, 7]])
    with pytest.raises(RuntimeError, match=r"position_ids\[1, 2\] = 8 is outside the cos/sin table of 8 positions"):
        ops.rope(q, k, cos, sin, position_ids=pos)
    qi = q.clone()
    with pytest.raises(RuntimeError, match=r"position_ids\[0, 0\] = -1 is outside"), torch.no_grad():
        ops.rope_(qi, k.clone(), cos, sin, position_ids=torch.full((1, 4), -1))
    assert torch.equal(qi, q)  # nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a cross-device argument")
def test_device_mismatch_names_argument():
    cos, sin = _tables(8, 16, "cpu")
    q, k = _qk(2, 4, 3, 1, 16, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match=r"cos must be a CUDA tensor"):
        ops.rope(q, k, cos, sin)
    with pytest.raises(RuntimeError, match=r"k must be a CUDA tensor"):
        ops.rope(q, k.cpu(), cos.cuda(), sin.cuda())
    with pytest.raises(RuntimeError, match=r"position_ids must be a CUDA tensor"):
        ops.rope(q, k, cos.cuda(), sin.cuda(), position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"q must have dtype in"):
        ops.rope(q.double(), k.double(), cos.cuda(), sin.cuda())


# ------------------------------------------------------------------------------------------ tables and scaling
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
                      rope_parameters=dict(LLAMA31_SCALING, rope_theta=500000.0))
    hf_inv, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = reference.rope_inv_freq(128, 500000.0, LLAMA31_SCALING)
    assert attention_factor == 1.0
    # HF forms theta in fp32, we in fp64 then round: a few fp32 ulp apart
    torch.testing.assert_close(ours, hf_inv.float(), rtol=4e-7, atol=0)
    plain = reference.rope_inv_freq(128, 500000.0)
    assert torch.equal(ours[:16], plain[:16])  # the fast frequencies are untouched ...
    torch.testing.assert_close(ours[-8:], plain[-8:] / 8)  # ... the slowest are divided by factor
    # and the tables the kernels read carry it
    cos, sin = ops.rope_cos_sin_cache(64, 128, 500000.0, LLAMA31_SCALING)
    ang = torch.outer(torch.arange(64, dtype=torch.float64), ours.double())
    torch.testing.assert_close(cos, ang.cos().float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ang.sin().float(), rtol=0, atol=1e-6)


def test_cos_sin_cache_is_shared():
    a = ops.rope_cos_sin_cache(32, 16, 10000.0)
    b = ops.rope_cos_sin_cache(32, 16, 10000)
    c = ops.rope_cos_sin_cache(32, 16, 10000.0, LLAMA31_SCALING)
    assert a[0] is b[0] and a[1] is b[1] and c[0] is not a[0]
    assert a[0].dtype == torch.float32 and a[0].shape == (32, 8)
    ref = reference.rope_cos_sin(32, 16, 10000.0)
    assert torch.equal(a[0], ref[0]) and torch.equal(a[1], ref[1])
    with pytest.raises(ValueError, match=r"max_positions must be positive"):
        ops.rope_cos_sin_cache(0, 16)


# ------------------------------------------------------------------------------------------ module and compile
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_module(device):
    m = lnn.RotaryEmbedding(32, rotary_dim=16, base=500000.0, scaling=LLAMA31_SCALING, max_positions=8,
                            interleaved=True)
    q, k = _qk(2, 5, 4, 2, 32, torch.bfloat16, device)
    cos, sin = reference.rope_cos_sin(64, 16, 500000.0, LLAMA31_SCALING, device=device)
    qo, ko = m(q, k, offset=6)  # needs 11 > 8 positions: the table grows (doubling)
    assert m.max_positions == 16
    tc, ts = m.cos_sin(device)
    assert tc.dtype == torch.float32 and tc.shape == (16, 8) and tc.device.type == torch.device(device).type
    qr, kr = reference.rope(q, k, cos, sin, offset=6, interleaved=True)
    torch.testing.assert_close(qo, qr, **TOL[torch.bfloat16])
    torch.testing.assert_close(ko, kr, **TOL[torch.bfloat16])
    m.half()  # tables are not buffers: they stay fp32
    assert m.cos_sin(device)[0].dtype == torch.float32
    pos = torch.tensor([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]], device=device)
    with torch.no_grad():
        qi, ki = m(q.clone(), k.clone(), position_ids=pos, inplace=True)
    qr, kr = reference.rope(q, k, cos, sin, position_ids=pos, interleaved=True)
    torch.testing.assert_close(qi, qr, **TOL[torch.bfloat16])
    torch.testing.assert_close(ki, kr, **TOL[torch.bfloat16])
    with pytest.raises(ValueError, match=r"rotary_dim must be a positive even number <= head_dim \(32\), got 34"):
        lnn.RotaryEmbedding(32, rotary_dim=34)
    with pytest.raises(ValueError, match=r"head_dim must be a positive even number, got 31"):
        lnn.RotaryEmbedding(31)
    assert "rotary_dim=16" in repr(m)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_cpu(backend):
    cos, sin = _tables(64, 16, "cpu")

    def f(q, k, offset):
        qo, ko = ops.rope(q * 2, k, cos, sin, offset=offset)
        return (qo * ko.repeat_interleave(2, dim=2)).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend=backend, dynamic=True)
    for T, offset in [(4, 0), (1, 4), (1, 5)]:  # prefill, then decode steps with a moving offset
        q = torch.randn(2, T, 4, 16, requires_grad=True)
        k = torch.randn(2, T, 2, 16, requires_grad=True)
        out = compiled(q, k, offset)
        qr, kr = reference.rope(q * 2, k, cos, sin, offset=offset)
        ref = (qr * kr.repeat_interleave(2, dim=2)).sum(-1)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out.sum().backward()
        gq, gk = q.grad.clone(), k.grad.clone()
        q.grad = k.grad = None
        ref.sum().backward()
        torch.testing.assert_close(gq, q.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gk, k.grad, rtol=1e-5, atol=1e-5)


def test_torch_compile_inplace_and_module():
    m = lnn.RotaryEmbedding(16, max_positions=32)
    m.cos_sin("cpu")  # build the table outside the compiled region

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k, pos):
        q2, k2 = m(q, k, position_ids=pos, inplace=True)
        return q2 + 1, k2

    q, k = _qk(1, 3, 2, 1, 16, torch.float32, "cpu")
    pos = torch.tensor([[4, 5, 6]])
    qr, kr = reference.rope(q, k, *m.cos_sin("cpu"), position_ids=pos)
    with torch.no_grad():
        qo, ko = step(q, k, pos)
    torch.testing.assert_close(qo, qr + 1, **TOL[torch.float32])
    torch.testing.assert_close(ko, kr, **TOL[torch.float32])
    torch.testing.assert_close(q, qr, **TOL[torch.float32])  # mutated in place through the compiled graph


@pytest.mark.parametrize("device", DEVICES)
def test_compile_on_device(device):
    # the device-matching compile check (inductor on CUDA, aot_eager on CPU), as in test_rms_norm
    cos, sin = _tables(16, 32, device)

    def f(q, k):
        return ops.rope(q.relu(), k, cos, sin, offset=3, interleaved=True)

    q, k = _qk(2, 4, 4, 2, 32, torch.float32, device)
    backend = "aot_eager" if torch.device(device).type == "cpu" else "inductor"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    for a, b in zip(compiled(q, k), reference.rope(q.relu(), k, cos, sin, offset=3, interleaved=True)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_large_positions_keep_precision():
    # the table forms pos * theta in fp64 (theta rounded to fp32, as HF's inv_freq is): at position 100k the
    # rotation still matches fp64 math with those thetas to fp32 rounding (an fp32 angle would be off by ~4e-3 rad)
    d, P = 64, 100_008
    cos, sin = reference.rope_cos_sin(P, d, 500000.0)
    q, k = _qk(1, 8, 1, 1, d, torch.float64, "cpu")
    qo, _ = ops.rope(q.float(), k.float(), cos, sin, offset=P - 8)
    inv = reference.rope_inv_freq(d, 500000.0).double()
    ang = torch.outer(torch.arange(P - 8, P, dtype=torch.float64), inv).view(1, 8, 1, d // 2)
    a, b = q[..., : d // 2], q[..., d // 2:]
    expect = torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)
    torch.testing.assert_close(qo.double(), expect, rtol=0, atol=1e-5)  # |q| < ~5: a few fp32 ulp


def test_module_table_grows_under_compile():
    # growing the table inside a compiled function: recompiles, stays correct, no graph break (fullgraph)
    m = lnn.RotaryEmbedding(16, max_positions=4)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(q, k, offset):
        return m(q, k, offset=offset)

    for offset in (0, 6, 20):
        q, k = _qk(1, 3, 2, 1, 16, torch.float32, "cpu")
        cos, sin = reference.rope_cos_sin(64, 16)
        for a, b in zip(f(q, k, offset), reference.rope(q, k, cos, sin, offset=offset)):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
        assert m.max_positions >= offset + 3
