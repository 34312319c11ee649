"""swiglu op (y = silu(gate) * up, one pass each way): kernels vs reference.py in fp32/bf16/fp16 forward and backward,
fp64 gradcheck, opcheck, strided inputs, empty tensors, non-finite inputs against eager PyTorch, the argument errors
on every backend (the fake included); CPU, CUDA, and the CUDA kernels through the emulator."""
import re

import pytest
import torch
import torch.nn.functional as F

from lladapter_ext import ops, reference

from conftest import CUDA_DEVICES, DEVICES, KernelDevice, kernel_ops

# The CPU kernel has two vector paths (csrc/cpu/swiglu.cpp): AVX-512 where the CPU has it (what "cpu" runs on such a
# machine) and at::vec (8 lanes under AVX2) elsewhere; "cpu_vec" forces the latter with LLADAPTER_SWIGLU_ISA=vec.
CPU_VEC = KernelDevice("cpu_vec", "cpu", False)
SW_DEVICES = DEVICES + [pytest.param(CPU_VEC, id="cpu_vec")]


@pytest.fixture(autouse=True)
def _cpu_path(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device") if callspec is not None else None
    if isinstance(device, KernelDevice) and device.name == "cpu_vec":
        monkeypatch.setenv("LLADAPTER_SWIGLU_ISA", "vec")
    else:
        monkeypatch.delenv("LLADAPTER_SWIGLU_ISA", raising=False)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U32 = 2.0**-24  # fp32 unit roundoff
# The kernels compute in fp32: exp (<= 1 ulp on the CPU's Sleef and glibc, <= 2 ulp for CUDA's expf), one divide and
# a handful of multiplies (+ one fma in dgate), a relative error below ~8 u of the terms' magnitude; 16 u leaves room.
FP32_TERMS = 16 * U32
# Then one rounding to the output dtype: at most half an ulp, 2^-8 (bf16, 8 significant bits) or 2^-11 (fp16) of the
# value, plus half the spacing of fp16's subnormals (2^-25) for results below 2^-14.
HALF_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SUBNORMAL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}
SHAPES = [(1,), (7,), (3, 5, 64), (2, 3, 67), (4, 1536)]


def _inputs(shape, dtype, device, scale=3.0):
    # gate spread over [-12, 12] or so (both tails of the sigmoid), up and grad of unit size
    gate = (scale * torch.randn(shape)).to(dtype).to(device)
    up = torch.randn(shape).to(dtype).to(device)
    grad = torch.randn(shape).to(dtype).to(device)
    return gate, up, grad


def _sigmoid64(g):
    return torch.sigmoid(g.double())


def _assert_within(got, want, terms, dtype, what):
    """|got - want| <= FP32_TERMS * terms + half an ulp of dtype at want (+ fp16's subnormal spacing): want is the fp64
    reference on the same (rounded) inputs, terms the magnitude the fp32 rounding errors scale with."""
    assert got.dtype == dtype and got.shape == want.shape, what
    err = (got.double() - want).abs()
    allowed = FP32_TERMS * terms + HALF_ULP[dtype] * (1 + 64 * U32) * want.abs() + SUBNORMAL[dtype]
    bad = ~(err <= allowed)
    assert not bad.any(), f"{what}: {bad.sum().item()} elements off, max excess {(err - allowed).max().item()}"


def _check_forward(y, gate, up):
    want = reference.swiglu(gate.double(), up.double())
    _assert_within(y, want, want.abs(), gate.dtype, "y")


def _check_backward(dgate, dup, grad, gate, up):
    """Against autograd through reference.swiglu in fp64 on the same inputs."""
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    reference.swiglu(g64, u64).backward(grad.double())
    s = _sigmoid64(gate)
    dgate_terms = (grad.double() * up.double()).abs() * s * (1 + gate.double().abs() * (1 - s))
    _assert_within(dgate, g64.grad, dgate_terms, gate.dtype, "dgate")
    _assert_within(dup, u64.grad, u64.grad.abs(), gate.dtype, "dup")


@pytest.mark.parametrize("device", SW_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(device, dtype, shape):
    gate, up, _ = _inputs(shape, dtype, device)
    y = ops.swiglu(gate, up)
    assert y.shape == gate.shape and y.is_contiguous()
    _check_forward(y, gate, up)


@pytest.mark.parametrize("device", SW_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_reference(device, dtype, shape):
    gate, up, grad = _inputs(shape, dtype, device)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    ops.swiglu(g, u).backward(grad)
    _check_backward(g.grad, u.grad, grad, gate, up)


@pytest.mark.parametrize("device", SW_DEVICES)
def test_matches_eager_silu_times_up(device):
    # what the op replaces, in fp32 with autograd: the same function to fp32 rounding
    gate, up, grad = _inputs((6, 130), torch.float32, device)
    g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g2, u2 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y1, y2 = ops.swiglu(g1, u1), F.silu(g2) * u2
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1.grad, g2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u1.grad, u2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", SW_DEVICES)
def test_only_one_input_requires_grad(device):
    gate, up, grad = _inputs((3, 16), torch.float32, device)
    g = gate.clone().requires_grad_()
    ops.swiglu(g, up).backward(grad)
    u = up.clone().requires_grad_()
    ops.swiglu(gate, u).backward(grad)
    _check_backward(g.grad, u.grad, grad, gate, up)


def test_gradcheck_float64():
    gate = (3 * torch.randn(3, 2, 17, dtype=torch.float64)).requires_grad_()
    up = torch.randn(3, 2, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (gate, up))
    # one leaf twice, its two halves (strided rows, read in place), a transpose (copied)
    x = (3 * torch.randn(4, 10, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ops.swiglu(a, a), (x,))
    assert torch.autograd.gradcheck(lambda a: ops.swiglu(*a.chunk(2, dim=-1)), (x,))
    assert torch.autograd.gradcheck(lambda a: ops.swiglu(a.t(), 2 * a.t()), (x,))
    # fp64 math in fp64: equal to the fp64 reference to fp64 rounding
    torch.testing.assert_close(ops.swiglu(gate, up), reference.swiglu(gate, up), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("device", SW_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    gate, up, grad = _inputs((4, 33), dtype, device)
    torch.library.opcheck(kernel_ops().swiglu.default, (gate.requires_grad_(), up.requires_grad_()))
    torch.library.opcheck(kernel_ops().swiglu_backward.default, (grad, gate.detach(), up.detach()))
    # strided operands (the halves of one projection)
    both = torch.randn(4, 66, device=device).to(dtype)
    torch.library.opcheck(kernel_ops().swiglu.default, (both[:, :33], both[:, 33:]))
    if not device.cuda_kernels:
        gd = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        ud = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(kernel_ops().swiglu.default, (gd, ud))


@pytest.mark.parametrize("device", [d for d in SW_DEVICES if d.id != "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_is_the_fp32_result_rounded(device, dtype):
    # inputs exact in the dtype: the kernel's fp32 math is the same for dtype and fp32 inputs, so the dtype's output
    # must be the fp32 output rounded to nearest even, bit for bit (NaN, inf and fp16 subnormals included); the real
    # GPU is left out, as nvcc may contract multiply-adds differently in the two instantiations
    gate = torch.cat([3 * torch.randn(3000), torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -12.0])])
    up = torch.cat([torch.randn(3000) * torch.logspace(-8, 4, 3000), torch.tensor([1.0, 1.0, 2.0, 5.0, 1e-3])])
    gate, up = gate.to(dtype).to(device), up.to(dtype).to(device)
    grad = torch.randn(gate.shape).to(dtype).to(device)
    got = [ops.swiglu(gate, up), *kernel_ops().swiglu_backward(grad, gate, up)]
    f32 = [ops.swiglu(gate.float(), up.float()),
           *kernel_ops().swiglu_backward(grad.float(), gate.float(), up.float())]
    for g, f in zip(got, f32):
        assert g.dtype == dtype
        want = f.to(dtype)
        same = (g.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(g) & torch.isnan(want))
        assert same.all(), (g[~same], want[~same])


def _strided_cases(device, dtype):
    """(name, gate, up): views read in place (rows with their own stride) and views that are copied."""
    F_ = 64
    x = torch.randn(6, 2 * F_, device=device).to(dtype)
    x3 = torch.randn(2, 5, 2 * 67, device=device).to(dtype)
    y = torch.randn(9, 2 * F_ + 1, device=device).to(dtype)
    t = torch.randn(40, 12, device=device).to(dtype)
    w = torch.randn(5, 2, 48, device=device).to(dtype)
    row = torch.randn(1, 48, device=device).to(dtype)
    return [
        ("halves of [M, 2F]", x[:, :F_], x[:, F_:]),
        ("halves of [B, T, 2F], odd F", x3[..., :67], x3[..., 67:]),
        ("rows offset by one element (unaligned)", y[:, 1:F_ + 1], y[:, F_ + 1:]),
        ("gate strided, up contiguous", x[:, F_:], torch.randn(6, F_, device=device).to(dtype)),
        ("transposed (copied)", t.t(), torch.randn(12, 40, device=device).to(dtype)),
        ("stride 2 in the last dim (copied)", x[:, ::2], x[:, 1::2]),
        ("leading dims that do not collapse (copied)", w[:, :, :24], w[:, :, 24:]),
        ("broadcast rows, stride 0", row.expand(7, 48), torch.randn(7, 48, device=device).to(dtype)),
    ]


@pytest.mark.parametrize("device", SW_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(device, dtype):
    for name, gate, up in _strided_cases(device, dtype):
        y = ops.swiglu(gate, up)
        assert y.is_contiguous(), name
        _check_forward(y, gate, up)
        # backward with a non-contiguous grad as well
        grad = torch.randn(gate.shape[::-1], device=device).to(dtype).transpose(0, -1) if gate.dim() == 2 else \
            torch.randn(gate.shape, device=device).to(dtype)
        dgate, dup = kernel_ops().swiglu_backward(grad, gate, up)
        assert dgate.is_contiguous() and dup.is_contiguous(), name
        _check_backward(dgate, dup, grad, gate, up)
    # through autograd, the halves of one leaf: its gradient is the two outputs side by side
    x = torch.randn(5, 2 * 40, device=device).to(dtype).requires_grad_()
    gate, up = x.chunk(2, dim=-1)
    go = torch.randn(5, 40, device=device).to(dtype)
    ops.swiglu(gate, up).backward(go)
    dgate, dup = kernel_ops().swiglu_backward(go, gate.detach(), up.detach())
    assert torch.equal(x.grad, torch.cat([dgate, dup], -1))


@pytest.mark.parametrize("device", SW_DEVICES)
@pytest.mark.parametrize("shape", [(0,), (0, 16), (4, 0), (2, 0, 3)], ids=str)
def test_empty(device, shape):
    gate = torch.randn(shape, device=device, requires_grad=True)
    up = torch.randn(shape, device=device, requires_grad=True)
    y = ops.swiglu(gate, up)
    assert y.shape == shape
    y.sum().backward()
    assert gate.grad.shape == shape and up.grad.shape == shape


# gate values: +-inf, NaN, signed zeros, the sigmoid's tails within fp32 eager's range (exp(-x) overflows below -88.7,
# see test_negative_tail_is_accurate), huge values; up values likewise (0 makes inf * 0)
NONFINITE_GATE = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1.0, -1.2785, 15.0, -15.0, 80.0, -80.0, 3e4,
                  -3e4]
NONFINITE_UP = [1.0, -2.0, 0.0, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("device", SW_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_inputs_match_eager(device, dtype):
    # every (gate, up) pair: wherever eager F.silu(gate) * up (and its autograd) is NaN or +-inf, so is the op, and
    # where eager is finite the op is too and close to it. In particular silu(+inf) = +inf, silu(-inf) = NaN
    # (-inf * sigmoid(-inf) = -inf * 0), and both gradients at gate = +-inf are NaN but dup at +inf (= grad * inf).
    g0 = torch.tensor(NONFINITE_GATE, dtype=torch.float64)
    u0 = torch.tensor(NONFINITE_UP, dtype=torch.float64)
    gate = g0[:, None].expand(-1, len(u0)).reshape(-1).to(dtype).to(device)
    up = u0[None, :].expand(len(g0), -1).reshape(-1).to(dtype).to(device)
    grad = torch.full_like(gate, 0.75)
    g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g2, u2 = gate.float().requires_grad_(), up.float().requires_grad_()
    y1 = ops.swiglu(g1, u1)
    y1.backward(grad)
    y2 = F.silu(g2) * u2  # eager in fp32 (bf16/fp16 eager rounds silu first: a different finite value)
    y2.backward(grad.float())
    for name, got, want in (("y", y1, y2), ("dgate", g1.grad, g2.grad), ("dup", u1.grad, u2.grad)):
        want = want.to(dtype)  # fp32 overflowing the dtype is inf in both
        assert got.dtype == dtype
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)), name
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), name
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin].float(), want[fin].float(), rtol=2 * HALF_ULP[dtype] + 1e-6, atol=1e-6,
                                   msg=name)
    # spelled out (row i of NONFINITE_GATE, column j of NONFINITE_UP at i * len(u0) + j): gate = +inf, up = 1
    assert y1[0].item() == float("inf") and g1.grad[0].isnan() and u1.grad[0].item() == float("inf")
    n = len(u0)  # gate = -inf, up = 1
    assert y1[n].isnan() and g1.grad[n].isnan() and u1.grad[n].isnan()


@pytest.mark.parametrize("device", SW_DEVICES)
def test_negative_tail_is_accurate(device):
    # fp32 eager's silu(x) = x / (1 + exp(-x)) overflows exp(-x) below x = -88.7 and returns -0 there; the kernels
    # form sigmoid from exp(-|x|) and keep the true value (down to fp32's subnormals) and its gradient
    gate = torch.tensor([-60.0, -88.0, -89.0, -95.0, -100.0, -103.0, -110.0, -1e4], device=device)
    up = torch.ones_like(gate)
    y = ops.swiglu(gate, up)
    dgate, dup = kernel_ops().swiglu_backward(torch.ones_like(gate), gate, up)
    g = gate.double()
    s = torch.sigmoid(g)
    for got, want in ((y, g * s), (dup, g * s), (dgate, s * (1 + g * (1 - s)))):
        want32 = want.float()  # the true value rounded to fp32 (subnormal, or -0 below ~ -103)
        err = (got.double() - want32.double()).abs()
        # 16 u relative while exp(-|g|) is normal; below -87.3 it is subnormal (absolute spacing 2^-149), an error
        # that the products carry multiplied by up to |g|
        assert (err <= FP32_TERMS * want.abs() + (2 + g.abs()) * 2.0**-148).all(), (got, want32)
    assert y[2].item() < 0 and dgate[2].item() < 0  # -89: -1.98e-37 and about -1.96e-37, not -0
    # the one place the op and fp32 eager differ on non-finite inputs (docs/swiglu.md): there eager's silu is -0, so an
    # infinite up gives eager NaN and the op the limit, -inf
    g89, inf = torch.tensor([-89.0], device=device), torch.tensor([float("inf")], device=device)
    assert torch.isnan(F.silu(g89) * inf).all() and ops.swiglu(g89, inf).item() == float("-inf")


@pytest.mark.parametrize("path", ["auto", "vec"])
def test_deterministic_across_threads(monkeypatch, path):
    monkeypatch.setenv("LLADAPTER_SWIGLU_ISA", path)
    # flat chunks over threads cut rows at places that depend on the thread count: the last partial vector of each
    # piece runs the same vector code on a padded copy, so the results do not move
    gate, up, grad = _inputs((37, 1003), torch.float32, "cpu")
    both = torch.randn(37, 2 * 1003)
    prev = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([ops.swiglu(gate, up), *kernel_ops().swiglu_backward(grad, gate, up),
                            ops.swiglu(both[:, :1003], both[:, 1003:]),
                            ops.swiglu(gate.bfloat16(), up.bfloat16())])
    finally:
        torch.set_num_threads(prev)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_torch_compile():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        gate, up = (x * 2).chunk(2, dim=-1)
        return ops.swiglu(gate, up).sum()

    x = torch.randn(3, 40, requires_grad=True)
    f(x).backward()
    x2 = x.detach().clone().requires_grad_()
    gate, up = (x2 * 2).chunk(2, dim=-1)
    reference.swiglu(gate, up).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def _t(shape=(4, 8), dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


BAD = [
    # (what, op, args, message)
    ("gate dtype", "swiglu", lambda: (_t(dtype=torch.int32), _t(dtype=torch.int32)),
     r"gate must have dtype in \{Float, BFloat16, Half"),
    ("up dtype", "swiglu", lambda: (_t(), _t(dtype=torch.float16)), r"up must have gate's dtype \(Float\), got Half"),
    ("up integer", "swiglu", lambda: (_t(), _t(dtype=torch.int64)), r"up must have gate's dtype \(Float\), got Long"),
    ("0-d", "swiglu", lambda: (torch.tensor(1.0), torch.tensor(1.0)), r"gate must have at least 1 dimension"),
    ("shape", "swiglu", lambda: (_t(), _t((4, 7))), r"up must have gate's shape \[4, 8\], got \[4, 7\]"),
    ("shape rank", "swiglu", lambda: (_t(), _t((1, 4, 8))), r"up must have gate's shape \[4, 8\], got \[1, 4, 8\]"),
    ("bwd gate dtype", "swiglu_backward", lambda: (_t(), _t(dtype=torch.int32), _t(dtype=torch.int32)),
     r"swiglu_backward: gate must have dtype in"),
    ("bwd up shape", "swiglu_backward", lambda: (_t(), _t(), _t((8, 4))),
     r"swiglu_backward: up must have gate's shape \[4, 8\], got \[8, 4\]"),
    ("bwd grad dtype", "swiglu_backward", lambda: (_t(dtype=torch.bfloat16), _t(), _t()),
     r"swiglu_backward: grad must have gate's dtype \(Float\), got BFloat16"),
    ("bwd grad shape", "swiglu_backward", lambda: (_t((4, 9)), _t(), _t()),
     r"swiglu_backward: grad must have gate's shape \[4, 8\], got \[4, 9\]"),
]


@pytest.mark.parametrize("device", SW_DEVICES + ["meta"])
@pytest.mark.parametrize("what,op,make,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(device, what, op, make, msg):
    # the same words from the CPU kernel, the emulated CUDA kernel and the fake (meta tensors)
    args = [t.to("meta" if device == "meta" else device) for t in make()]
    ns = torch.ops.lladapter if device == "meta" else kernel_ops()
    with pytest.raises(RuntimeError, match=r"lladapter::" + op + ": " + msg.replace(op + ": ", "")):
        getattr(ns, op)(*args)


@pytest.mark.parametrize("device", SW_DEVICES)
def test_bad_inputs_through_ops_swiglu(device):
    with pytest.raises(RuntimeError, match=r"lladapter::swiglu: up must have gate's shape \[4, 8\], got \[4, 7\]"):
        ops.swiglu(torch.ones(4, 8, device=device), torch.ones(4, 7, device=device))


def test_device_mismatch_names_the_argument():
    # a CPU and a meta tensor: the call dispatches to the fake, which refuses it as the kernels' check_same_device does
    with pytest.raises(RuntimeError, match=r"lladapter::swiglu: up is on meta but gate is on cpu"):
        ops.swiglu(torch.ones(4, 8), torch.ones(4, 8, device="meta"))
    with pytest.raises(RuntimeError, match=r"lladapter::swiglu_backward: grad is on meta but gate is on cpu"):
        torch.ops.lladapter.swiglu_backward(torch.ones(4, 8, device="meta"), torch.ones(4, 8), torch.ones(4, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a cross-device argument")
def test_device_mismatch_cuda_kernel_names_the_argument():
    with pytest.raises(RuntimeError, match=r"up"):
        ops.swiglu(torch.ones(4, 8, device="cuda"), torch.ones(4, 8))


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_dtype_double_refused(device):
    x = torch.ones(2, 4, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"gate must have dtype in \{Float, BFloat16, Half\}"):
        ops.swiglu(x, x)
    with pytest.raises(RuntimeError, match=r"swiglu_backward: gate must have dtype in \{Float, BFloat16, Half\}"):
        kernel_ops().swiglu_backward(x, x, x)


def test_cpu_path_switch(monkeypatch):
    gate, up, _ = _inputs((5, 300), torch.float32, "cpu")
    monkeypatch.setenv("LLADAPTER_SWIGLU_ISA", "avx512")
    try:
        y = ops.swiglu(gate, up)
    except RuntimeError as e:  # a CPU or build without AVX-512 refuses the forced path, saying why
        assert re.search(r"LLADAPTER_SWIGLU_ISA=avx512, but this (CPU lacks AVX-512|build has no AVX-512 path)",
                         str(e)), e
    else:
        _check_forward(y, gate, up)
    monkeypatch.setenv("LLADAPTER_SWIGLU_ISA", "fast")
    with pytest.raises(RuntimeError, match=r"LLADAPTER_SWIGLU_ISA must be auto, avx512 or vec, got 'fast'"):
        ops.swiglu(gate, up)
