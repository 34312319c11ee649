"""RMSNorm op: kernels vs reference.py, gradients, opcheck, compile, bad inputs (CPU; CUDA mirrors)."""
import pytest
import torch

from lladapter_ext import nn as lnn
from lladapter_ext import ops, reference

from conftest import CUDA_DEVICES, DEVICES, kernel_ops

# Tolerances by dtype. The kernel and the reference differ only in fp32 summation order (a few ulp of fp32 in
# rstd); in bf16/fp16 that can flip a rounding of the normalised value and of the product: at most ~2 ulp of
# the dtype (bf16 ulp = 2^-8 relative, fp16 ulp = 2^-11 relative).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2 * 2**-8, atol=2 * 2**-8),
    torch.float16: dict(rtol=2 * 2**-11, atol=2 * 2**-11),
}
# Gradients add a reduction over the row in fp32 on both sides plus the cast of dx to the dtype.
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=3 * 2**-8, atol=3 * 2**-8),
    torch.float16: dict(rtol=3 * 2**-11, atol=3 * 2**-11),
}
WIDTHS = [1, 3, 64, 4095, 4096, 8193]


def _inputs(shape, dtype, device, wdtype=None):
    x = torch.randn(shape, dtype=dtype, device=device)
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(wdtype or dtype)
    return x, w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", WIDTHS)
def test_forward_matches_reference(device, dtype, width):
    x, w = _inputs((2, 5, width), dtype, device)
    y = ops.rms_norm(x, w, 1e-6)
    ref = reference.rms_norm(x, w, 1e-6)
    assert y.dtype == ref.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, ref, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_fp32_weight(device, dtype):
    # AMP case: half activations, fp32 weight -> fp32 output (cast before the weight multiply)
    x, w = _inputs((7, 4096), dtype, device, wdtype=torch.float32)
    y = ops.rms_norm(x, w, 1e-5)
    ref = reference.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_fp64_math(device):
    # independent of reference.py: the definition written out in float64
    x, w = _inputs((3, 257), torch.float32, device)
    xd, wd = x.double(), w.double()
    expect = wd * xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6).double(), expect, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("width", [3, 4096, 8193])
def test_backward_matches_reference(device, dtype, wdtype, width):
    x, w = _inputs((4, 3, width), dtype, device, wdtype)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.float().requires_grad_(), w.float().requires_grad_()
    y1 = ops.rms_norm(x1, w1, 1e-6)
    gy = torch.randn_like(y1)
    y1.backward(gy)
    # reference gradients from fp32 copies of the same inputs (the fp32 math that the kernel performs)
    y2 = reference.rms_norm(x2, w2, 1e-6)
    y2.backward(gy.float())
    assert x1.grad.dtype == dtype and w1.grad.dtype == w.dtype
    torch.testing.assert_close(x1.grad.float(), x2.grad, **GRAD_TOL[dtype])
    # dweight sums `width`-independent row contributions over 12 rows; relative to the largest entry
    dw_tol = GRAD_TOL[dtype]["rtol"] * w2.grad.abs().max().item()
    torch.testing.assert_close(w1.grad.float(), w2.grad, rtol=0, atol=dw_tol + 1e-5)


def test_gradcheck_float64():
    x = torch.randn(3, 2, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-5), (x, w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x, w = _inputs((4, 33), dtype, device)
    x.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(kernel_ops().rms_norm.default, (x, w, 1e-6))
    if not device.cuda_kernels:
        xd = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        wd = torch.randn(5, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(kernel_ops().rms_norm.default, (xd, wd, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_wide_row_sums_do_not_drift(device):
    # Same-sign terms make fp32 rounding errors add up: a plain fp32 sum of 2^24 squares per row was off by 3.4e-3
    # (CPU, 2^20 terms per vector lane; CUDA, 2^14 per thread). The kernels bound the error by a chunk length (CPU:
    # fp32 chunks of <= 64 terms per lane, chunk sums in fp64) or compensate it (CUDA: Kahan per thread), so rstd and
    # the backward's row dot are within a few fp32 ulps of fp64 at any width: 64 terms give at most 64 u = 3.8e-6
    # relative (u = 2^-24) before the sqrt halves it. The emulator runs 2^20 (64 rounds of 1024 threads x 4 floats).
    width = 2**20 if device.name == "emu" else 2**24
    x = 1 + torch.rand(1, width, device=device)
    w = 0.5 + torch.rand(width, device=device)
    gy = 0.5 + torch.rand(1, width, device=device)
    _, rstd = kernel_ops().rms_norm(x, w, 1e-6)
    xd, wd, gyd = x.double(), w.double(), gy.double()
    rstd_exact = 1 / torch.sqrt((xd * xd).mean(-1) + 1e-6)
    torch.testing.assert_close(rstd.double(), rstd_exact, rtol=4e-6, atol=0)
    # dx = r (dy w - nhat c), c = r mean(dy w x): given the same r, only the row dot's rounding separates them
    dx, _ = kernel_ops().rms_norm_backward(gy, x, w, rstd)
    r = rstd.double()[:, None]
    c = r * (gyd * wd * xd).mean(-1, keepdim=True)
    dx_exact = r * (gyd * wd - xd * r * c)
    # |d dx| <= r |nhat c| 64 u (the dot) + 4 u r (|dn| + |nhat c|) (fp32 roundings of dn, nhat, nhat c, the bracket,
    # the product with r: the bracket cancels, so they count against its terms, not its value)
    u = 2**-24
    dn, nhat_c = (gyd * wd).abs(), (xd * r * c).abs()
    bound = r * nhat_c * 64 * u + 4 * u * r * (dn + nhat_c)
    assert ((dx.double() - dx_exact).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device):
    x, w = _inputs((4, 33), torch.float32, device)
    y, rstd = kernel_ops().rms_norm(x, w, 1e-6)
    torch.library.opcheck(kernel_ops().rms_norm_backward.default, (torch.randn_like(y), x, w, rstd))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, w = _inputs((0, 16), torch.float32, device)
    x.requires_grad_()
    y = ops.rms_norm(x, w)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    base = torch.randn(8, 64, device=device)
    x = base[:, ::2]  # stride 2 in the normalised dim
    w = torch.rand(32, device=device) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, w), reference.rms_norm(x, w), **TOL[torch.float32])
    xt = torch.randn(16, 8, device=device).t()  # transposed
    w8 = torch.rand(16, device=device)
    torch.testing.assert_close(ops.rms_norm(xt, w8), reference.rms_norm(xt, w8), **TOL[torch.float32])


def test_dweight_deterministic_across_threads():
    x, w = _inputs((999, 129), torch.float32, "cpu")
    gy = torch.randn(999, 129)
    _, rstd = kernel_ops().rms_norm(x, w, 1e-6)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        dx1, dw1 = kernel_ops().rms_norm_backward(gy, x, w, rstd)
        torch.set_num_threads(max(2, prev))
        dx2, dw2 = kernel_ops().rms_norm_backward(gy, x, w, rstd)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(dw1, dw2) and torch.equal(dx1, dx2)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[8\]"):
        ops.rms_norm(x, torch.ones(7, device=device))
    with pytest.raises(RuntimeError, match=r"weight must have shape"):
        ops.rms_norm(x, torch.ones(2, 8, device=device))
    with pytest.raises(RuntimeError, match=r"weight must have x's dtype"):
        ops.rms_norm(x, torch.ones(8, dtype=torch.float16, device=device))
    with pytest.raises(RuntimeError, match=r"x must have dtype in"):
        ops.rms_norm(torch.ones(4, 8, dtype=torch.int32, device=device), torch.ones(8, device=device))
    with pytest.raises(RuntimeError, match=r"x must have at least 1 dimension"):
        ops.rms_norm(torch.tensor(1.0, device=device), torch.ones(1, device=device))
    with pytest.raises(RuntimeError, match=r"last \(normalised\) dimension must be non-empty"):
        ops.rms_norm(torch.ones(4, 0, device=device), torch.ones(0, device=device))
    with pytest.raises(RuntimeError, match=r"eps must be >= 0"):
        ops.rms_norm(x, torch.ones(8, device=device), -1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    w = torch.ones(8, device=device)
    _, rstd = kernel_ops().rms_norm(x, w, 1e-6)
    with pytest.raises(RuntimeError, match=r"grad_y must have x's shape"):
        kernel_ops().rms_norm_backward(torch.ones(4, 7, device=device), x, w, rstd)
    with pytest.raises(RuntimeError, match=r"rstd must hold one value per row"):
        kernel_ops().rms_norm_backward(torch.ones(4, 8, device=device), x, w, rstd[:2])
    with pytest.raises(RuntimeError, match=r"rstd must have dtype"):
        kernel_ops().rms_norm_backward(torch.ones(4, 8, device=device), x, w, rstd.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a cross-device argument")
def test_device_mismatch_names_argument():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"weight"):
        ops.rms_norm(x, torch.ones(8))


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_dtype_double_refused(device):
    # fp64 is a CPU-only (gradcheck) path; the CUDA kernels refuse it by name.
    with pytest.raises(RuntimeError, match=r"x must have dtype in \{Float, BFloat16, Half\}"):
        ops.rms_norm(torch.ones(2, 4, dtype=torch.float64, device=device),
                     torch.ones(4, dtype=torch.float64, device=device))


def _compiled_graphs(fn, backend):
    """torch.compile(fn) whose dynamo graphs (torch-level FX graphs, before AOTAutograd) are kept in the list
    returned beside it, then compiled by `backend`."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=keep), graphs


def _calls_rms_norm_op(graphs) -> bool:
    return any("rms_norm" in str(node.target) and "lladapter" in str(node.target)
               for gm in graphs for node in gm.graph.nodes if node.op == "call_function")


@pytest.mark.parametrize("device", DEVICES)
def test_op_under_torch_compile(device):
    """ops.rms_norm stays our op in a compiled graph (fake implementation, autograd) on every device."""
    w = torch.randn(48, device=device)
    x = torch.randn(6, 48, device=device, requires_grad=True)
    backend = "aot_eager" if torch.device(device).type == "cpu" else "inductor"
    compiled, graphs = _compiled_graphs(lambda x: ops.rms_norm(x * 2.0, w, 1e-5).relu().sum(-1), backend)
    out = compiled(x)
    assert _calls_rms_norm_op(graphs)
    x2 = x.detach().clone().requires_grad_()
    ref = reference.rms_norm(x2 * 2.0, w, 1e-5).relu().sum(-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_is_torch_ops_under_torch_compile(device, dtype):
    """nn.RMSNorm under torch.compile is the norm's math in torch ops (no call of our op, so that the compiler can
    fuse it with its neighbours), with the op's results: the eager module's output and gradients to the dtype's
    rounding (fp32: 1e-5; bf16: the output is rounded to bf16 before the weight multiply, one bf16 ulp 2^-8)."""
    m = lnn.RMSNorm(48, eps=1e-5, device=device)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(6, 48, device=device, dtype=dtype)

    def f(x):
        return (m(x + 1.0) * 3.0).sum(-1)

    backend = "aot_eager" if torch.device(device).type == "cpu" else "inductor"
    compiled, graphs = _compiled_graphs(f, backend)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xc)
    assert graphs and not _calls_rms_norm_op(graphs)
    out.sum().backward()
    wc, m.weight.grad = m.weight.grad, None
    ref = f(xe)
    ref.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7 * 48)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(xc.grad, xe.grad, **tol)
    torch.testing.assert_close(wc, m.weight.grad, **tol)


def test_torch_compile_inductor_cpu():
    w = torch.rand(32) + 0.5

    @torch.compile(fullgraph=True)
    def f(x):
        return ops.rms_norm(x + 1, w, 1e-6) * 3

    x = torch.randn(5, 32)
    torch.testing.assert_close(f(x), reference.rms_norm(x + 1, w, 1e-6) * 3, rtol=1e-5, atol=1e-5)


def test_build_info():
    import lladapter_ext
    info = lladapter_ext.build_info()
    assert set(info) >= {"with_cuda", "cuda_archs", "torch_version", "cpu_isa"}
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if info["with_cuda"]:
        assert info["cuda_archs"]


def _every_op_call():
    """(name, inputs, f) for each op function with autograd: f(*inputs) calls it and returns the outputs to
    differentiate; the inputs are fp64 leaves that require grad, except the quantized weight's codes and scales."""
    torch.manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    cos, sin = reference.rope_cos_sin(16, 8, device="cpu")
    codes, scales = torch.randint(-127, 128, (6, 8), dtype=torch.int8), torch.rand(6) + 0.1
    return [
        ("rms_norm", (leaf(2, 3, 8), (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()),
         lambda x, w: (ops.rms_norm(x, w),)),
        ("swiglu", (leaf(3, 8), leaf(3, 8)), lambda g, u: (ops.swiglu(g, u),)),
        ("rope", (leaf(2, 5, 4, 8), leaf(2, 5, 2, 8)), lambda q, k: ops.rope(q, k, cos, sin, offset=3)),
        ("gated_prompt_attention", (leaf(2, 5, 4, 8), leaf(2, 5, 2, 8), leaf(2, 5, 2, 8), leaf(1, 3, 2, 8),
                                    leaf(1, 3, 2, 8), torch.rand(4, requires_grad=True)),
         lambda *a: (ops.gated_prompt_attention(*a, backend="fused"),)),
        ("quantized_linear", (leaf(3, 8),), lambda x: (ops.quantized_linear(x, codes, scales),)),
    ]


def _outputs_and_grads(f, inputs):
    outs = f(*inputs)
    grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], [torch.ones_like(o) for o in outs])
    return outs, grads


def _op_node_name(t):
    """The name of the autograd node that made t, looking through views (quantized_linear reshapes its result)."""
    node = t.grad_fn
    while type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
        node = node.next_functions[0][0]
    return type(node).__name__


def test_every_op_records_its_graph_through_its_own_autograd_function():
    # In eager mode with a graph to record, each op function runs its kernel through ops._EAGER_AUTOGRAD's
    # autograd.Function (no torch.library wrapper around it): outputs and gradients equal, bit for bit, those of
    # the op's registered autograd (torch.ops.lladapter.<op> called directly, as torch.compile and modes see it).
    for name, inputs, f in _every_op_call():
        outs, grads = _outputs_and_grads(f, inputs)
        assert all(_op_node_name(o) == f"lladapter_{name}Backward" for o in outs), name
        registered = getattr(torch.ops.lladapter, name)
        original = ops._EAGER_AUTOGRAD["lladapter"][name]
        ops._EAGER_AUTOGRAD["lladapter"][name] = type("Registered", (), {"apply": staticmethod(registered)})
        try:
            r_outs, r_grads = _outputs_and_grads(f, inputs)
        finally:
            ops._EAGER_AUTOGRAD["lladapter"][name] = original
        assert all(_op_node_name(o).startswith("GeneratedBackwardFor_lladapter") for o in r_outs), name
        for a, b in zip(outs + grads, r_outs + r_grads):
            assert torch.equal(a, b), name


def test_without_a_graph_to_record_the_ops_skip_autograd():
    # generation and serving run under no_grad: the ops then skip every Python autograd kernel (ops._call), with
    # the same results and no graph; with grad enabled and no input that requires grad, the same
    for name, inputs, f in _every_op_call():
        with_graph = f(*inputs)
        with torch.no_grad():
            outs = f(*inputs)
        detached = f(*[t.detach() for t in inputs])
        for o, od, og in zip(outs, detached, with_graph):
            assert o.grad_fn is None and od.grad_fn is None and not o.requires_grad, name
            assert torch.equal(o, og.detach()) and torch.equal(od, og.detach()), name
