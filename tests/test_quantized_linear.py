"""quantized_linear op (weight-only int8 / int4 matmul): kernels vs reference.py in every format and dtype, on every
CPU path this machine has (avx512, avx2, scalar: ops.quantized_linear_cpu_isa), the argument errors on every backend
(the fake included), gradients, opcheck (CPU; CUDA through the emulator)."""
import itertools
import os
import subprocess
import warnings
import sys

import pytest
import torch

from lladapter_ext import emulator, ops, reference
from lladapter_ext import quantize as Q

from conftest import _CUDA_PARAM, _EMU_PARAM, CUDA_DEVICES, DEVICES, KernelDevice, kernel_ops

ISA_ENV = "LLADAPTER_QUANTIZED_LINEAR_ISA"
CPU_ISAS = ["avx512", "avx2", "scalar"]


def _isa_unavailable(isa):
    """None when this build and CPU can run the CPU kernel's path isa, else the kernel's reason."""
    try:
        ops.quantized_linear_cpu_isa(isa)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        ops.quantized_linear_cpu_isa("auto")
    return None


def _cpu_path(isa):
    """The CPU kernels on one path (device "cpu-<isa>"), skipped with the kernel's reason where it cannot run."""
    dev = KernelDevice(f"cpu-{isa}", "cpu", False)
    dev.isa = isa
    why = _isa_unavailable(isa)
    return pytest.param(dev, id=dev.name, marks=pytest.mark.skipif(why is not None, reason=f"{why}"))


CPU_PATHS = [_cpu_path(isa) for isa in CPU_ISAS]
# The correctness tests: the CPU kernel on each path, and the CUDA kernels (GPU, emulator).
PATH_DEVICES = CPU_PATHS + [_CUDA_PARAM, _EMU_PARAM]


@pytest.fixture(autouse=True)
def _cpu_isa(request):
    """For a "cpu-<isa>" device: that path for the test, then back to the default."""
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device") if callspec is not None else None
    isa = getattr(device, "isa", None)
    if isa is None:
        yield
        return
    ops.quantized_linear_cpu_isa(isa)
    try:
        yield
    finally:
        ops.quantized_linear_cpu_isa("auto")

U32 = 2.0**-24  # fp32 unit roundoff
# Largest relative spacing of the output dtype's numbers (ulp(v) <= REL_ULP * |v|): the kernel and the reference
# round two fp32 sums that differ by a few fp32 ulps, so their roundings to bf16/fp16 can differ by one ulp.
REL_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _int8(N, K, block=None, scale_dtype=torch.float32):
    w = torch.randn(N, K) / 8
    if block is None:
        codes, scales = Q.quantize_int8(w)
        return codes, scales.to(scale_dtype)
    wb = w.view(N, K // block, block)
    s = (wb.abs().amax(-1) / 127).half().float().clamp_min(2**-14)
    codes = torch.round(wb / s[..., None]).clamp(-127, 127).to(torch.int8).view(N, K)
    return codes, s.to(scale_dtype)


def _int4(N, K, group, scale_dtype=torch.float16):
    c, sl = Q.quantize_int4(torch.randn(N, K) / 8, group)
    return Q.pack_int4(c), sl.to(scale_dtype)


# (name, codes/scales maker, K values): int8 per row (odd K allowed), int8 per block of 32 (GGUF Q8_0), int4 with
# groups of 32 and 64; N = 48 for int4 is one 32-row block plus the trailing 16-row block of pack_int4's layout.
FORMATS = {
    "int8_row": (lambda K: _int8(40, K), [1, 67, 128]),
    "int8_q8_0": (lambda K: _int8(40, K, block=32, scale_dtype=torch.float16), [32, 96]),
    "int4_g32": (lambda K: _int4(48, K, 32), [32, 96]),
    "int4_g64": (lambda K: _int4(48, K, 64), [128]),
    "int4_n16": (lambda K: _int4(16, K, 32), [64]),
    "int4_n96": (lambda K: _int4(96, K, 32), [64]),
}
CASES = [(f, K) for f, (_, Ks) in FORMATS.items() for K in Ks]


def _bound(x, codes, scales):
    """|x| @ A^T, A the weights' magnitudes as the kernels' sums see them (int4: |q scale| + |low|, the two terms
    of the group sums): an fp32 sum of K such products is off by at most (K + 2) u times this (rounding-error
    analysis of a dot product, plus the scale multiplies)."""
    if codes.dtype == torch.int8:
        a = reference.dequantize_weight(codes, scales).abs()
    else:
        q = reference._unpack_int4_codes(codes).float()
        s = scales.float()
        g = q.shape[1] // s.shape[0]
        a = (q * s[..., 0].t().repeat_interleave(g, 1)).abs() + s[..., 1].t().repeat_interleave(g, 1).abs()
    return x.float().abs() @ a.t()


def _assert_close(y, x, codes, scales):
    ref = reference.quantized_linear(x, codes, scales)
    assert y.dtype == ref.dtype == x.dtype and y.shape == ref.shape
    K = x.shape[-1]
    atol = (K + 2) * U32 * _bound(x, codes, scales)
    err = (y.float() - ref.float()).abs()
    allowed = atol + REL_ULP[x.dtype] * ref.float().abs()
    assert (err <= allowed).all(), f"max excess {(err - allowed).max().item()}"


@pytest.mark.parametrize("device", PATH_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("fmt,K", CASES)
def test_matches_reference(device, dtype, M, fmt, K):
    codes, scales = (t.to(device) for t in FORMATS[fmt][0](K))
    x = torch.randn(M, K).to(device, dtype)
    y = ops.quantized_linear(x, codes, scales)
    _assert_close(y, x, codes, scales)


@pytest.mark.parametrize("device", PATH_DEVICES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_dtypes(device, scale_dtype):
    x = torch.randn(3, 64, device=device)
    for codes, scales in (_int8(32, 64, scale_dtype=scale_dtype), _int8(32, 64, 32, scale_dtype),
                          _int4(48, 64, 32, scale_dtype)):
        codes, scales = codes.to(device), scales.to(device)
        _assert_close(ops.quantized_linear(x, codes, scales), x, codes, scales)


@pytest.mark.parametrize("device", PATH_DEVICES)
@pytest.mark.parametrize("N,K,blocks", [(40, 64, 4), (40, 67, 67), (24, 96, 1), (32, 20, 2)])
def test_int8_other_block_sizes(device, N, K, blocks):
    # per-block scales with blocks of 16, 1, 96 and 10 inputs (the kernels take any block size that divides K)
    codes = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    scales = (torch.rand(N, blocks, device=device) / 100).half()
    x = torch.randn(3, K, device=device)
    _assert_close(ops.quantized_linear(x, codes, scales), x, codes, scales)


@pytest.mark.parametrize("device", PATH_DEVICES)
def test_int4_other_group_sizes(device):
    # groups of 2, 3, 16 and 128 inputs (any group size that divides K; an odd one leaves a last input per group)
    for K, G in ((4, 2), (6, 2), (64, 4), (128, 1)):
        codes = torch.randint(0, 256, (48, K // 2), dtype=torch.uint8, device=device)
        scales = (torch.rand(G, 48, 2, device=device) / 50 - 0.01).half()
        x = torch.randn(3, K, device=device)
        _assert_close(ops.quantized_linear(x, codes, scales), x, codes, scales)


@pytest.mark.parametrize("device", CPU_PATHS)
def test_larger_shapes_cpu(device):
    # the model's shapes (SmolLM2's MLP, a tall head slice): many row blocks split over threads; 13 rows: the
    # AVX-512 int8 tiles of 8, 4 and 1 rows
    for codes, scales in (_int8(1536, 576), _int4(1536, 576, 32), _int4(1552, 128, 64),
                          _int8(1536, 576, 32, torch.float16), _int8(96, 1000)):
        K = codes.shape[1] * (2 if codes.dtype == torch.uint8 else 1)
        for M in (1, 2, 5, 13):
            x = torch.randn(M, K)
            _assert_close(ops.quantized_linear(x, codes, scales), x, codes, scales)


def test_leading_dims_and_non_contiguous_x():
    codes, scales = _int4(48, 64, 32)
    x = torch.randn(2, 3, 128)[..., ::2]
    y = ops.quantized_linear(x, codes, scales)
    assert y.shape == (2, 3, 48)
    _assert_close(y.reshape(6, 48), x.reshape(6, 64), codes, scales)


def test_reference_unpacks_as_quantize_does():
    # the oracle reads pack_int4's layout from its definition; quantize.unpack_int4 is the layer's reader
    for N in (16, 32, 48, 80):
        c = torch.randint(0, 16, (N, 64), dtype=torch.uint8)
        packed = Q.pack_int4(c)
        assert torch.equal(reference._unpack_int4_codes(packed), c.long())
        assert torch.equal(Q.unpack_int4(packed), c)


def test_matches_the_layers_dequantized_weight():
    w = torch.randn(96, 192) / 10
    for fmt in Q.FORMATS:
        layer = Q.QuantizedLinear.from_float(w, fmt, torch.float32)
        torch.testing.assert_close(reference.dequantize_weight(layer.codes, layer.scales), layer.dequantize(),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("device", CPU_PATHS)
def test_deterministic_across_threads(device):
    codes, scales = _int4(1536, 576, 32)
    codes8, scales8 = _int8(1536, 576)
    x = torch.randn(3, 576)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = (ops.quantized_linear(x, codes, scales), ops.quantized_linear(x, codes8, scales8))
        torch.set_num_threads(max(2, prev))
        b = (ops.quantized_linear(x, codes, scales), ops.quantized_linear(x, codes8, scales8))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cpu_isa_default_and_setter():
    available = [isa for isa in CPU_ISAS if _isa_unavailable(isa) is None]
    assert "scalar" in available
    if not os.environ.get(ISA_ENV, "").strip() or os.environ[ISA_ENV] == "auto":
        assert ops.quantized_linear_cpu_isa() == available[0]  # the best this CPU has
    before = ops.quantized_linear_cpu_isa()
    assert ops.quantized_linear_cpu_isa("scalar") == before
    try:
        assert ops.quantized_linear_cpu_isa() == "scalar"
        with pytest.raises(RuntimeError, match=r"must be 'avx512', 'avx2' or 'scalar'.*got 'sse'"):
            ops.quantized_linear_cpu_isa("sse")
        assert ops.quantized_linear_cpu_isa() == "scalar"
    finally:
        ops.quantized_linear_cpu_isa("auto")
    assert ops.quantized_linear_cpu_isa() == before


def test_cpu_isa_environment_variable():
    # read once, in a fresh process: a valid value picks the path, another one is an error naming the variable
    code = ("import torch, lladapter_ext.ops as o\n"
            "for f in (o.quantized_linear_cpu_isa,\n"
            "          lambda: o.quantized_linear(torch.ones(1, 64), torch.ones(8, 64, dtype=torch.int8),\n"
            "                                     torch.ones(8)).sum().item()):\n"
            "    try:\n        print(f())\n"
            "    except RuntimeError as e:\n        print(str(e).splitlines()[0])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env[ISA_ENV] = "scalar"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["scalar", "512.0"]
    env[ISA_ENV] = "avx3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 2, out
    for line in lines:  # the same error from the query and from the op, every time
        assert f"{ISA_ENV} must be auto, avx512, avx2 or scalar, got 'avx3'" in line


def test_layer_row_limits_follow_the_path():
    # QuantizedLinear takes our kernel up to KERNEL_MAX_ROWS_BY_FORMAT rows, and up to KERNEL_MAX_ROWS_AVX512 on the
    # AVX-512 path (KERNEL_MAX_ROWS_AMX_BF16 for bf16 on an AMX CPU); past that it dequantizes
    for isa in [i for i in CPU_ISAS if _isa_unavailable(i) is None]:
        ops.quantized_linear_cpu_isa(isa)
        try:
            for fmt in ("int8", "int4"):
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    limits = Q.KERNEL_MAX_ROWS_BY_FORMAT
                    if isa == "avx512":  # bf16 on an AMX CPU: its bf16 GEMM wins sooner
                        amx_bf16 = dtype == torch.bfloat16 and Q.cpu_has_amx()
                        limits = Q.KERNEL_MAX_ROWS_AMX_BF16 if amx_bf16 else Q.KERNEL_MAX_ROWS_AVX512
                    limit = limits[fmt]
                    for rows, expect in ((0, None), (1, "lladapter"), (limit, "lladapter"), (limit + 1, None)):
                        x = torch.zeros(rows, 64, dtype=dtype)
                        assert Q._decode_kernel_for(fmt, x, 64 * 64) == expect, (isa, fmt, dtype, rows)
        finally:
            ops.quantized_linear_cpu_isa("auto")


@pytest.mark.parametrize("M", [1, 8])
def test_cpu_paths_agree(M):
    # the paths differ only in the order of fp32 additions: within a few ulps of the sums' magnitude of each other
    paths = [isa for isa in CPU_ISAS if _isa_unavailable(isa) is None]
    x = torch.randn(M, 576)
    for codes, scales in (_int8(1536, 576), _int4(1536, 576, 32), _int8(1536, 576, 32, torch.float16)):
        ys = []
        for isa in paths:
            ops.quantized_linear_cpu_isa(isa)
            try:
                ys.append(ops.quantized_linear(x, codes, scales))
            finally:
                ops.quantized_linear_cpu_isa("auto")
        bound = (576 + 2) * U32 * _bound(x, codes, scales)
        for y in ys[1:]:
            assert ((y - ys[0]).abs() <= 2 * bound).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    codes, scales = (t.to(device) for t in _int4(32, 64, 32))
    y = ops.quantized_linear(torch.randn(0, 64, device=device), codes, scales)
    assert y.shape == (0, 32)


@pytest.mark.parametrize("fmt", ["int8_row", "int8_q8_0", "int4_g32"])
def test_gradcheck_float64(fmt):
    K = 64
    codes, scales = FORMATS[fmt][0](K)
    x = torch.randn(3, K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.quantized_linear(a, codes, scales), (x,))
    # fp64 sums in fp64: the forward equals the fp64 reference to fp64 rounding
    torch.testing.assert_close(ops.quantized_linear(x, codes, scales), reference.quantized_linear(x, codes, scales),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_dy_times_w(device, dtype):
    codes, scales = (t.to(device) for t in _int4(48, 64, 32))
    x = torch.randn(3, 64).to(device, dtype).requires_grad_()
    y = ops.quantized_linear(x, codes, scales)
    g = torch.randn_like(y)
    y.backward(g)
    expect = (g.float() @ reference.dequantize_weight(codes, scales)).to(dtype)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["int8_row", "int8_q8_0", "int4_g32"])
def test_opcheck(device, fmt):
    K = 64
    codes, scales = (t.to(device) for t in FORMATS[fmt][0](K))
    x = torch.randn(3, K, device=device, requires_grad=True)
    torch.library.opcheck(kernel_ops().quantized_linear.default, (x, codes, scales))
    if not device.cuda_kernels:
        xd = torch.randn(2, K, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(kernel_ops().quantized_linear.default, (xd, codes, scales))


def test_torch_compile():
    codes, scales = _int4(48, 64, 32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return ops.quantized_linear(x * 2, codes, scales).relu()

    x = torch.randn(2, 64)
    torch.testing.assert_close(f(x), reference.quantized_linear(x * 2, codes, scales).relu(), rtol=1e-5, atol=1e-5)


BAD = [
    # (what, x, codes, scales, message)
    ("x dtype", lambda: (torch.ones(2, 64, dtype=torch.int32),) + _int8(32, 64), r"x must have dtype in"),
    ("x dims", lambda: (torch.ones(2, 2, 64),) + _int8(32, 64), r"x must have shape \[M, K\], got \[2, 2, 64\]"),
    ("codes dtype", lambda: (torch.ones(2, 64), torch.ones(32, 64), torch.ones(32)), r"codes must have dtype in"),
    ("scales dtype", lambda: (torch.ones(2, 64), _int8(32, 64)[0], torch.ones(32, dtype=torch.int32)),
     r"scales must have dtype in"),
    ("codes dims", lambda: (torch.ones(2, 64), torch.ones(32, 64, 1, dtype=torch.int8), torch.ones(32)),
     r"codes must have shape \[N, K\] \(int8\)"),
    ("K zero", lambda: (torch.ones(2, 0), torch.ones(32, 0, dtype=torch.int8), torch.ones(32)),
     r"x's input dimension K \(x.size\(1\)\) must be positive"),
    ("int8 K", lambda: (torch.ones(2, 63),) + _int8(32, 64), r"codes \(int8\) must have shape \[N, 63\]"),
    ("int8 scales", lambda: (torch.ones(2, 64), _int8(32, 64)[0], torch.ones(31)),
     r"scales \(int8, one per row\) must have shape \[32\]"),
    ("int8 blocks", lambda: (torch.ones(2, 64), _int8(32, 64)[0], torch.ones(32, 3, dtype=torch.float16)),
     r"scales \(int8\) must have shape \[32\] \(one per row\) or \[32, K / g\]"),
    ("int4 K", lambda: (torch.ones(2, 62),) + _int4(32, 64, 32), r"codes \(int4, two per byte\) must have shape"),
    ("int4 rows", lambda: (torch.ones(2, 64), torch.zeros(24, 32, dtype=torch.uint8),
                           torch.ones(2, 24, 2, dtype=torch.float16)),
     r"codes \(int4\) must have a multiple of 16 rows"),
    ("int4 scales", lambda: (torch.ones(2, 64), _int4(32, 64, 32)[0], torch.ones(3, 32, 2, dtype=torch.float16)),
     r"scales \(int4\) must have shape \[G, 32, 2\]"),
    ("int4 scales dims", lambda: (torch.ones(2, 64), _int4(32, 64, 32)[0], torch.ones(32, dtype=torch.float16)),
     r"scales \(int4\) must have shape"),
]


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("what,make,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(device, what, make, msg):
    # the same words from the CPU kernel, the emulated CUDA kernel and the fake (meta tensors)
    args = [t.to("meta" if device == "meta" else device) for t in make()]
    op = torch.ops.lladapter.quantized_linear if device == "meta" else kernel_ops().quantized_linear
    with pytest.raises(RuntimeError, match=r"lladapter::quantized_linear: " + msg):
        op(*args)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_dtype_double_refused(device):
    codes, scales = (t.to(device) for t in _int8(32, 64))
    with pytest.raises(RuntimeError, match=r"x must have dtype in \{Float, BFloat16, Half\}"):
        ops.quantized_linear(torch.ones(2, 64, dtype=torch.float64, device=device), codes, scales)


# ------------------------------------------------------------------------- QuantizedLinear's route on the CUDA kernels
# quantize._decode_kernel_for: on CUDA (and on CPU tensors while the emulated CUDA kernels are active, so the emulator
# takes the GPU's route) the few rows of a decode step go through ops.quantized_linear, more rows (or fp64) through
# dequantize + GEMM. Every format the layer stores, 48 x 128: int4's one 32-row block and its trailing 16-row block.
LAYER_N, LAYER_K = 48, 128
LAYER_FORMATS = ["int8_row", "int8_q8_0", "int4_g64", "int4_g32"]


def _layer(fmt: str, device, dtype: torch.dtype) -> Q.QuantizedLinear:
    """int8 with one fp32 scale per row (quantized from floats), int8 with an fp16 scale per 32 inputs (GGUF Q8_0's
    layout), int4 with groups of 64 (from floats) and of 32 (GGUF Q4_0/Q4_1's)."""
    w = torch.randn(LAYER_N, LAYER_K) / 8
    if fmt == "int8_row":
        layer = Q.QuantizedLinear.from_float(w, "int8", dtype)
    elif fmt == "int8_q8_0":
        layer = Q.QuantizedLinear.from_codes("int8", *_int8(LAYER_N, LAYER_K, 32, torch.float16), dtype)
    elif fmt == "int4_g64":
        layer = Q.QuantizedLinear.from_float(w, "int4", dtype)
        assert layer.group_size == 64
    else:
        layer = Q.QuantizedLinear.from_codes("int4", *Q.quantize_int4(w, 32), dtype)
        assert layer.group_size == 32
    return layer.to(device)


@pytest.fixture
def kernel_rows(monkeypatch):
    """The row count of each ops.quantized_linear call made through the quantize module (a spy around the op)."""
    calls = []
    real = ops.quantized_linear

    def spy(x, codes, scales):
        calls.append(x.shape[0])
        return real(x, codes, scales)

    monkeypatch.setattr(ops, "quantized_linear", spy)
    return calls


# The dequantize path multiplies by the weight rounded to the activations' dtype (fp32 -> bf16: 2^-8 relative; fp16:
# 2^-11), and on CUDA cuBLAS may add bf16/fp16 partial sums in the output dtype (torch's reduced-precision reductions,
# on by default): one more such rounding.
DEQUANT_WEIGHT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}


def _assert_close_dequantized(y, x, layer):
    """y against the dequantized dense product in fp32 (reference.quantized_linear): two fp32 sums of K products
    (2 (K + 2) u), the weight's rounding to x's dtype, and y's rounding to it."""
    codes, scales = layer.codes, layer.scales
    ref = reference.quantized_linear(x, codes, scales).float()
    K = x.shape[-1]
    allowed = ((2 * (K + 2) * U32 + DEQUANT_WEIGHT_ROUNDING[x.dtype]) * _bound(x, codes, scales)
               + REL_ULP[x.dtype] * ref.abs())
    err = (y.float() - ref).abs()
    assert y.dtype == x.dtype and (err <= allowed).all(), f"max excess {(err - allowed).max().item()}"


def _emulated_kernel_launches() -> dict:
    return {name: s["launches"] for name, s in emulator.launched_kernels().items() if "quantized_linear" in name}


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", LAYER_FORMATS)
def test_layer_decode_rows_take_the_cuda_kernel(device, dtype, fmt, kernel_rows):
    """1 and CUDA_KERNEL_MAX_ROWS_BY_FORMAT rows (as a decode step's [B, 1, K]) go through the CUDA kernel and equal
    the dequantized weight's product; one row more takes dequantize + GEMM, equal too."""
    layer = _layer(fmt, device, dtype)
    limit = Q.CUDA_KERNEL_MAX_ROWS_BY_FORMAT[layer.format]
    kernel = "int8" if layer.format == "int8" else "int4"
    for rows in (1, limit, limit + 1):
        x = torch.randn(rows, 1, LAYER_K).to(device, dtype)
        if device.name == "emu":
            emulator.reset_stats()
        y = layer(x)
        assert y.shape == (rows, 1, LAYER_N)
        if rows <= limit:
            assert kernel_rows == [rows]
            if device.name == "emu":  # the emulated CUDA kernel ran (not the CPU one)
                assert _emulated_kernel_launches() == {
                    f"quantized_linear_{kernel}_kernel<scalar_t, scale_t>": 1}
            _assert_close(y.view(rows, -1), x.view(rows, -1), layer.codes, layer.scales)
        else:
            assert kernel_rows == []
            if device.name == "emu":
                assert _emulated_kernel_launches() == {}
            _assert_close_dequantized(y.view(rows, -1), x.view(rows, -1), layer)
        kernel_rows.clear()


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("fmt", ["int8_q8_0", "int4_g32"])
def test_layer_gradient_through_the_cuda_kernel_route(device, fmt, kernel_rows):
    # forward by the kernel, backward dX = dY W with W dequantized (the layer's autograd Function)
    layer = _layer(fmt, device, torch.float32)
    x = torch.randn(2, LAYER_K, device=device, requires_grad=True)
    y = layer(x)
    assert kernel_rows == [2]
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ layer.dequantize(torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("knob", ["torch", "none"])
def test_decode_kernel_knob_on_cuda(device, knob, kernel_rows, monkeypatch):
    # "torch" names torch's CPU kernels: on the CUDA kernels it dequantizes, as "none" does everywhere
    monkeypatch.setattr(Q, "DECODE_KERNEL", knob)
    for fmt in ("int8_row", "int4_g64"):
        layer = _layer(fmt, device, torch.float32)
        x = torch.randn(1, LAYER_K, device=device)
        _assert_close_dequantized(layer(x), x, layer)
    assert kernel_rows == []


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_layer_float64_on_cuda_dequantizes(device, kernel_rows):
    # the CUDA kernel takes no fp64: one fp64 row is dequantized (in fp32, as the layer does) and multiplied in fp64
    layer = _layer("int4_g32", device, torch.float64)
    x = torch.randn(1, LAYER_K, dtype=torch.float64, device=device)
    y = layer(x)
    assert kernel_rows == [] and y.dtype == torch.float64
    ref = reference.quantized_linear(x, layer.codes, layer.scales)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_route_on_the_cuda_kernels(device):
    """_decode_kernel_for on the CUDA kernels (a CUDA tensor; a CPU tensor under the emulator): ours for
    1..CUDA_KERNEL_MAX_ROWS_BY_FORMAT rows of fp32/bf16/fp16, else dequantize + GEMM (None)."""
    for fmt, limit in Q.CUDA_KERNEL_MAX_ROWS_BY_FORMAT.items():
        for rows, want in ((0, None), (1, "lladapter"), (limit, "lladapter"), (limit + 1, None)):
            for dtype in DTYPES:
                x = torch.empty(rows, 64, dtype=dtype, device=device)
                assert Q._decode_kernel_for(fmt, x, 1 << 24) == want, (fmt, rows, dtype)
        assert Q._decode_kernel_for(fmt, torch.empty(1, 64, dtype=torch.float64, device=device), 1 << 24) is None


def test_route_on_the_cpu_kernels():
    # outside the emulator, CPU tensors take the CPU kernel's limits (more rows than the CUDA kernel's; the AVX-512
    # path's where this process runs it)
    avx512 = ops.quantized_linear_cpu_isa() == "avx512"
    for fmt, limit in Q.KERNEL_MAX_ROWS_BY_FORMAT.items():
        limit = max(limit, Q.KERNEL_MAX_ROWS_AVX512[fmt]) if avx512 else limit
        assert limit > Q.CUDA_KERNEL_MAX_ROWS_BY_FORMAT[fmt]
        assert Q._decode_kernel_for(fmt, torch.empty(limit, 64), 1 << 24) == "lladapter"
        assert Q._decode_kernel_for(fmt, torch.empty(limit + 1, 64), 1 << 24) is None


# ------------------------------------------------------------------------- dequantize_rows (the training GEMMs' weight)
# ops.dequantize_rows writes rows [row_start, row_end) of the weight into a caller's buffer, in its dtype: bitwise what
# quantize.dequantize gives (fp32 math, one rounding to bf16/fp16), on every CPU path and on the CUDA kernels.
# (name, codes/scales maker, row ranges): int8 per row with an odd K (AVX-512's masked tail), int8 per block of 32
# (GGUF Q8_0) and of 10 (a block that is not a whole vector), int4 with groups of 32 and 64 (the vector path), of 6
# (the plain loops), 48 rows (a 32-row block and the trailing 16-row one), 16 rows (the trailing block alone).
DEQUANT_FORMATS = {
    "int8_row": (lambda: _int8(40, 67), [(0, 40), (3, 17), (39, 40), (5, 5)]),
    "int8_q8_0": (lambda: _int8(40, 96, block=32, scale_dtype=torch.float16), [(0, 40), (7, 30)]),
    "int8_block10": (lambda: _int8(24, 40, block=10, scale_dtype=torch.bfloat16), [(0, 24), (1, 2)]),
    "int4_g32": (lambda: _int4(48, 96, 32), [(0, 48), (0, 32), (32, 48), (48, 48)]),
    "int4_g64": (lambda: _int4(96, 128, 64, torch.float32), [(0, 96), (32, 64), (64, 96)]),
    "int4_g6": (lambda: _int4(48, 12, 6), [(0, 48), (32, 48)]),
    "int4_n16": (lambda: _int4(16, 64, 32, torch.bfloat16), [(0, 16)]),
}
DEQUANT_CASES = [(f, r) for f, (_, rs) in DEQUANT_FORMATS.items() for r in rs]


def _dequant_out(rows, K, dtype, device):
    """A fresh out, filled with NaN so that an unwritten element shows."""
    return torch.full((rows, K), float("nan"), dtype=dtype, device=device)


def _weight_K(codes):
    return codes.shape[1] * (2 if codes.dtype == torch.uint8 else 1)


@pytest.mark.parametrize("device", PATH_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("fmt,rows", DEQUANT_CASES, ids=[f"{f}-{r[0]}:{r[1]}" for f, r in DEQUANT_CASES])
def test_dequantize_rows_equals_dequantize(device, dtype, fmt, rows):
    if dtype == torch.float64 and device.cuda_kernels:
        pytest.skip("the CUDA kernels write fp32/bf16/fp16 (test_dequantize_rows_bad_inputs: fp64 is refused)")
    codes, scales = (t.to(device) for t in DEQUANT_FORMATS[fmt][0]())
    r0, r1 = rows
    out = _dequant_out(r1 - r0, _weight_K(codes), dtype, device)
    assert ops.dequantize_rows(codes, scales, r0, r1, out) is out
    want = Q.dequantize(codes, scales, dtype)[r0:r1]
    assert torch.equal(out, want), f"max diff {(out.double() - want.double()).abs().max().item()}"
    assert torch.equal(out, reference.dequantize_rows(codes, scales, r0, r1, dtype))


@pytest.mark.parametrize("device", CPU_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_rows_model_shapes_cpu(device, dtype):
    # SmolLM2's MLP weights split over threads (int4: 32-row blocks), and the row blocks a layer takes one at a time
    prev = torch.get_num_threads()
    torch.set_num_threads(max(2, prev))
    try:
        for codes, scales in (_int8(1536, 576), _int4(1536, 576, 32), _int4(576, 1536, 64),
                              _int8(576, 1536, 32, torch.float16)):
            N, K = codes.shape[0], _weight_K(codes)
            want = Q.dequantize(codes, scales, dtype)
            for r0, r1 in ((0, N), (256, 512), (N - 64, N)):
                out = _dequant_out(r1 - r0, K, dtype, "cpu")
                assert torch.equal(ops.dequantize_rows(codes, scales, r0, r1, out), want[r0:r1])
    finally:
        torch.set_num_threads(prev)


def test_dequantize_rows_rounds_as_torch_does():
    # bf16 / fp16 outputs are the round-to-nearest-even of the fp32 value, ties included: scales that put products on
    # exact halfway points of bf16 (fp32 values with the low 16 bits 0x8000) and of fp16, on every CPU path
    codes = torch.arange(-127, 129, dtype=torch.int8).repeat(16, 1)[:, :256]
    scales = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2.0**-20, 3e-3,
                           1.0, 2.0**-8, 0.1, 7.0, 1.0 + 2.0**-9, 1.5, 1e-6, 1e3, 2.0**-14, 0.3])
    for isa in [i for i in CPU_ISAS if _isa_unavailable(i) is None]:
        ops.quantized_linear_cpu_isa(isa)
        try:
            for dtype in (torch.bfloat16, torch.float16):
                out = _dequant_out(16, 256, dtype, "cpu")
                ops.dequantize_rows(codes, scales, 0, 16, out)
                assert torch.equal(out, (codes.float() * scales[:, None]).to(dtype)), (isa, dtype)
        finally:
            ops.quantized_linear_cpu_isa("auto")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["int8_row", "int8_q8_0", "int4_g32"])
def test_dequantize_rows_opcheck(device, fmt):
    codes, scales = (t.to(device) for t in DEQUANT_FORMATS[fmt][0]())
    N, K = codes.shape[0], _weight_K(codes)
    ranges = [(0, 32), (32, 48)] if codes.dtype == torch.uint8 else [(0, N), (4, 20)]
    dtypes = (torch.float32, torch.bfloat16) + (() if device.cuda_kernels else (torch.float64,))
    for (r0, r1), dtype in itertools.product(ranges, dtypes):
        out = torch.empty(r1 - r0, K, dtype=dtype, device=device)
        torch.library.opcheck(kernel_ops().dequantize_rows.default, (codes, scales, r0, r1, out))


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_rows_under_autograd_and_compile(device):
    # a frozen weight into a buffer: grad mode on, nothing warns or records a graph; torch.compile traces it
    codes, scales = (t.to(device) for t in _int4(48, 64, 32))
    out = torch.empty(48, 64, device=device)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.dequantize_rows(codes, scales, 0, 48, out)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, Q.dequantize(codes, scales, torch.float32))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, buf):
        return x @ ops.dequantize_rows(codes, scales, 0, 32, buf).t()

    x = torch.randn(3, 64, device=device)
    torch.testing.assert_close(f(x, torch.empty(32, 64, device=device)),
                               x @ Q.dequantize(codes, scales, torch.float32)[:32].t())


def _dq_args(codes_scales, r0, r1, out_shape, out_dtype=torch.float32):
    return lambda: (*codes_scales(), r0, r1, torch.empty(out_shape, dtype=out_dtype))


DEQUANT_BAD = [
    # (what, make (codes, scales, row_start, row_end, out), message)
    ("codes dtype", lambda: (torch.ones(32, 64), torch.ones(32), 0, 32, torch.empty(32, 64)),
     r"codes must have dtype in \{Char, Byte\}, got Float"),
    ("scales dtype", lambda: (_int8(32, 64)[0], torch.ones(32, dtype=torch.int32), 0, 32, torch.empty(32, 64)),
     r"scales must have dtype in \{Float, Half, BFloat16\}, got Int"),
    ("out dtype", _dq_args(lambda: _int8(32, 64), 0, 32, (32, 64), torch.int32), r"out must have dtype in"),
    ("codes dims", lambda: (torch.ones(32, 64, 1, dtype=torch.int8), torch.ones(32), 0, 32, torch.empty(32, 64)),
     r"codes must have shape \[N, K\] \(int8\) or \[N, K / 2\] \(int4, packed\), got \[32, 64, 1\]"),
    ("K zero", lambda: (torch.ones(32, 0, dtype=torch.int8), torch.ones(32), 0, 32, torch.empty(32, 0)),
     r"codes must have at least one input column \(K > 0\)"),
    ("int8 scales", lambda: (_int8(32, 64)[0], torch.ones(31), 0, 32, torch.empty(32, 64)),
     r"scales \(int8, one per row\) must have shape \[32\] \(codes.size\(0\)\), got \[31\]"),
    ("int8 blocks", lambda: (_int8(32, 64)[0], torch.ones(32, 3, dtype=torch.float16), 0, 32, torch.empty(32, 64)),
     r"scales \(int8\) must have shape \[32\] \(one per row\) or \[32, K / g\]"),
    ("int4 rows", lambda: (torch.zeros(24, 32, dtype=torch.uint8), torch.ones(2, 24, 2, dtype=torch.float16), 0, 24,
                           torch.empty(24, 64)),
     r"codes \(int4\) must have a multiple of 16 rows"),
    ("int4 scales", lambda: (_int4(32, 64, 32)[0], torch.ones(3, 32, 2, dtype=torch.float16), 0, 32,
                             torch.empty(32, 64)),
     r"scales \(int4\) must have shape \[G, 32, 2\]"),
    ("row_end past N", _dq_args(lambda: _int8(32, 64), 0, 33, (33, 64)),
     r"rows \[row_start, row_end\) must lie within the weight's 32 rows .*got row_start = 0, row_end = 33"),
    ("row_start negative", _dq_args(lambda: _int8(32, 64), -1, 4, (5, 64)),
     r"rows \[row_start, row_end\) must lie within the weight's 32 rows .*got row_start = -1, row_end = 4"),
    ("rows reversed", _dq_args(lambda: _int8(32, 64), 8, 4, (0, 64)),
     r"rows \[row_start, row_end\) must lie .*got row_start = 8, row_end = 4"),
    ("int4 block start", _dq_args(lambda: _int4(96, 64, 32), 16, 64, (48, 64)),
     r"int4 rows \[row_start, row_end\) must start and end on the packed layout's 32-row blocks \(or at N = 96\), "
     r"got row_start = 16, row_end = 64"),
    ("int4 block end", _dq_args(lambda: _int4(48, 64, 32), 0, 40, (40, 64)),
     r"int4 rows \[row_start, row_end\) must start and end on the packed layout's 32-row blocks \(or at N = 48\), "
     r"got row_start = 0, row_end = 40"),
    ("out shape", _dq_args(lambda: _int4(48, 64, 32), 0, 32, (32, 32)),
     r"out must have shape \[32, 64\] \(row_end - row_start, K\), got \[32, 32\]"),
    ("out rows", _dq_args(lambda: _int8(32, 64), 4, 8, (32, 64)),
     r"out must have shape \[4, 64\] \(row_end - row_start, K\), got \[32, 64\]"),
    ("out dims", _dq_args(lambda: _int8(32, 64), 0, 32, (32 * 64,)), r"out must have shape \[32, 64\]"),
    ("out strides", lambda: (*_int8(32, 64), 0, 32, torch.empty(64, 32).t()),
     r"out must be contiguous \(its rows are written in place\), got strides \[1, 32\]"),
]


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("what,make,msg", DEQUANT_BAD, ids=[b[0] for b in DEQUANT_BAD])
def test_dequantize_rows_bad_inputs(device, what, make, msg):
    # the same words from the CPU kernel, the emulated CUDA kernel and the fake (meta tensors)
    codes, scales, r0, r1, out = make()
    dev = "meta" if device == "meta" else device
    codes, scales, out = codes.to(dev), scales.to(dev), out.to(dev)
    op = torch.ops.lladapter.dequantize_rows if device == "meta" else kernel_ops().dequantize_rows
    with pytest.raises(RuntimeError, match=r"lladapter::dequantize_rows: " + msg):
        op(codes, scales, r0, r1, out)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_dequantize_rows_cuda_refuses_float64(device):
    codes, scales = (t.to(device) for t in _int8(32, 64))
    out = torch.empty(32, 64, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"out must have dtype in \{Float, BFloat16, Half\}, got Double"):
        ops.dequantize_rows(codes, scales, 0, 32, out)


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_rows_mixed_devices_refused(device):
    codes, scales = _int8(32, 64)
    with pytest.raises(RuntimeError, match=r"lladapter::dequantize_rows: out is on meta but codes is on cpu"):
        kernel_ops().dequantize_rows(codes, scales, 0, 32, torch.empty(32, 64, device="meta"))


@pytest.mark.parametrize("device", PATH_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("fmt", LAYER_FORMATS)
def test_layer_dequantizes_with_the_op_into_reused_scratch(device, dtype, fmt):
    """QuantizedLinear's training / prefill weight is ops.dequantize_rows' output in the activations' dtype (fp64:
    fp32 math, as quantize.dequantize), written into the same per-thread buffer every call (no allocation); on the
    emulator the CUDA kernel writes it."""
    layer = _layer(fmt, device, dtype)
    kernel = "int8" if layer.format == "int8" else "int4"
    if device.name == "emu":
        emulator.reset_stats()
    w = layer._dequantized_for_matmul(dtype)
    assert w.dtype == dtype and torch.equal(w, Q.dequantize(layer.codes, layer.scales, torch.float32).to(dtype))
    if device.name == "emu":
        launched = {n: s["launches"] for n, s in emulator.launched_kernels().items() if "dequantize_rows" in n}
        assert launched == {f"dequantize_rows_{kernel}_kernel<out_t, scale_t>": 1}
    if dtype != torch.float64:
        ptr = w.data_ptr()
        assert layer._dequantized_for_matmul(dtype).data_ptr() == ptr
        part = layer._dequantized_for_matmul(dtype, (32, 48))
        assert part.data_ptr() == ptr and torch.equal(part, Q.dequantize(layer.codes, layer.scales, dtype)[32:48])
