"""torch.nn modules over the lladapter ops."""
from __future__ import annotations

import logging
import os
import time

import torch

from . import _C, ops, reference


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension with a learnable per-feature weight (initialised to ones).

    Same semantics as HF's LlamaRMSNorm and Meta's RMSNorm (see ops.rms_norm), computed by the fused kernel;
    under torch.compile, by the same math in torch ops (reference.rms_norm), which the compiler fuses with the
    residual add before the norm and the gradient adds after it: our kernel there is an opaque call that reads and
    writes the activations once more each way. A SmolLM2 training step compiled, AMD EPYC, 2 threads: 1.028x faster
    (docs/benchmarks.md). RoPE and SwiGLU measured no faster decomposed, so they keep the kernels when compiled.
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm: dim must be positive, got {dim}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return reference.rms_norm(x, self.weight, self.eps)
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, max_rows: int = 4) -> torch.Tensor:
    """x @ weight^T (bias-free) for x [..., K], weight [N, K]. On the CPU, when x has 1..max_rows rows (decoding),
    by whichever route `few_rows_route` measured fastest on this machine (once per process):
      "linear"     F.linear;
      "transposed" (weight @ x^T)^T with at least two rows, a GEMM that streams the weights on every thread where
                   the BLAS runs a few-row F.linear on one (MKL on an AMD EPYC: 240 body-sized matrices, 1536 x 576
                   fp32, 2 threads, 7.5 -> 11.7 GB/s at one row);
      "gemv"       (fp32, bf16) our own kernel, _C.few_rows_gemv (csrc/cpu/few_rows_gemv.cpp): the weights split over
                   the threads in blocks of four rows, no GEMM packing or padding (docs/benchmarks.md); its backward
                   is two GEMMs, as F.linear's.
    On an Intel Xeon (AVX-512) F.linear itself streamed at 15-27 GB/s and the transposed GEMM at 7-12. The route
    depends on the machine, the dtype and the row count only (not on grad mode), so a forward gives the same bits
    with and without autograd. Elsewhere (CUDA, more rows, weights that are not plain dense tensors, e.g.
    quantized) and inside a graph being compiled it is F.linear."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or not 1 <= rows <= max_rows or torch.compiler.is_compiling():
        return torch.nn.functional.linear(x, weight)  # (compiling: the compiler's own, not a timing while tracing)
    # (the route before the weight's checks: where it is "linear" a decode step's 211 calls skip them, ~2 us each)
    route = few_rows_route(weight.dtype)
    if route == "linear" or type(weight.data) is not torch.Tensor \
            or weight.layout != torch.strided or weight.dim() != 2:
        return torch.nn.functional.linear(x, weight)
    x2 = x.reshape(rows, x.shape[-1])
    if route == "gemv":
        if not weight.is_contiguous() or x.dtype != weight.dtype:
            return torch.nn.functional.linear(x, weight)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            y = _FewRowsGemv.apply(x2, weight)
        else:
            y = _C.few_rows_gemv(x2, weight)
        return y.view(*x.shape[:-1], weight.shape[0])
    if rows == 1:
        x2 = torch.cat([x2, x2])  # two rows take the multi-threaded GEMM path
    return torch.mm(weight, x2.t())[:, :rows].t().contiguous().view(*x.shape[:-1], weight.shape[0])


class _FewRowsGemv(torch.autograd.Function):
    """_C.few_rows_gemv with F.linear's backward: dx = dy @ weight, dweight = dy^T @ x."""

    @staticmethod
    def forward(ctx, x2, weight):
        ctx.save_for_backward(x2, weight)
        return _C.few_rows_gemv(x2, weight)  # (grad mode is off inside forward)

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight = ctx.saved_tensors
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_y.t() @ x2 if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


GEMM_ROUTE_ENV = "LLADAPTER_GEMM_ROUTE"
GEMM_ROUTES = ("torch", "openblas")
_GEMM_ROUTE: list[str] = []  # the process's route, once chosen (gemm_route)


def gemm_route() -> str:
    """"torch" or "openblas": how `linear` and `mm` run float32 CPU GEMMs of more than a few rows (the training
    step's projections and LM head, prefill). "openblas": _C.openblas_mm, the sgemm of the scipy-openblas32
    package's OpenBLAS, single-threaded on each of torch's intra-op threads over its own slab of the output;
    "torch": torch's own (MKL in the x86 wheels). The default is "openblas" on AMD CPUs, where torch's MKL is the
    slower (AMD EPYC, AVX2, 2 threads, the SmolLM2 projections' shapes: ~195 GFLOP/s against MKL's 130-170;
    docs/benchmarks.md), when the package is installed; "torch" elsewhere. A rule by CPU vendor, not a timing, so
    that every process on a machine computes the same bits (exact resume, DDP ranks). LLADAPTER_GEMM_ROUTE=torch|
    openblas fixes it ("openblas" raises where the library cannot be loaded)."""
    if _GEMM_ROUTE:
        return _GEMM_ROUTE[0]
    forced = os.environ.get(GEMM_ROUTE_ENV, "").strip()
    if forced and forced not in GEMM_ROUTES:
        raise ValueError(f"{GEMM_ROUTE_ENV} must be 'torch' or 'openblas', got {forced!r}")
    route = "torch"
    if forced == "openblas" or (not forced and _cpu_vendor() == "AuthenticAMD"):
        why = _load_openblas()
        if why and forced:
            raise RuntimeError(f"{GEMM_ROUTE_ENV}=openblas, but OpenBLAS cannot be loaded: {why}")
        route = "torch" if why else "openblas"
        if why:
            logging.getLogger(__name__).warning("float32 CPU GEMMs run on torch's BLAS, slower on this AMD CPU than "
                                                "OpenBLAS (nn.gemm_route): %s", why)
    _GEMM_ROUTE.append(route)
    return route


def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _load_openblas() -> str:
    """Loads the scipy-openblas32 package's OpenBLAS into _C; "" when loaded, else why not."""
    if _C.openblas_library():
        return ""
    try:
        import scipy_openblas32
    except ImportError:
        return "the scipy-openblas32 package is not installed"
    try:
        _C.openblas_load(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True)))
    except (RuntimeError, OSError, IndexError) as e:
        return str(e)
    return ""


@torch.compiler.assume_constant_result
def _gemm_route_while_compiling() -> str:
    """gemm_route() inside a graph being compiled: called once while tracing and put in the graph as a constant
    (dynamo cannot trace its /proc read and library load), so that torch.compile(model) before any eager call still
    takes the route. The route is fixed for the process, so the constant holds."""
    return gemm_route()


def openblas_route_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a GEMM of a and b (float32 CPU dense tensors, plain ones in eager mode, no torch.func transform)
    takes the "openblas" route. While compiling, gemm_route's answer as a constant of the graph."""
    if not (a.dtype == torch.float32 and b.dtype == torch.float32 and a.device.type == "cpu"
            and b.device.type == "cpu" and a.layout == torch.strided and b.layout == torch.strided):
        return False
    if torch.compiler.is_compiling():
        return _gemm_route_while_compiling() == "openblas"
    return (type(a.data) is torch.Tensor and type(b.data) is torch.Tensor
            and not torch._C._are_functorch_transforms_active() and gemm_route() == "openblas")


def linear(x: torch.Tensor, weight: torch.Tensor, max_rows: int = 4) -> torch.Tensor:
    """x @ weight^T (bias-free) for x [..., K], weight [N, K]: 1 to max_rows rows on the CPU by few_rows_linear's
    route; more float32 CPU rows by gemm_route's ("openblas": _C.openblas_mm, with F.linear's gradients); anything
    else (CUDA, other dtypes, tensor subclasses such as quantized or distributed weights) F.linear."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows <= max_rows or weight.dim() != 2 or not openblas_route_takes(x, weight):
        return few_rows_linear(x, weight, max_rows)
    return _openblas_mm(x.reshape(rows, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a, b by gemm_route (float32 CPU), else torch.mm."""
    return _openblas_mm(a, b) if openblas_route_takes(a, b) else torch.mm(a, b)


def _openblas_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """_C.openblas_mm(a, b) as the call needs it (as ops._call does for the ops): while compiling, the op
    openblas_mm_op; with a graph to record, _OpenblasMm; otherwise the plain call."""
    if torch.compiler.is_compiling():
        return openblas_mm_op(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _OpenblasMm.apply(a, b)
    return _C.openblas_mm(a, b)


@torch.library.custom_op("lladapter_blas::mm", mutates_args=(), device_types="cpu")
def openblas_mm_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """_C.openblas_mm(a, b) as a torch op, with a fake implementation and autograd, so that torch.compile keeps
    gemm_route's GEMMs (an opaque call in the graph; a pybind function would break the graph). Eager calls take
    _OpenblasMm or the plain call (a custom op's Python dispatch costs ~40 us a call). A CPU BLAS route, not a model
    op: no CUDA kernel (CUDA tensors never take the route)."""
    return _C.openblas_mm(a, b)


@openblas_mm_op.register_fake
def _openblas_mm_fake(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


def _openblas_mm_setup_context(ctx, inputs, output):
    a, b = inputs  # each gradient keeps only the operand it needs (a frozen weight: the activations are not kept)
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)


def _openblas_mm_backward(ctx, grad, matmul=openblas_mm_op):
    """d(a @ b): da = grad @ b^T, db = a^T @ grad, each only when asked for, by matmul: the op itself as registered
    (traced by AOTAutograd, on fake tensors too), _C.openblas_mm in _OpenblasMm."""
    a, b = ctx.saved_tensors
    return (matmul(grad, b.t()) if ctx.needs_input_grad[0] else None,
            matmul(a.t(), grad) if ctx.needs_input_grad[1] else None)


openblas_mm_op.register_autograd(_openblas_mm_backward, setup_context=_openblas_mm_setup_context)


class _OpenblasMm(torch.autograd.Function):
    """openblas_mm_op's autograd (the same setup_context and backward) for eager calls, without torch.library's
    wrapper around it. Once differentiable: its backward's calls record no graph of their own in eager mode."""

    @staticmethod
    def forward(ctx, a, b):
        output = _C.openblas_mm(a, b)
        _openblas_mm_setup_context(ctx, (a, b), output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _openblas_mm_backward(ctx, grad, _C.openblas_mm)


def lm_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight^T (h [N, D], weight [V, D], targets [N] class indices, every row
    labelled), the same value as F.cross_entropy(F.linear(h, weight).float(), targets) (fp64 for fp64 h), with a
    cheaper backward:
    the log-probabilities the forward keeps (fp32, [N, V], as F.cross_entropy's log_softmax keeps them; written over
    the logits, so the forward holds one [N, V] buffer, not two) become the gradient in place, softmax - one_hot,
    one pass over them; autograd's way fills a zero [N, V] gradient, scatters into it and runs log_softmax's
    backward into a third [N, V] tensor (SmolLM2's 49152-word head on 256 labelled rows: 50 MB each). The logits
    are in h's dtype (fp32 statistics, as before). Differentiable in h and weight; one backward per forward (the
    kept tensor is consumed: a second backward through the same graph is refused by autograd's in-place check)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"lm_head_cross_entropy: h must be [N, D] and weight [V, D], got {list(h.shape)} and "
                         f"{list(weight.shape)}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"lm_head_cross_entropy: targets must be [N] = [{h.shape[0]}], got {list(targets.shape)}")
    if h.shape[0] == 0:
        raise ValueError("lm_head_cross_entropy: no rows (the mean of nothing)")
    return _LmHeadCrossEntropy.apply(h, weight, targets)


class _LmHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets):
        stat = torch.float64 if h.dtype == torch.float64 else torch.float32
        logits = linear(h, weight, max_rows=16).to(stat)
        # in place: the logits are this function's own temporary, and a second [N, V] buffer is 50 MB more at the
        # step's peak for SmolLM2's head on 256 rows (and, on the CPU, ~12k page faults of a fresh allocation)
        logp = torch.log_softmax(logits, dim=-1, out=logits)
        targets = targets.long()
        loss = -logp.gather(1, targets[:, None]).mean()
        ctx.save_for_backward(h, weight, targets, logp)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, targets, logp = ctx.saved_tensors
        grad = logp.exp_()  # softmax, in the kept tensor (bumps its version: a second backward is refused)
        grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
        grad.mul_(grad_loss / grad.shape[0])
        grad = grad.to(h.dtype)
        grad_h = mm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = mm(grad.t(), h) if ctx.needs_input_grad[1] else None
        return grad_h, grad_weight, None


_FEW_ROWS_ROUTES: dict[tuple, str] = {}  # (dtype, threads) -> the measured route (few_rows_route)
FEW_ROWS_ROUTE_ENV = "LLADAPTER_FEW_ROWS_ROUTE"
FEW_ROWS_ROUTES = ("linear", "transposed", "gemv")
FEW_ROWS_GEMV_DTYPES = (torch.float32, torch.bfloat16)  # what _C.few_rows_gemv takes


def few_rows_route(dtype: torch.dtype = torch.float32) -> str:
    """"linear", "transposed" or "gemv" (see few_rows_linear): the route that streamed one-row projections fastest
    on this machine, timed once per (dtype, thread count) on 8 weights of 1536 x 576 (28 MB in fp32: more than the
    caches, as a model's weights are), best of 3 passes each, ~30 ms. "gemv" competes for fp32 and bf16 only. The
    answer depends on the CPU and its BLAS; LLADAPTER_FEW_ROWS_ROUTE=linear|transposed|gemv fixes it (e.g. for
    reproducible benchmarks; "gemv" for another dtype falls back to the faster of the other two)."""
    forced = os.environ.get(FEW_ROWS_ROUTE_ENV, "").strip()
    if forced:
        if forced not in FEW_ROWS_ROUTES:
            raise ValueError(f"{FEW_ROWS_ROUTE_ENV} must be 'linear', 'transposed' or 'gemv', got {forced!r}")
        if forced != "gemv" or dtype in FEW_ROWS_GEMV_DTYPES:
            return forced
    key = (dtype, torch.get_num_threads())
    route = _FEW_ROWS_ROUTES.get(key)  # (a decode step asks ~200 times: the choice is made once)
    if route is None:
        times = _time_few_rows_routes(dtype)
        route = _FEW_ROWS_ROUTES[key] = min(times, key=times.__getitem__)
    return route


def _time_few_rows_routes(dtype: torch.dtype) -> dict[str, float]:
    """Seconds per pass over 8 weights of 1536 x 576 with one row, best of 3, for each route that can take dtype."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(1536, 576, generator=g).to(dtype) for _ in range(8)]
        x = torch.randn(1, 576, generator=g).to(dtype)
        x2 = torch.cat([x, x])
        routes = {"linear": lambda w: torch.nn.functional.linear(x, w), "transposed": lambda w: torch.mm(w, x2.t())}
        if dtype in FEW_ROWS_GEMV_DTYPES:
            routes["gemv"] = lambda w: _C.few_rows_gemv(x, w)
        times = {}
        for name, f in routes.items():
            f(ws[0])  # warm up (BLAS init, packing, the thread pool)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for w in ws:
                    f(w)
                best = min(best, time.perf_counter() - t0)
            times[name] = best
    return times


class DecodeLinear(torch.nn.Linear):
    """nn.Linear without bias whose forward is `linear`: few_rows_linear's faster route for the few rows of a decode
    step on the CPU, gemm_route's for more float32 CPU rows (same parameters and state-dict names as nn.Linear)."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype (quantize.QuantizedLinear has the same property)."""
        return self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


from .reference import rope_cos_sin as _rope_cos_sin  # noqa: E402  (kept with the RoPE section)


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding for q [B, T, Hq, d] and k [B, T, Hk, d] (one fused op call, see ops.rope).

    Keeps fp32 cos/sin tables per device (never cast with the module's dtype; computed on first use on a device)
    and grows them on demand, doubling, when a call needs more than `max_positions` positions.

    head_dim: d. rotary_dim: how many leading features rotate (default d; smaller = partial rotary, the rest pass
    through). base: theta_i = base^(-2i/rotary_dim). scaling: Llama-3.1 rope_scaling dict (rope_type "llama3",
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), as in HF configs.
    interleaved: Meta's pair layout (2i, 2i+1) (Meta/GGUF checkpoints) instead of HF's rotate_half (i, i + rd/2).

    forward(q, k, position_ids=None, offset=0, inplace=False) -> (q, k): positions offset + t, or position_ids
    [B, T] / [1, T]. The table is sized for offset + T, which bounds the ids of left-padded and packed batches;
    an id beyond the table is refused by the op (CPU: error; CUDA: device-side assert). inplace=True rotates q and
    k in place (inference only; no allocation).
    """

    def __init__(self, head_dim: int, rotary_dim: int | None = None, base: float = 10000.0,
                 scaling: dict | None = None, max_positions: int = 2048, interleaved: bool = False, device=None):
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be a positive even number, got {head_dim}")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"RotaryEmbedding: rotary_dim must be a positive even number <= head_dim ({head_dim}), "
                             f"got {rotary_dim}")
        if max_positions <= 0:
            raise ValueError(f"RotaryEmbedding: max_positions must be positive, got {max_positions}")
        self.head_dim, self.rotary_dim, self.base = head_dim, rotary_dim, float(base)
        self.scaling = dict(scaling) if scaling else None
        self.max_positions, self.interleaved = int(max_positions), bool(interleaved)
        # device -> (cos, sin) fp32 [max_positions, rotary_dim // 2]; not buffers, so .half()/.to(dtype) leave them
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if device is not None:
            self.cos_sin(device)

    def cos_sin(self, device, positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 tables on `device`, covering at least `positions` positions (default max_positions)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        need = self.max_positions if positions is None else int(positions)
        tables = self._tables.get(device)
        if tables is None or tables[0].shape[0] < need:
            if need > self.max_positions:
                self.max_positions = max(need, 2 * self.max_positions)
            tables = _rope_cos_sin(self.max_positions, self.rotary_dim, self.base, self.scaling,
                                                device=device)
            self._tables[device] = tables
        return tables

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None, offset: int = 0,
                inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if q.dim() != 4 or q.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding: q must be [batch, seq, heads, {self.head_dim}], got {list(q.shape)}")
        cos, sin = self.cos_sin(q.device, offset + q.shape[1])
        fn = ops.rope_ if inplace else ops.rope
        return fn(q, k, cos, sin, position_ids=position_ids, offset=offset, interleaved=self.interleaved)

    def extra_repr(self) -> str:
        s = f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, " \
            f"max_positions={self.max_positions}, interleaved={self.interleaved}"
        return s + (f", scaling={self.scaling}" if self.scaling else "")
