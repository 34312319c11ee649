"""The CUDA kernels (csrc/cuda) run on the CPU through the emulator (lladapter_ext.emulator, docs/emulator.md):
what only the emulator can check. The kernels' numerics against reference.py are the "emu" variants of the op
tests (test_rms_norm.py, test_rope.py, test_gated_prompt_attention*.py, test_swiglu.py); this file adds

- coverage: every CUDA kernel of the package launches (19 of 19);
- schedules: each kernel gives bitwise-identical results when its threads run in other orders (in-order,
  reverse, two seeded random orders): a result that depends on the order means a missing barrier;
- wmma layouts: the tensor-core kernels give bitwise-identical results under the sm_80 fragment layout and a
  scrambled one (they must use the wmma API only, never assume which element a lane holds);
- device profiles: the SM-count-dependent choices (RMSNorm dweight splits, RoPE's and SwiGLU's grid-stride loops,
  split-K decode chunks) at other SM counts;
- device-side asserts become Python errors that name the kernel, block and thread.
"""
import math

import pytest
import torch

from lladapter_ext import emulator, ops, reference

from conftest import EMU_SKIP_REASON
from test_gated_prompt_attention import TOL, make_inputs

pytestmark = [pytest.mark.emu, pytest.mark.skipif(not emulator.available(), reason=EMU_SKIP_REASON)]

# Every __global__ function in csrc/cuda (the wmma layout probe aside).
CUDA_KERNELS = {
    "rms_norm_fwd_kernel", "rms_norm_bwd_dx_kernel", "rms_norm_bwd_dw_partial_kernel", "rms_norm_bwd_dw_final_kernel",
    "rope_kernel",
    "gpa_fwd_kernel", "gpa_bwd_pre_kernel", "gpa_bwd_dq_kernel", "gpa_bwd_dkv_kernel", "gpa_bwd_dpkv_kernel",
    "gpa_decode_partial_kernel", "gpa_decode_combine_kernel",
    "gpa_fwd_mma_kernel", "gpa_bwd_dq_mma_kernel", "gpa_bwd_dkv_mma_kernel",
    "quantized_linear_int8_kernel", "quantized_linear_int4_kernel",
    "dequantize_rows_int8_kernel", "dequantize_rows_int4_kernel",
    "swiglu_fwd_kernel", "swiglu_bwd_kernel",
}


@pytest.fixture(autouse=True)
def _emulated(monkeypatch):
    monkeypatch.delenv("LLADAPTER_CUDA_ATTN", raising=False)
    monkeypatch.delenv("LLADAPTER_CUDA_DECODE", raising=False)
    with emulator.kernels(), emulator.guarded_memory():
        yield


def _rms_norm_case(width, dtype=torch.float32):
    x = torch.randn(3, 5, width).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(width)).to(dtype).requires_grad_()
    y = ops.rms_norm(x, w, 1e-6)
    y.backward(torch.randn_like(y))
    return [y.detach(), x.grad, w.grad]


def _rope_case(interleaved, dim=64):
    q = torch.randn(2, 7, 4, dim, requires_grad=True)
    k = torch.randn(2, 7, 2, dim, requires_grad=True)
    cos, sin = reference.rope_cos_sin(16, dim)
    qo, ko = ops.rope(q, k, cos, sin, offset=3, interleaved=interleaved)
    (qo.square().sum() + ko.sum()).backward()
    return [qo.detach(), ko.detach(), q.grad, k.grad]


def _attention_case(dtype, Tq=20, Tk=40, d=64, monkeypatch=None, **kw):
    q, k, v, pk, pv, gate, ks = make_inputs(B=2, Tq=Tq, Tk=Tk, H=4, Hkv=2, d=d, K=5, dtype=dtype, **kw)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, gate)]
    out = ops.gated_prompt_attention(q, k, v, pk, pv, gate, kv_start=ks, backend="fused")
    out.backward(torch.randn_like(out))
    return [out.detach()] + [t.grad for t in leaves]


def _quantized_linear_case():
    from lladapter_ext import quantize as Q
    c8, s8 = Q.quantize_int8(torch.randn(40, 67) / 8)
    c4, s4 = Q.quantize_int4(torch.randn(48, 64) / 8, 32)  # a 32-row block and the trailing 16-row one
    x8, x4 = torch.randn(5, 67), torch.randn(5, 64).bfloat16()
    out8, out4 = torch.empty(30, 67), torch.empty(16, 64).bfloat16()
    return [ops.quantized_linear(x8, c8, s8), ops.quantized_linear(x4, Q.pack_int4(c4), s4),
            ops.dequantize_rows(c8, s8, 5, 35, out8), ops.dequantize_rows(Q.pack_int4(c4), s4, 32, 48, out4)]


def _swiglu_case():
    # vectorised (fp32, 16-byte aligned rows) and scalar (bf16 halves of an odd width) paths, forward and backward
    results = []
    for x in (torch.randn(3, 5, 128), torch.randn(4, 2 * 67).bfloat16()):
        x.requires_grad_()
        gate, up = x.chunk(2, dim=-1)
        y = ops.swiglu(gate, up)
        y.backward(torch.randn_like(y))
        results += [y.detach(), x.grad]
    return results


def _all_paths(monkeypatch):
    """Results of every kernel path: RMSNorm (vectorised and scalar, warp- and block-per-row), RoPE (both layouts,
    vectorised and scalar), attention SIMT (fp32), tensor-core (bf16), split-K decode forward (fp32, forced),
    quantized_linear (int8 per row, int4 with a trailing 16-row block; 5 rows: a full and a partial row chunk),
    dequantize_rows (int8 rows 5-35 in fp32, int4's trailing block in bf16),
    SwiGLU (vectorised and scalar, forward and backward)."""
    results = []
    results += _rms_norm_case(64) + _rms_norm_case(67) + _rms_norm_case(4096, torch.bfloat16)
    results += _rope_case(True) + _rope_case(False) + _rope_case(False, dim=6)
    results += _attention_case(torch.float32)
    results += _attention_case(torch.bfloat16, Tq=70, Tk=70)
    monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "splitk")
    results += _attention_case(torch.float32, Tq=2, Tk=100)
    monkeypatch.delenv("LLADAPTER_CUDA_DECODE")
    results += _quantized_linear_case()
    results += _swiglu_case()
    return results


def _same_bits(a, b):
    return all(x.shape == y.shape and torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x, y)
               and torch.equal(torch.isnan(x), torch.isnan(y)) for x, y in zip(a, b))


def test_every_cuda_kernel_runs(monkeypatch):
    emulator.reset_stats()
    _all_paths(monkeypatch)
    launched = {name.split("<")[0].strip() for name in emulator.launched_kernels()}
    missing = CUDA_KERNELS - launched
    assert not missing, f"CUDA kernels that never launched: {sorted(missing)}"
    stats = emulator.stats()
    assert stats["launches"] >= len(CUDA_KERNELS) and stats["context_switches"] > 0


@pytest.mark.parametrize("schedule", [dict(schedule="reverse"), dict(schedule="random", seed=1),
                                      dict(schedule="random", seed=2)])
def test_results_do_not_depend_on_thread_order(monkeypatch, schedule):
    # our kernels are deterministic by design: the order the emulator runs threads in between barriers must not
    # change a single bit (a difference means a missing __syncthreads / __syncwarp)
    with emulator.configured(schedule="inorder"):
        torch.manual_seed(0)
        base = _all_paths(monkeypatch)
    with emulator.configured(**schedule):
        torch.manual_seed(0)
        other = _all_paths(monkeypatch)
    assert _same_bits(base, other)


@pytest.mark.parametrize("layout_seed", [1, 2])
def test_tensor_core_kernels_do_not_depend_on_the_fragment_layout(layout_seed):
    with emulator.configured(layout="sm80"):
        torch.manual_seed(0)
        base = _attention_case(torch.bfloat16, Tq=70, Tk=90) + _attention_case(torch.float16, Tq=33, Tk=20, d=80)
    with emulator.configured(layout="scrambled", layout_seed=layout_seed):
        torch.manual_seed(0)
        other = _attention_case(torch.bfloat16, Tq=70, Tk=90) + _attention_case(torch.float16, Tq=33, Tk=20, d=80)
    assert _same_bits(base, other)


def test_wmma_fragment_layout_table_is_sm80():
    # the table EMULATOR.md gives for sm_80 / sm_90 (two mma.m16n8k16 fragments; g = lane >> 2, t = lane & 3);
    # scripts/gpu_check.sh compares the same probe on a real GPU (tests/test_emulator_vs_gpu.py)
    with emulator.configured(layout="sm80"):
        table = emulator.wmma_fragment_layouts()
    lanes = torch.arange(32)
    g, t = lanes // 4, lanes % 4

    def codes(rows, cols):
        return rows * 16 + cols

    i = torch.arange(8)
    a_row = g[:, None] + 8 * ((i[None, :] >> 1) & 1)
    a_col = 2 * t[:, None] + (i[None, :] & 1) + 8 * ((i[None, :] >> 2) & 1)
    b_k = 2 * t[:, None] + (i[None, :] & 1) + 8 * ((i[None, :] >> 1) & 1)
    b_n = g[:, None] + 8 * ((i[None, :] >> 2) & 1)
    # the probe stores code e at memory offset e; a row-major fragment reads element (r, c) at offset r * 16 + c,
    # a col-major B reads element (k, n) at offset n * 16 + k (the accumulator probes write memory in the layout
    # they load, so both hold code r * 16 + c)
    a = codes(a_row, a_col).float()
    b_row = codes(b_k, b_n).float()
    b_col = codes(b_n, b_k).float()
    acc = codes(a_row, a_col).float()
    for kind, want, n in [(0, a, 16), (1, b_row, 16), (2, b_col, 16), (3, a, 8), (4, b_row, 8), (5, b_col, 8),
                          (6, acc, 8), (7, acc, 8)]:
        got = table[kind, :, :n]
        torch.testing.assert_close(got[:, :8], want, rtol=0, atol=0, msg=f"fragment kind {kind}")
        if n == 16:  # fp16 A/B: x[i + 8] duplicates x[i]
            torch.testing.assert_close(got[:, 8:], want, rtol=0, atol=0, msg=f"fragment kind {kind}, x[8:16]")
        assert torch.isnan(table[kind, :, n:]).all()
    with emulator.configured(layout="scrambled", layout_seed=5):
        assert not torch.equal(emulator.wmma_fragment_layouts()[:, :, :8], table[:, :, :8])


@pytest.mark.parametrize("profile,sm_count", [("sm80", None), ("sm90", 2), ("sm80", 1)])
def test_sm_count_dependent_choices(monkeypatch, profile, sm_count):
    with emulator.device_profile(profile, sm_count) as dev:
        assert dev["name"] == profile and (sm_count is None or dev["sm_count"] == sm_count)
        # RMSNorm dweight: row splits from the SM count
        x = torch.randn(300, 40, requires_grad=True)
        w = torch.rand(40, requires_grad=True)
        y = ops.rms_norm(x, w)
        gy = torch.randn_like(y)
        y.backward(gy)
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        reference.rms_norm(xr, wr, 1e-6).backward(gy)
        torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-4)
        # RoPE: 64 blocks per SM, so 1-2 SMs put several rows on each block (grid-stride loop)
        q, k = torch.randn(3, 50, 4, 64), torch.randn(3, 50, 1, 64)
        cos, sin = reference.rope_cos_sin(60, 64)
        qo, ko = ops.rope(q, k, cos, sin, offset=5)
        rq, rk = reference.rope(q, k, cos, sin, offset=5)
        torch.testing.assert_close(qo, rq, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ko, rk, rtol=1e-5, atol=1e-5)
        # SwiGLU: at most 8 blocks of 256 threads per SM, so 1-2 SMs make each thread take several vectors
        g, u = torch.randn(40, 400), torch.randn(40, 400)
        torch.testing.assert_close(ops.swiglu(g, u), reference.swiglu(g, u), rtol=1e-6, atol=1e-6)
        # split-K decode: the chunk count follows the SM count
        monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "auto")
        q, k, v, pk, pv, gate, ks = make_inputs(B=1, Tq=1, Tk=600, H=4, Hkv=1, d=64, K=3, kv_start=[7])
        out = ops.gated_prompt_attention(q, k, v, pk, pv, gate, kv_start=ks, backend="fused")
        ref = reference.gated_prompt_attention(q, k, v, pk, pv, gate, kv_start=ks)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_device_side_assert_names_kernel_block_and_thread():
    # RoPE checks explicit position ids on the device (as torch's indexing kernels do): under the emulator a failed
    # CUDA_KERNEL_ASSERT is a Python error, not an abort
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64)
    cos, sin = reference.rope_cos_sin(8, 64)
    pos = torch.tensor([[0, 1, 9, 2]])
    with pytest.raises(RuntimeError) as err:
        ops.rope(q, k, cos, sin, position_ids=pos)
    msg = str(err.value)
    assert "rope_kernel" in msg and "position_ids outside the cos/sin table" in msg
    assert "block" in msg and "thread" in msg


def test_float64_refused_like_on_cuda():
    x = torch.randn(2, 64, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"x must have dtype in \{Float, BFloat16, Half\}"):
        ops.rms_norm(x, torch.ones(64, dtype=torch.float64))
    q = torch.randn(1, 3, 2, 64, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"q must have dtype in \{Float, BFloat16, Half\}"):
        ops.gated_prompt_attention(q, q, q, backend="fused")


def test_unsupported_head_dim_refused_like_on_cuda():
    q = torch.randn(1, 3, 2, 40)
    with pytest.raises(RuntimeError, match=r"supports head_dim \(q.size\(3\)\) in \{64, 80, 96, 128\}, got 40"):
        ops.gated_prompt_attention(q, q, q, backend="fused")
    # backend="auto" picks the reference for such head dims, as on CUDA
    out = ops.gated_prompt_attention(q, q, q)
    want = reference.gated_prompt_attention(q, q, q, None, None, None, causal=True, scale=1 / math.sqrt(40))
    torch.testing.assert_close(out, want)


def test_auto_backend_takes_the_decode_kernels_for_decode_steps(monkeypatch):
    """On CUDA (here the emulated kernels), auto sends a decode step without gradients (<= 4 query rows against
    >= 256 keys) to the fused op, whose split-K decode kernels take it, and everything else to split."""
    torch.manual_seed(0)
    B, H, Hkv, d, K = 2, 4, 2, 64, 10
    pk, pv = torch.randn(1, K, Hkv, d), torch.randn(1, K, Hkv, d)
    gate = torch.full((H,), 0.5)

    def pick(Tq, Tk, grad=False):
        q = torch.randn(B, Tq, H, d, requires_grad=grad)
        return ops._auto_attention_backend(q, torch.randn(B, Tk, Hkv, d), pk, pv, gate)

    assert pick(1, ops.CUDA_DECODE_MIN_TK) == pick(ops.CUDA_DECODE_MAX_TQ, 4096) == "fused"
    assert pick(1, ops.CUDA_DECODE_MIN_TK - 1) == pick(ops.CUDA_DECODE_MAX_TQ + 1, 4096) == "split"
    assert pick(1, 4096, grad=True) == "split"  # the decode kernels have no backward of their own
    with torch.no_grad():
        assert pick(1, 4096, grad=True) == "fused"
    monkeypatch.setenv("LLADAPTER_CUDA_DECODE", "off")  # the fused op would not take its decode kernels
    assert pick(1, 4096) == "split"
    monkeypatch.delenv("LLADAPTER_CUDA_DECODE")

    # the decode step through auto: the same outputs as the decode kernels called as the fused op, and within fp32
    # tolerance of the reference
    q, k, v = torch.randn(B, 1, H, d), torch.randn(B, 300, Hkv, d), torch.randn(B, 300, Hkv, d)
    out = ops.gated_prompt_attention(q, k, v, pk, pv, gate)
    assert torch.equal(out, ops.gated_prompt_attention(q, k, v, pk, pv, gate, backend="fused"))
    want = reference.gated_prompt_attention(q, k, v, pk, pv, gate, causal=True, scale=1 / math.sqrt(d))
    torch.testing.assert_close(out, want, **TOL[torch.float32])
