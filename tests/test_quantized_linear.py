"""quantized_linear op (weight-only int8 / int4 matmul): kernels vs reference.py in every format and dtype, the
argument errors on every backend (the fake included), gradients, opcheck (CPU; CUDA through the emulator)."""
import pytest
import torch

from lladapter_ext import ops, reference
from lladapter_ext import quantize as Q

from conftest import CUDA_DEVICES, DEVICES, kernel_ops

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("fmt,K", CASES)
def test_matches_reference(device, dtype, M, fmt, K):
    codes, scales = (t.to(device) for t in FORMATS[fmt][0](K))
    x = torch.randn(M, K).to(device, dtype)
    y = ops.quantized_linear(x, codes, scales)
    _assert_close(y, x, codes, scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_dtypes(device, scale_dtype):
    x = torch.randn(3, 64, device=device)
    for codes, scales in (_int8(32, 64, scale_dtype=scale_dtype), _int8(32, 64, 32, scale_dtype),
                          _int4(48, 64, 32, scale_dtype)):
        codes, scales = codes.to(device), scales.to(device)
        _assert_close(ops.quantized_linear(x, codes, scales), x, codes, scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,K,blocks", [(40, 64, 4), (40, 67, 67), (24, 96, 1), (32, 20, 2)])
def test_int8_other_block_sizes(device, N, K, blocks):
    # per-block scales with blocks of 16, 1, 96 and 10 inputs (the kernels take any block size that divides K)
    codes = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    scales = (torch.rand(N, blocks, device=device) / 100).half()
    x = torch.randn(3, K, device=device)
    _assert_close(ops.quantized_linear(x, codes, scales), x, codes, scales)


@pytest.mark.parametrize("device", DEVICES)
def test_int4_other_group_sizes(device):
    # groups of 2, 16 and 128 inputs (any group size that divides K)
    for K, G in ((4, 2), (64, 4), (128, 1)):
        codes = torch.randint(0, 256, (48, K // 2), dtype=torch.uint8, device=device)
        scales = (torch.rand(G, 48, 2, device=device) / 50 - 0.01).half()
        x = torch.randn(3, K, device=device)
        _assert_close(ops.quantized_linear(x, codes, scales), x, codes, scales)


def test_larger_shapes_cpu():
    # the model's shapes (SmolLM2's MLP, a tall head slice): many row blocks split over threads
    for codes, scales in (_int8(1536, 576), _int4(1536, 576, 32), _int4(1552, 128, 64),
                          _int8(1536, 576, 32, torch.float16)):
        K = codes.shape[1] * (2 if codes.dtype == torch.uint8 else 1)
        for M in (1, 2, 5):
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


def test_deterministic_across_threads():
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
