"""The emulator against the hardware (needs a CUDA GPU and the emulator; scripts/gpu_check.sh runs it): the same
kernels on identical inputs on the GPU and on the CPU through the emulator, and the wmma fragment layout the
emulator assumes against the one the GPU has. Agreement here is what lets every CI run trust the emulator.

The two cannot agree bit for bit: the GPU's expf/logf/rsqrtf differ from the host's in the last ulp, and tensor
cores do not round like sequential fp32 fmas. Tolerances: fp32 a few ulp of the sums (TOL), bf16/fp16 the dtype's
rounding of out (TOL) plus, on tensor-core paths, the P rounding bound the kernels' own tests use (mma_tol).
"""
import pytest
import torch

import lladapter_ext
from lladapter_ext import emulator, ops

from conftest import CUDA_SKIP_REASON, EMU_SKIP_REASON, HAS_CUDA_GPU
from test_gated_prompt_attention import GRAD_TOL, TOL, make_inputs, mma_tol

pytestmark = [pytest.mark.skipif(not HAS_CUDA_GPU, reason=CUDA_SKIP_REASON),
              pytest.mark.skipif(not emulator.available(), reason=EMU_SKIP_REASON)]


def test_wmma_fragment_layouts_match_the_gpu():
    gpu = lladapter_ext._C.wmma_fragment_layouts().cpu()
    with emulator.configured(layout="sm80"):
        emu = emulator.wmma_fragment_layouts()
    kinds = ["A fp16 row", "B fp16 row", "B fp16 col", "A bf16 row", "B bf16 row", "B bf16 col", "acc row",
             "acc col"]
    for i, kind in enumerate(kinds):
        torch.testing.assert_close(emu[i], gpu[i], rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, kind=kind: f"wmma fragment layout differs for {kind}: {m}")


def _on(device, tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def _attention(inp, gout):
    q, k, v, pk, pv, gate, ks = inp
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, gate) if t is not None]
    out = ops.gated_prompt_attention(q, k, v, pk, pv, gate, kv_start=ks, backend="fused")
    out.backward(gout.to(out.device))
    return [out.detach()] + [t.grad for t in leaves]


CASES = [  # (dtype, Tq, Tk, d, env): SIMT fp32, tensor-core bf16/fp16, split-K decode
    (torch.float32, 37, 70, 64, {}),
    (torch.bfloat16, 70, 130, 128, {}),
    (torch.float16, 33, 65, 80, {}),
    (torch.float32, 2, 600, 96, {"LLADAPTER_CUDA_DECODE": "splitk"}),
    (torch.bfloat16, 1, 300, 64, {"LLADAPTER_CUDA_DECODE": "auto"}),
]


@pytest.mark.parametrize("dtype,Tq,Tk,d,env", CASES)
def test_attention_gpu_equals_emulator(monkeypatch, dtype, Tq, Tk, d, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    inp = make_inputs(B=2, Tq=Tq, Tk=Tk, H=4, Hkv=2, d=d, K=7, dtype=dtype, kv_start=[0, 5])
    gout = torch.randn(inp[0].shape).to(dtype)
    gpu = _attention(_on("cuda", [t.clone() if t is not None else None for t in inp]), gout)
    with emulator.kernels():
        emu = _attention([t.clone() if t is not None else None for t in inp], gout)
    q, k, v, pk, pv, gate, _ = inp
    out_tol = mma_tol(dtype, v, pv, gate) if dtype != torch.float32 else TOL[dtype]
    torch.testing.assert_close(gpu[0].cpu(), emu[0], **out_tol)
    for g, e in zip(gpu[1:], emu[1:]):
        scale = max(1.0, e.float().abs().max().item())
        tol = GRAD_TOL[dtype]
        torch.testing.assert_close(g.cpu().float(), e.float(), rtol=tol["rtol"], atol=tol["atol"] * scale * 4)


@pytest.mark.parametrize("dtype,width", [(torch.float32, 4096), (torch.bfloat16, 67), (torch.float16, 8193)])
def test_rms_norm_gpu_equals_emulator(dtype, width):
    x = torch.randn(6, width).to(dtype)
    w = (1 + 0.5 * torch.randn(width)).to(dtype)
    gy = torch.randn(6, width).to(dtype)

    def run(device):
        xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        y = ops.rms_norm(xd, wd)
        y.backward(gy.to(device))
        return [t.detach().cpu().float() for t in (y, xd.grad, wd.grad)]

    gpu = run("cuda")
    with emulator.kernels():
        emu = run("cpu")
    for g, e in zip(gpu, emu):
        torch.testing.assert_close(g, e, rtol=GRAD_TOL[dtype]["rtol"],
                                   atol=GRAD_TOL[dtype]["atol"] * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_gpu_equals_emulator(interleaved):
    from lladapter_ext import reference
    q, k = torch.randn(2, 9, 4, 128), torch.randn(2, 9, 2, 128)
    cos, sin = reference.rope_cos_sin(32, 128)
    pos = torch.randint(0, 32, (2, 9))
    gpu = ops.rope(q.cuda(), k.cuda(), cos.cuda(), sin.cuda(), position_ids=pos.cuda(), interleaved=interleaved)
    with emulator.kernels():
        emu = ops.rope(q, k, cos, sin, position_ids=pos, interleaved=interleaved)
    for g, e in zip(gpu, emu):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-6, atol=1e-6)


def _quantized_weight(fmt):
    """Codes and scales of a random 80 x 192 weight: int4 (two 32-row blocks and the trailing 16-row one), int8 with
    one scale per row, or int8 with fp16 scales per block of 32 inputs (int8_blocks)."""
    from lladapter_ext import quantize as Q
    w = torch.randn(80, 192) / 14
    if fmt == "int4":
        c, scales = Q.quantize_int4(w, 32)
        return Q.pack_int4(c), scales
    codes, scales = Q.quantize_int8(w)
    if fmt == "int8_blocks":
        scales = scales[:, None].expand(80, 6).half().contiguous()
    return codes, scales


@pytest.mark.parametrize("fmt", ["int8", "int8_blocks", "int4"])
def test_quantized_linear_gpu_equals_emulator(fmt):
    # the same kernel source and summation order on both: equal up to fp32 rounding of contracted multiply-adds
    codes, scales = _quantized_weight(fmt)
    x = torch.randn(5, 192).bfloat16()
    gpu = ops.quantized_linear(x.cuda(), codes.cuda(), scales.cuda())
    with emulator.kernels():
        emu = ops.quantized_linear(x, codes, scales)
    torch.testing.assert_close(gpu.cpu().float(), emu.float(), rtol=2**-7, atol=1e-5 * emu.float().abs().max().item())


@pytest.mark.parametrize("fmt", ["int8", "int8_blocks", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_rows_gpu_equals_emulator_and_dequantize(fmt, dtype):
    # one rounded product (and for int4 one rounded sum: __fmul_rn / __fadd_rn, never an FMA), one rounding to the
    # dtype: bitwise equal on the GPU, the emulator and quantize.dequantize
    from lladapter_ext import quantize as Q
    codes, scales = _quantized_weight(fmt)
    want = Q.dequantize(codes, scales, dtype)[32:80]
    gpu = ops.dequantize_rows(codes.cuda(), scales.cuda(), 32, 80, torch.empty(48, 192, dtype=dtype, device="cuda"))
    with emulator.kernels():
        emu = ops.dequantize_rows(codes, scales, 32, 80, torch.empty(48, 192, dtype=dtype))
    assert torch.equal(gpu.cpu(), want) and torch.equal(emu, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_gpu_equals_emulator(dtype):
    # the same fp32 formulas on both; the GPU's expf and the host's differ by an ulp or two (and nvcc contracts
    # multiply-adds), and fp32 results round to bf16/fp16 alike unless they sit on a rounding boundary (one ulp)
    x = (3 * torch.randn(6, 2 * 200)).to(dtype)
    xg = x.cuda()
    # the halves of one projection (strided rows, vectorised), then an odd width at an odd offset (one element a step)
    for cut in (lambda t: t.chunk(2, dim=-1), lambda t: (t[:, 1:200], t[:, 201:])):
        (gate, up), (gate_g, up_g) = cut(x), cut(xg)
        grad = torch.randn(gate.shape).to(dtype)
        gpu = [ops.swiglu(gate_g, up_g), *torch.ops.lladapter.swiglu_backward(grad.cuda(), gate_g, up_g)]
        with emulator.kernels():
            emu = [ops.swiglu(gate, up), *torch.ops.lladapter_emu.swiglu_backward(grad, gate, up)]
        rtol = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
        for g, e in zip(gpu, emu):
            scale = e.float().abs().max().item()
            torch.testing.assert_close(g.cpu().float(), e.float(), rtol=rtol, atol=1e-6 * scale)
