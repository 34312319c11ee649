"""The Python face of the lladapter ops (torch.ops.lladapter.*): autograd and fake (meta) registrations, so
they work with autograd, torch.compile and FakeTensor tracing, and one documented function per op.

The same registrations cover torch.ops.lladapter_emu.*, the CUDA kernels run on CPU tensors by the emulator
(lladapter_ext.emulator): inside `emulator.kernels()`, every function here calls those instead of the real kernels.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from . import reference

# The op namespace the functions below call: torch.ops.lladapter (the CPU/CUDA kernels), or torch.ops.lladapter_emu
# inside lladapter_ext.emulator.kernels().
_lib = torch.ops.lladapter


_BelowAutograd = torch._C._AutoDispatchBelowAutograd


def _call(op: str, *args):
    """torch.ops.<namespace>.<op>(*args), as the op functions below call their kernels, by what the call needs:
    - no autograd graph to record (grad mode off, as in generation, serving and evaluation, or no input requiring
      grad), not compiling: below the op's autograd kernel. The Python kernel that torch.library.register_autograd
      installs runs even then and costs ~9 us a call (rms_norm on one 576-wide row: 13.7 -> 4.6 us), ~1.4 ms of a
      SmolLM2 decode step's 151 op calls;
    - a graph to record, in eager mode on plain tensors: the op's autograd.Function (_EAGER_AUTOGRAD: the same
      setup_context and backward as the registered autograd, without torch.library's wrapper around them, whose
      fill_defaults and redispatch cost ~40 us a call forward and backward; docs/benchmarks.md);
    - otherwise (compiling, torch.func transforms, tensor subclasses or modes with __torch_function__): the op as
      registered, which those understand."""
    kernel = getattr(_lib, op)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or torch._C._has_torch_function(
            args):
        return kernel(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return _EAGER_AUTOGRAD[_lib.name][op].apply(*args)
    with _BelowAutograd():
        return kernel(*args)


def kernel_namespace() -> str:
    """'lladapter', or 'lladapter_emu' while the emulated CUDA kernels are active (lladapter_ext.emulator)."""
    return _lib.name


# ATen's names for dtypes, as the kernels' messages print them (csrc/common.h), so that every backend and the fake
# implementations refuse an input with the same words.
_ATEN_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
                     torch.float16: "Half", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
                     torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                     torch.complex128: "ComplexDouble"}


def _dtype_name(dtype: torch.dtype) -> str:
    return _ATEN_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check_same_device(op: str, ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """The kernels' check_same_device, for the fake implementations (a call mixing real and meta tensors dispatches
    to them and must fail as the kernel would, not return an uninitialised tensor) and the Python backends."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; all arguments "
                               f"must be on the same device")


def _check_dtype_in(op: str, name: str, t: torch.Tensor, allowed: tuple) -> None:
    if t.dtype not in allowed:
        raise RuntimeError(f"{op}: {name} must have dtype in {{{', '.join(_dtype_name(d) for d in allowed)}}}, "
                           f"got {_dtype_name(t.dtype)}")


_CPU_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CUDA_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: y = weight * cast_to(x.dtype)(x / sqrt(mean(x^2) + eps)).

    Statistics in fp32 (fp64 for fp64 x); result dtype = promotion of x and weight (fp32 weight with bf16/fp16
    x gives fp32, as HF's LlamaRMSNorm does). weight: [x.size(-1)], x's dtype or fp32 for half x.
    Differentiable in x and weight.
    """
    y, _ = _call("rms_norm", x, weight, float(eps))
    return y


def _rms_norm_fake(x, weight, eps):
    _check_same_device("lladapter::rms_norm", "x", x, weight=weight)
    torch._check(x.dim() >= 1, lambda: "lladapter::rms_norm: x must have at least 1 dimension")
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                 lambda: f"lladapter::rms_norm: weight must have shape [{x.shape[-1]}], got {list(weight.shape)}")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.new_empty(x.shape, dtype=out_dtype)
    rstd = x.new_empty(x.shape[:-1], dtype=stat_dtype)
    return y, rstd


def _rms_norm_backward_fake(grad_y, x, weight, rstd):
    _check_same_device("lladapter::rms_norm_backward", "x", x, weight=weight, grad_y=grad_y, rstd=rstd)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        weight, memory_format=torch.contiguous_format)


def _rms_norm_setup_context(ctx, inputs, output, lib):
    ctx.lib = lib
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        return None, None, None
    dx, dw = ctx.lib.rms_norm_backward(grad_y, x, weight, rstd)
    return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None


# --------------------------------------------------------------------------------------------- RoPE
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         position_ids: torch.Tensor | None = None, offset: int = 0,
         interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q [B, T, Hq, d] and k [B, T, Hk, d] in one fused call (Hq != Hk: GQA).

    Each pair (a, b) of the first rd = 2 * cos.shape[-1] features of every head rotates by angle pos * theta_i:
        a' = a cos(pos theta_i) - b sin(pos theta_i),   b' = a sin(pos theta_i) + b cos(pos theta_i),
    theta_i = base^(-2i/rd) (optionally Llama-3.1-scaled), with cos/sin read from fp32 tables [P, rd/2] made by
    rope_cos_sin_cache (or reference.rope_cos_sin).
    - interleaved=True: Meta's layout, pairs (2i, 2i+1) (Meta and GGUF checkpoints);
      interleaved=False: HF's rotate_half layout, pairs (i, i + rd/2) (HF checkpoints).
    - pos = offset + t (KV-cache decoding: offset = number of cached tokens), or position_ids[b, t] when given
      (int64 [B, T] or [1, T]; left-padded batches, packed sequences). Positions must lie in [0, P): checked on
      the host for offset + T and, on CPU, for position_ids; on CUDA position_ids are checked on the device (an
      out-of-range id triggers a device-side assert, as torch's own indexing does) so no host sync is needed.
    - Partial rotary is supported: rd may be smaller than head_dim d (d and rd even); features rd..d pass through.
    - fp32/bf16/fp16 (and fp64 on CPU) inputs; trigonometry and products in fp32 (fp64 for fp64), results in the
      input dtype. q and k may be strided views (e.g. slices of a fused qkv projection).
    Returns new contiguous (q_out, k_out). Differentiable in q and k: the backward is the same rotation by the
    negated angle. cos/sin are constants (no gradient).
    """
    return _call("rope", q, k, cos, sin, _as_position_ids(position_ids), offset, interleaved, False)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          position_ids: torch.Tensor | None = None, offset: int = 0,
          interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place rope (inference): rotates q and k where they are and returns them; same math as rope().

    Allocates nothing when q's and k's last dims are contiguous and cos/sin (and position_ids) are contiguous.
    Not differentiable: raises if grad mode is on and q or k requires grad.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("lladapter rope_: q or k requires grad; the in-place variant is for inference "
                           "(use ops.rope for training, or run under torch.no_grad())")
    _lib.rope_(q, k, cos, sin, _as_position_ids(position_ids), offset, interleaved, False)
    return q, k


def _as_position_ids(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    # the kernels read int64; int32 ids (e.g. from a tokenizer) are widened, anything else is refused by the op
    if position_ids is not None and position_ids.dtype in (torch.int32, torch.int16, torch.uint8, torch.int8):
        return position_ids.long()
    return position_ids


def _scaling_key(scaling: dict | None):
    return None if not scaling else tuple(sorted((str(k), v) for k, v in scaling.items()))


@functools.lru_cache(maxsize=32)
def _cos_sin_cached(max_positions: int, rotary_dim: int, base: float, scaling_key, device: str):
    scaling = dict(scaling_key) if scaling_key else None
    return reference.rope_cos_sin(max_positions, rotary_dim, base, scaling, device=torch.device(device))


def rope_cos_sin_cache(max_positions: int, rotary_dim: int, base: float = 10000.0,
                       scaling: dict | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 cos/sin tables [max_positions, rotary_dim // 2] for rope(), computed once per (max_positions,
    rotary_dim, base, scaling, device) and cached (angles formed in fp64, see reference.rope_cos_sin).

    scaling: Llama-3.1 rope_scaling as in HF configs, e.g. {"rope_type": "llama3", "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
    The returned tensors are shared by every caller with the same key: do not modify them in place.
    """
    if max_positions <= 0:
        raise ValueError(f"rope_cos_sin_cache: max_positions must be positive, got {max_positions}")
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _cos_sin_cached(int(max_positions), int(rotary_dim), float(base), _scaling_key(scaling), str(dev))


def _rope_fake_checks(q, k, cos, sin, position_ids, op="lladapter::rope"):
    _check_same_device(op, "q", q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    torch._check(q.dim() == 4, lambda: f"lladapter::rope: q must have shape [batch, seq, heads, head_dim], got "
                                       f"{list(q.shape)}")
    torch._check(k.dim() == 4, lambda: f"lladapter::rope: k must have shape [batch, seq, kv_heads, head_dim], got "
                                       f"{list(k.shape)}")
    torch._check(k.shape[0] == q.shape[0] and k.shape[1] == q.shape[1] and k.shape[3] == q.shape[3],
                 lambda: f"lladapter::rope: k {list(k.shape)} must match q {list(q.shape)} in batch, seq, head_dim")
    torch._check(k.dtype == q.dtype, lambda: f"lladapter::rope: k must have q's dtype ({q.dtype}), got {k.dtype}")
    torch._check(cos.dim() == 2 and sin.shape == cos.shape,
                 lambda: f"lladapter::rope: cos/sin must be [max_positions, rotary_dim / 2], got "
                         f"{list(cos.shape)} and {list(sin.shape)}")


def _rope_fake(q, k, cos, sin, position_ids, offset, interleaved, inverse):
    _rope_fake_checks(q, k, cos, sin, position_ids)
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_inplace_fake(q, k, cos, sin, position_ids, offset, interleaved, inverse):
    _rope_fake_checks(q, k, cos, sin, position_ids, op="lladapter::rope_")
    return None


def _rope_setup_context(ctx, inputs, output, lib):
    ctx.lib = lib
    q, k, cos, sin, position_ids, offset, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.offset, ctx.interleaved, ctx.inverse = offset, interleaved, inverse
    ctx.q_shape, ctx.k_shape = q.shape, k.shape


def _rope_backward(ctx, grad_q, grad_k):
    # R(theta)^T = R(-theta): the gradient is the same rotation with the angle negated
    cos, sin, position_ids = ctx.saved_tensors
    if grad_q is None and grad_k is None:
        return (None,) * 8
    ref = grad_q if grad_q is not None else grad_k
    if grad_q is None:
        grad_q = ref.new_zeros(ctx.q_shape)
    if grad_k is None:
        grad_k = ref.new_zeros(ctx.k_shape)
    dq, dk = ctx.lib.rope(grad_q, grad_k, cos, sin, position_ids, ctx.offset, ctx.interleaved, not ctx.inverse)
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------- attention
_ATTN_BACKENDS = ("auto", "fused", "split", "reference")
# The gate activations phi of the prompt branch: tanh (the official LLaMA-Adapter) or identity (PEFT, LitGPT).
GATE_ACTS = ("tanh", "identity")
# Head dims the CUDA kernels are instantiated for (the CPU kernels take any d).
CUDA_HEAD_DIMS = (64, 80, 96, 128)
# The CUDA fused op runs its split-K decode forward for at most this many query rows against at least this many
# keys (kDecodeMaxTq and 2 * kDecodeMinChunk in csrc/cuda/gated_prompt_attention_cuda.h).
CUDA_DECODE_MAX_TQ, CUDA_DECODE_MIN_TK = 4, 256


def gated_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           pk: torch.Tensor | None = None, pv: torch.Tensor | None = None,
                           gate: torch.Tensor | None = None, causal: bool = True, gate_act: str = "tanh",
                           scale: float | None = None, kv_start: torch.Tensor | None = None,
                           *, backend: str = "auto") -> torch.Tensor:
    """LLaMA-Adapter zero-init gated attention (word branch + phi(gate) * prompt branch, two softmaxes).

    out_i = sum_j a_ij v_j + phi(g_h) * sum_p b_ip pv_p, with a = softmax over the allowed word keys of
    scale * q_i.k_j (causal: j <= i + Tk - Tq; kv_start [B] left padding: j >= kv_start[b]; kv_start [B, Tq] one
    start per query: j >= kv_start[b, i]; a row with no allowed key gets 0) and b = softmax over the K prompt keys
    of scale * q_i.pk_p; phi = tanh or identity (gate_act). Packed sequences: causal with kv_start[b, i] = the
    index of the first token of the sequence holding token i is block-diagonal causal attention (each sequence
    sees only its own earlier tokens), while every query still sees the whole prompt.
    q [B, Tq, H, d]; k, v [B, Tk, Hkv, d] (H a multiple of Hkv; head h reads kv head h // (H // Hkv));
    pk, pv [Bp, K, Hkv, d] with Bp in {1, B}, or None / K = 0 for plain attention; gate [H] (fp32 parameter);
    scale defaults to 1/sqrt(d). fp32 accumulation; out in q's dtype. Differentiable in q, k, v, pk, pv, gate.
    Every output and gradient that depends on a NaN/inf input is non-finite, on every backend (docs/reliability.md).

    backend:
      "fused"     one kernel (CPU or CUDA) for both branches, flash-style (never materialises Tq x Tk);
      "split"     the word branch through torch's scaled_dot_product_attention, the prompt branch as batched
                  GEMMs in fp32 (_PromptBranch), gated and added;
      "reference" the plain-PyTorch oracle (materialises the scores);
      "auto"      CPU: fused (measured faster than split on CPU; decode uses the kernel's split-K path);
                  CUDA: when d is one of CUDA_HEAD_DIMS, fused for decode calls without gradients (at most
                  CUDA_DECODE_MAX_TQ query rows against at least CUDA_DECODE_MIN_TK keys: its split-K decode kernels)
                  and split (SDPA's flash/cuDNN word branch) for everything else; other d: reference.
    """
    if backend not in _ATTN_BACKENDS:
        raise ValueError(f"backend must be one of {_ATTN_BACKENDS}, got {backend!r}")
    if scale is None:  # (a q without a positive head dim is refused by the checks below, naming it)
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    if backend == "auto":
        backend = _auto_attention_backend(q, k, v, pk, pv, gate)
    if backend in ("reference", "split") and not torch.compiler.is_compiling():
        # the fused kernels check their own arguments; these two paths hand the word branch to other code. Not
        # while torch.compile traces: it cannot trace the checks' message closures and would break the graph at
        # every call (every layer of a compiled model on CUDA); a bad input then fails in the traced ops instead.
        check_gated_prompt_attention_inputs(q, k, v, pk, pv, gate, kv_start, gate_act, float(scale),
                                            cuda_kernels=backend == "split" and runs_cuda_kernels(q))
    if backend == "reference":
        return reference.gated_prompt_attention(q, k, v, pk, pv, gate, causal=causal, gate_act=gate_act,
                                                scale=scale, kv_start=kv_start)
    if backend == "fused":
        out, _, _ = _call("gated_prompt_attention", q, k, v, pk, pv, gate, kv_start, causal, gate_act, float(scale))
        return out
    return _split_gated_prompt_attention(q, k, v, pk, pv, gate, causal, gate_act, float(scale), kv_start)


def runs_cuda_kernels(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs our CUDA kernels: t is on CUDA, or the emulated CUDA kernels are active
    (emulator.kernels(): CPU tensors then take the GPU's routes, so that make test runs them). Code that routes by
    device (the attention backends, quantize's decode kernel) asks this, not t.device."""
    return t.device.type == "cuda" or kernel_namespace() != "lladapter"


def _auto_attention_backend(q: torch.Tensor, k: torch.Tensor | None = None, *others: torch.Tensor | None) -> str:
    """The backend "auto" takes for q (and k, with the call's other tensors for whether a gradient is needed)."""
    # the emulated CUDA kernels (CPU tensors) choose as CUDA does, so that the emulator runs the GPU's paths
    if not runs_cuda_kernels(q):
        return "fused"
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return "reference"
    # A decode step: the fused op's split-K decode kernels, two launches. On the H200 (2026-11-29; B 4, Tq 1,
    # Tk 4096, H 32/8, bf16) they took 0.184 ms against 0.212 ms for split when its prompt branch was one launch
    # (now ~12 small ones) and 0.181 ms for two SDPA calls; the decode step there was host-bound, so launches count.
    if (k is not None and q.dim() == 4 and k.dim() == 4 and q.shape[1] <= CUDA_DECODE_MAX_TQ
            and k.shape[1] >= CUDA_DECODE_MIN_TK and os.environ.get("LLADAPTER_CUDA_DECODE", "") != "off"
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, *others)))):
        return "fused"
    return "split"


def _sdpa_attention(q, k, v, causal: bool, scale: float, kv_start: torch.Tensor | None) -> torch.Tensor:
    """One branch through torch SDPA (the word branch with its mask; the prompt branch with causal False and no
    kv_start), with the same masking and NaN semantics as the fused op."""
    B, Tq, H, d = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if Tk == 0:
        return q.new_zeros(q.shape)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if scale == 0.0:  # torch's CPU SDPA returns NaN rows for scale=0 (found by fuzzing): zero scores, same math
        qt, scale = qt * 0.0, 1.0
    if causal and Tq == 1:
        causal = False  # decode: the one query sees every cached key (j <= 0 + Tk - 1)
    unmasked = kv_start is None and (not causal or Tq == Tk)
    if unmasked and q.device.type == "cpu":
        # without a mask, torch's CPU flash kernel returns 0, not NaN, for a row whose every score is NaN (e.g. a NaN
        # in q); with one it propagates NaN as reference.py does. Finite q and k give no NaN score, so the unmasked
        # kernel is taken only then. A sum is non-finite when any element is (it may also overflow: then the masked
        # path runs, still right); one read, no bool copy, and no device sync on the CPU.
        unmasked = bool(torch.isfinite(q.sum() + k.sum()))
    if unmasked:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=Hkv != H)
        return o.transpose(1, 2)
    # SDPA's is_causal aligns the diagonal top-left; ours is bottom-right (offset Tk - Tq), plus left padding.
    allowed = reference.allowed_word_keys(B, Tq, Tk, causal, kv_start, q.device).unsqueeze(1)  # [B, 1, Tq, Tk]
    has_key = allowed.any(-1, keepdim=True)
    # rows without an allowed key attend everywhere (no NaN, forward or backward) and are zeroed after
    mask = allowed | ~has_key
    if Hkv != H:  # the masked SDPA kernels do not all take enable_gqa
        kt = kt.repeat_interleave(H // Hkv, dim=1)
        vt = vt.repeat_interleave(H // Hkv, dim=1)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return o.masked_fill(~has_key, 0.0).transpose(1, 2)


def _split_gated_prompt_attention(q, k, v, pk, pv, gate, causal, gate_act, scale, kv_start):
    word = _sdpa_attention(q, k, v, causal, scale, kv_start)
    if pk is None or pk.shape[1] == 0:
        return word
    return word + _PromptBranch.apply(q, pk, pv, gate, gate_act, scale)


def _rows_by_prompt(x: torch.Tensor, dtype: torch.dtype, Hkv: int, Bp: int) -> torch.Tensor:
    """x [B, T, H, d] in dtype, one copy, as [Hkv * Bp, rows, d]: row block g = kv head * Bp + prompt holds the rows
    (batch, query head of the group, token) that read prompt g, so one batched GEMM serves every query head of a
    kv head (and, with a shared prompt, Bp = 1, every batch row)."""
    B, T, H, d = x.shape
    rep = H // Hkv
    out = torch.empty((Hkv, B, rep, T, d), dtype=dtype, device=x.device)
    out.copy_(x.reshape(B, T, Hkv, rep, d).permute(2, 0, 3, 1, 4))  # (a view for any q the model passes)
    return out.view(Hkv * Bp, B * rep * T // max(Bp, 1), d)


def _rows_to_tokens(x: torch.Tensor, shape, dtype: torch.dtype, Hkv: int) -> torch.Tensor:
    """The inverse of _rows_by_prompt: [Hkv * Bp, rows, d] back to a contiguous [B, T, H, d] in dtype (one copy)."""
    B, T, H, d = shape
    out = torch.empty(shape, dtype=dtype, device=x.device)
    out.view(B, T, Hkv, H // Hkv, d).copy_(x.view(Hkv, B, H // Hkv, T, d).permute(1, 3, 0, 2, 4))
    return out


def _prompt_by_kv_head(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pk or pv [Bp, K, Hkv, d] as [Hkv * Bp, K, d] in dtype (row block g as in _rows_by_prompt)."""
    Bp, K, Hkv, d = t.shape
    out = torch.empty((Hkv, Bp, K, d), dtype=dtype, device=t.device)
    return out.copy_(t.permute(2, 0, 1, 3)).view(Hkv * Bp, K, d)  # one kernel (a decode step calls this per layer)


def _prompt_from_kv_head(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of _prompt_by_kv_head: [Hkv * Bp, K, d] back to a contiguous tensor of like's [Bp, K, Hkv, d]
    shape and dtype (a prompt gradient)."""
    Bp, K, Hkv, d = like.shape
    return x.view(Hkv, Bp, K, d).permute(1, 2, 0, 3).to(like.dtype).contiguous()


class _PromptBranch(torch.autograd.Function):
    """The split backend's prompt branch, phi(gate_h) * softmax(scale q pk^T) pv for every query head, as batched
    GEMMs in fp32 (fp64 for fp64 q) over all of a kv head's query rows at once; returns it in q's dtype, [B, T, H, d].
    K is a handful of keys: the work is a few passes over q-sized tensors. Through SDPA (LitGPT's way, and this
    backend's until 2026-12-03) it cost ~1.1 ms forward + backward on the H200 at B 4, T 512, H 32, d 128, bf16,
    more than the 0.67 ms of the causal word branch over 512 keys (docs/benchmarks.md, the attention table:
    sdpa_x2_gated against sdpa_plain). Saved for the backward: q (the word branch keeps it too), the prompt, and the
    probabilities [B, H, T, K]; no q-sized copy."""

    @staticmethod
    def forward(ctx, q, pk, pv, gate, gate_act: str, scale: float):
        with torch.autocast(q.device.type, enabled=False):  # fp32 GEMMs also under training's bf16/fp16 autocast
            return _PromptBranch._forward(ctx, q, pk, pv, gate, gate_act, scale)

    @staticmethod
    def _forward(ctx, q, pk, pv, gate, gate_act: str, scale: float):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, T, H, d = q.shape
        Bp, Hkv = pk.shape[0], pk.shape[2]
        rep = H // Hkv
        # scores s = scale q pk^T, the scale folded into the K prompt rows (a tiny tensor, not a pass over s)
        s = torch.bmm(_rows_by_prompt(q, acc, Hkv, Bp), (_prompt_by_kv_head(pk, acc) * scale).transpose(1, 2))
        p = torch.softmax(s, dim=-1)  # [Hkv * Bp, rows, K]: NaN rows stay NaN (a NaN or inf input), as in reference
        phi = gate.to(acc)
        if gate_act == "tanh":
            phi = torch.tanh(phi)
        o = torch.bmm(_gated(p, phi, Hkv, B, rep, T), _prompt_by_kv_head(pv, acc))
        ctx.save_for_backward(q, pk, pv, gate, p, phi)
        ctx.gate_act, ctx.scale = gate_act, scale
        return _rows_to_tokens(o, q.shape, q.dtype, Hkv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _PromptBranch._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, pk, pv, gate, p, phi = ctx.saved_tensors
        acc = p.dtype
        B, T, H, _ = q.shape
        Bp, Hkv = pk.shape[0], pk.shape[2]
        rep = H // Hkv
        dout = _rows_by_prompt(grad_out, acc, Hkv, Bp)
        dpg = torch.bmm(dout, _prompt_by_kv_head(pv, acc).transpose(1, 2))  # dL/d(phi p), [Hkv * Bp, rows, K]
        D = (p * dpg).sum(-1, keepdim=True)  # dL/dphi per row: rowsum(p dL/d(phi p))
        dq = dpk = dpv = dgate = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ds = _gated(p * (dpg - D), phi, Hkv, B, rep, T)  # dL/ds (softmax backward; s = scale q pk^T)
            if ctx.needs_input_grad[0]:
                dq = _rows_to_tokens(torch.bmm(ds, _prompt_by_kv_head(pk, acc) * ctx.scale), q.shape, q.dtype, Hkv)
            if ctx.needs_input_grad[1]:  # the bmm over a block's rows sums a shared prompt's gradient over the batch
                dpk = torch.bmm(ds.transpose(1, 2), _rows_by_prompt(q, acc, Hkv, Bp)) * ctx.scale
                dpk = _prompt_from_kv_head(dpk, pk)
        if ctx.needs_input_grad[2]:
            dpv = _prompt_from_kv_head(torch.bmm(_gated(p, phi, Hkv, B, rep, T).transpose(1, 2), dout), pv)
        if ctx.needs_input_grad[3]:
            dphi = D.view(Hkv, B, rep, T).sum((1, 3)).reshape(H)
            dgate = (dphi * (1 - phi * phi) if ctx.gate_act == "tanh" else dphi).to(gate.dtype)
        return dq, dpk, dpv, dgate, None, None


def _gated(p: torch.Tensor, phi: torch.Tensor, Hkv: int, B: int, rep: int, T: int) -> torch.Tensor:
    """p [Hkv * Bp, rows, K] (rows as _rows_by_prompt lays them out) times phi of each row's query head."""
    return (p.view(Hkv, B, rep, T, p.shape[-1]) * phi.view(Hkv, 1, rep, 1, 1)).view(p.shape)


def check_gated_prompt_attention_inputs(q, k, v, pk, pv, gate, kv_start, gate_act: str, scale: float, *,
                           cuda_kernels: bool = False, op: str = "lladapter::gated_prompt_attention") -> None:
    """The argument checks of the attention kernels (gated_prompt_attention_check_inputs in
    csrc/gated_prompt_attention.h), with the
    same messages, for what runs no kernel of ours on the whole input: the fake (meta) implementation, the split
    backend's SDPA word branch and the reference backend. Every backend accepts and refuses the same inputs (the
    kernels' own capability limits aside: CUDA head dims and no float64 there, see gated_prompt_attention)."""
    if gate_act not in GATE_ACTS:
        raise RuntimeError(f"{op}: gate_act must be 'tanh' or 'identity', got '{gate_act}'")
    _check_same_device(op, "q", q, k=k, v=v)
    _check_dtype_in(op, "q", q, _CUDA_FLOAT_DTYPES if cuda_kernels else _CPU_FLOAT_DTYPES)
    torch._check(q.dim() == 4, lambda: f"{op}: q must have shape [B, Tq, H, d], got {list(q.shape)}")
    torch._check(k.dim() == 4, lambda: f"{op}: k must have shape [B, Tk, Hkv, d], got {list(k.shape)}")
    torch._check(tuple(v.shape) == tuple(k.shape),
                 lambda: f"{op}: v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        torch._check(t.dtype == q.dtype, lambda: f"{op}: {name} must have q's dtype ({_dtype_name(q.dtype)}), got "
                                                 f"{_dtype_name(t.dtype)}")
    B, Tq, H, d = q.shape
    Hkv = k.shape[2]
    torch._check(d > 0, lambda: f"{op}: head dim d (q.size(3)) must be positive, got {d}")
    torch._check(k.shape[0] == B, lambda: f"{op}: k must have q's batch size {B} in dim 0, got k of shape "
                                          f"{list(k.shape)}")
    torch._check(k.shape[3] == d, lambda: f"{op}: k must have q's head dim d = {d} in dim 3, got k of shape "
                                          f"{list(k.shape)}")
    torch._check(Hkv > 0 and H % Hkv == 0,
                 lambda: f"{op}: the number of query heads H = {H} (q.size(2)) must be a multiple of the number of "
                         f"kv heads Hkv = {Hkv} (k.size(2))")
    if not math.isfinite(scale):
        raise RuntimeError(f"{op}: scale must be finite, got {scale}")
    if (pk is None) != (pv is None):
        raise RuntimeError(f"{op}: pk and pv must be given together (got pk {'None' if pk is None else 'given'}, "
                           f"pv {'None' if pv is None else 'given'})")
    if pk is not None:
        _check_same_device(op, "q", q, pk=pk, pv=pv)
        torch._check(pk.dim() == 4, lambda: f"{op}: pk must have shape [Bp, K, Hkv, d], got {list(pk.shape)}")
        torch._check(tuple(pv.shape) == tuple(pk.shape),
                     lambda: f"{op}: pv must have pk's shape {list(pk.shape)}, got {list(pv.shape)}")
        for name, t in (("pk", pk), ("pv", pv)):
            torch._check(t.dtype == q.dtype, lambda: f"{op}: {name} must have q's dtype ({_dtype_name(q.dtype)}), "
                                                     f"got {_dtype_name(t.dtype)}")
        torch._check(pk.shape[0] == 1 or pk.shape[0] == B,
                     lambda: f"{op}: pk's batch dim Bp must be 1 (shared prompt) or B = {B}, got pk of shape "
                             f"{list(pk.shape)}")
        torch._check(pk.shape[2] == Hkv, lambda: f"{op}: pk must have k's number of kv heads Hkv = {Hkv} in dim 2, "
                                                 f"got pk of shape {list(pk.shape)}")
        torch._check(pk.shape[3] == d, lambda: f"{op}: pk must have q's head dim d = {d} in dim 3, got pk of shape "
                                               f"{list(pk.shape)}")
    if gate is not None:
        _check_same_device(op, "q", q, gate=gate)
        torch._check(gate.dim() == 1 and gate.shape[0] == H,
                     lambda: f"{op}: gate must have shape [{H}] (one value per query head), got {list(gate.shape)}")
        _check_dtype_in(op, "gate", gate, (torch.float32, torch.float64, torch.bfloat16, torch.float16))
    elif pk is not None:
        raise RuntimeError(f"{op}: gate must be given when pk/pv are given")
    if kv_start is not None:
        _check_same_device(op, "q", q, kv_start=kv_start)
        torch._check(tuple(kv_start.shape) in ((B,), (B, Tq)),
                     lambda: f"{op}: kv_start must have shape [{B}] (one start index per batch row: left padding) or "
                             f"[{B}, {Tq}] (one per query: packed sequences), got {list(kv_start.shape)}")
        _check_dtype_in(op, "kv_start", kv_start, (torch.int64, torch.int32))


def _gated_prompt_attention_fake(q, k, v, pk, pv, gate, kv_start, causal, gate_act, scale):
    check_gated_prompt_attention_inputs(q, k, v, pk, pv, gate, kv_start, gate_act, scale)
    B, Tq, H, _ = q.shape
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape), q.new_empty((B, H, Tq), dtype=stat), q.new_empty((B, H, Tq), dtype=stat))


def _gated_prompt_attention_backward_fake(grad_out, q, k, v, pk, pv, gate, kv_start, out, lse, prompt_lse, causal,
                                          gate_act, scale):
    op = "lladapter::gated_prompt_attention_backward"
    check_gated_prompt_attention_inputs(q, k, v, pk, pv, gate, kv_start, gate_act, scale, op=op)
    _check_same_device(op, "q", q, grad_out=grad_out, out=out, lse=lse, prompt_lse=prompt_lse)
    cf = torch.contiguous_format
    dpk = pk.new_empty(pk.shape) if pk is not None else q.new_empty((0,))
    dpv = pv.new_empty(pv.shape) if pv is not None else q.new_empty((0,))
    dgate = gate.new_empty(gate.shape) if gate is not None else q.new_empty((0,), dtype=torch.float32)
    return (torch.empty_like(q, memory_format=cf), torch.empty_like(k, memory_format=cf),
            torch.empty_like(v, memory_format=cf), dpk, dpv, dgate)


def _gated_prompt_attention_setup_context(ctx, inputs, output, lib):
    ctx.lib = lib
    q, k, v, pk, pv, gate, kv_start, causal, gate_act, scale = inputs
    out, lse, prompt_lse = output
    ctx.save_for_backward(q, k, v, pk, pv, gate, kv_start, out, lse, prompt_lse)
    ctx.causal, ctx.gate_act, ctx.scale = causal, gate_act, scale
    ctx.mark_non_differentiable(lse, prompt_lse)


def _gated_prompt_attention_backward(ctx, grad_out, _grad_lse, _grad_prompt_lse):
    q, k, v, pk, pv, gate, kv_start, out, lse, prompt_lse = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 10
    dq, dk, dv, dpk, dpv, dgate = ctx.lib.gated_prompt_attention_backward(
        grad_out, q, k, v, pk, pv, gate, kv_start, out, lse, prompt_lse, ctx.causal, ctx.gate_act, ctx.scale)
    n = ctx.needs_input_grad
    return (dq if n[0] else None, dk if n[1] else None, dv if n[2] else None,
            dpk if pk is not None and n[3] else None, dpv if pv is not None and n[4] else None,
            dgate if gate is not None and n[5] else None, None, None, None, None)


# --------------------------------------------------------------------------------------------- quantized matmul
def quantized_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Weight-only quantized matmul: y [..., N] = x [..., K] @ W^T, W dequantised on the fly (never materialised).

    The format follows from codes' dtype, as quantize.QuantizedLinear stores it:
    - int8: codes int8 [N, K], w[n, k] = codes[n, k] * s with scales [N] (one per output row) or [N, K / g] (one
      per block of g inputs: GGUF Q8_0, g = 32);
    - int4: codes uint8 [N, K / 2], two codes in [0, 15] per byte in quantize.pack_int4's layout (N a multiple of
      16), scales [G, N, 2] = (scale, low) per group of K / G inputs, w[n, k] = q * scale + low.
    scales in fp32, fp16 or bf16. x in fp32/bf16/fp16 (and fp64 on the CPU kernels, summed in fp64: the gradcheck
    path); products summed in fp32; y in x's dtype. Meant for few rows (decode): the kernels stream the codes once
    per small tile of rows (reference.quantized_linear is the oracle). Differentiable in x: dx = dy W with W
    dequantised (quantize.dequantize); codes and scales get no gradient.
    """
    lead = x.shape[:-1]
    y = _call("quantized_linear", x.reshape(-1, x.shape[-1]), codes, scales)
    return y.view(*lead, y.shape[-1])


def quantized_linear_cpu_isa(isa: str = "") -> str:
    """The path of quantized_linear's CPU kernel: "avx512" (16 fp32 lanes, taken at run time when the CPU has
    AVX-512 F/BW/VL/DQ), "avx2" (8 lanes; when the extension was built for AVX2) or "scalar" (plain loops).

    isa "" only asks which path runs. A name forces that path in this process (tests and benchmarks use it; a
    RuntimeError says why when this build or CPU cannot run it); "auto" returns to the default: the environment
    variable LLADAPTER_QUANTIZED_LINEAR_ISA (avx512, avx2, scalar or auto; read once, at the first call; another value
    is an error naming the variable), else the best path the CPU has. Returns the path in use before the call. All
    paths sum fp32 products in fp32 and differ only in the order of the additions (docs/quantization.md)."""
    return torch.ops.lladapter.quantized_linear_cpu_isa(isa)


def _check_quantized_scales(op: str, codes, scales, N: int, K: int) -> None:
    """The scales' shape for codes of a weight [N, K] (and int4's 16-row blocks), as csrc/quantized_linear.h's
    check_quantized_scales words it: shared by quantized_linear's and dequantize_rows' fake checks."""
    if codes.dtype == torch.int8:
        if scales.dim() == 1:
            torch._check(scales.shape[0] == N, lambda: f"{op}: scales (int8, one per row) must have shape [{N}] "
                                                       f"(codes.size(0)), got {list(scales.shape)}")
        else:
            torch._check(scales.dim() == 2 and scales.shape[0] == N and scales.shape[1] > 0
                         and K % scales.shape[1] == 0,
                         lambda: f"{op}: scales (int8) must have shape [{N}] (one per row) or [{N}, K / g] with g "
                                 f"inputs per block dividing K = {K}, got {list(scales.shape)}")
    else:
        torch._check(N % 16 == 0, lambda: f"{op}: codes (int4) must have a multiple of 16 rows (the packed layout's "
                                          f"blocks), got {list(codes.shape)}")
        torch._check(scales.dim() == 3 and scales.shape[1] == N and scales.shape[2] == 2 and scales.shape[0] > 0
                     and K % scales.shape[0] == 0,
                     lambda: f"{op}: scales (int4) must have shape [G, {N}, 2] (scale and low of each of G groups, G "
                             f"dividing K = {K}), got {list(scales.shape)}")


def check_quantized_linear_inputs(x, codes, scales, *, cuda_kernels: bool = False) -> None:
    """The kernels' argument checks (csrc/quantized_linear.h) with the same messages, for the fake implementation."""
    op = "lladapter::quantized_linear"
    _check_same_device(op, "x", x, codes=codes, scales=scales)
    _check_dtype_in(op, "x", x, _CUDA_FLOAT_DTYPES if cuda_kernels else _CPU_FLOAT_DTYPES)
    torch._check(x.dim() == 2, lambda: f"{op}: x must have shape [M, K], got {list(x.shape)}")
    _check_dtype_in(op, "codes", codes, (torch.int8, torch.uint8))
    _check_dtype_in(op, "scales", scales, (torch.float32, torch.float16, torch.bfloat16))
    torch._check(codes.dim() == 2, lambda: f"{op}: codes must have shape [N, K] (int8) or [N, K / 2] (int4, packed), "
                                           f"got {list(codes.shape)}")
    K, N = x.shape[1], codes.shape[0]
    torch._check(K > 0, lambda: f"{op}: x's input dimension K (x.size(1)) must be positive, got x of shape "
                                f"{list(x.shape)}")
    if codes.dtype == torch.int8:
        torch._check(codes.shape[1] == K, lambda: f"{op}: codes (int8) must have shape [N, {K}] (K = x.size(1)), "
                                                  f"got {list(codes.shape)}")
    else:
        torch._check(codes.shape[1] * 2 == K, lambda: f"{op}: codes (int4, two per byte) must have shape "
                                                      f"[N, {K // 2}] (K / 2, K = x.size(1) even), got "
                                                      f"{list(codes.shape)} for K = {K}")
    _check_quantized_scales(op, codes, scales, N, K)


def _quantized_linear_fake(x, codes, scales):
    check_quantized_linear_inputs(x, codes, scales)
    return x.new_empty((x.shape[0], codes.shape[0]))


def _quantized_linear_setup_context(ctx, inputs, output, lib):
    x, codes, scales = inputs
    ctx.save_for_backward(codes, scales)
    ctx.x_dtype = x.dtype


def _quantized_linear_backward(ctx, grad_y):
    codes, scales = ctx.saved_tensors
    if grad_y is None or not ctx.needs_input_grad[0]:
        return None, None, None
    from .quantize import dequantize  # (quantize imports this module)

    acc = torch.float64 if ctx.x_dtype == torch.float64 else torch.float32
    grad_x = grad_y.to(acc) @ dequantize(codes, scales, acc)
    return grad_x.to(ctx.x_dtype), None, None


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, row_start: int, row_end: int,
                    out: torch.Tensor) -> torch.Tensor:
    """Rows [row_start, row_end) of the weight W that quantized_linear multiplies by, written into out
    [row_end - row_start, K] in out's dtype, and out returned: one pass over the codes (each read once, its value
    computed in fp32 and rounded once to out's dtype), so a caller's reused buffer receives the weight as the GEMM
    wants it, with no float copy in between (quantize.QuantizedLinear's training and prefill matmuls).

    Formats as quantized_linear's (codes int8 [N, K] with scales [N] or [N, K / g]; int4 codes uint8 [N, K / 2] in
    pack_int4's layout with (scale, low) [G, N, 2]; scales fp32/fp16/bf16); K = codes.size(1) (int8) or twice it
    (int4). Values as quantize.dequantize (and reference.dequantize_rows) computes them, bit for bit: code * scale
    (int8), q * scale + low (int4; a rounded product, then a rounded sum: no FMA), in fp32 (fp64 for an fp64 out, CPU
    kernels only). out: fp32, bf16 or fp16 (fp64 on the CPU), contiguous, on codes' device. int4 ranges start and end
    on pack_int4's 32-row blocks (or end at N, after the trailing 16-row block). Not differentiable: it writes a
    frozen weight into a buffer (the codes and scales are buffers, out is written in place)."""
    _lib.dequantize_rows(codes, scales, int(row_start), int(row_end), out)
    return out


def check_dequantize_rows_inputs(codes, scales, row_start: int, row_end: int, out) -> None:
    """The kernels' argument checks (csrc/quantized_linear.h) with the same messages, for the fake implementation."""
    op = "lladapter::dequantize_rows"
    _check_same_device(op, "codes", codes, scales=scales, out=out)
    _check_dtype_in(op, "codes", codes, (torch.int8, torch.uint8))
    _check_dtype_in(op, "scales", scales, (torch.float32, torch.float16, torch.bfloat16))
    _check_dtype_in(op, "out", out, _CPU_FLOAT_DTYPES)
    torch._check(codes.dim() == 2, lambda: f"{op}: codes must have shape [N, K] (int8) or [N, K / 2] (int4, packed), "
                                           f"got {list(codes.shape)}")
    int4 = codes.dtype == torch.uint8
    N, K = codes.shape[0], codes.shape[1] * (2 if int4 else 1)
    torch._check(K > 0, lambda: f"{op}: codes must have at least one input column (K > 0), got {list(codes.shape)}")
    _check_quantized_scales(op, codes, scales, N, K)
    torch._check(0 <= row_start <= row_end <= N,
                 lambda: f"{op}: rows [row_start, row_end) must lie within the weight's {N} rows (0 <= row_start <= "
                         f"row_end <= {N}), got row_start = {row_start}, row_end = {row_end}")
    if int4:
        torch._check((row_start % 32 == 0 or row_start == N) and (row_end % 32 == 0 or row_end == N),
                     lambda: f"{op}: int4 rows [row_start, row_end) must start and end on the packed layout's 32-row "
                             f"blocks (or at N = {N}), got row_start = {row_start}, row_end = {row_end}")
    rows = row_end - row_start
    torch._check(out.dim() == 2 and out.shape[0] == rows and out.shape[1] == K,
                 lambda: f"{op}: out must have shape [{rows}, {K}] (row_end - row_start, K), got {list(out.shape)}")
    torch._check(out.is_contiguous(), lambda: f"{op}: out must be contiguous (its rows are written in place), got "
                                              f"strides {list(out.stride())}")


def _dequantize_rows_fake(codes, scales, row_start, row_end, out):
    check_dequantize_rows_inputs(codes, scales, row_start, row_end, out)


# --------------------------------------------------------------------------------------------- SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The LLaMA MLP's gated activation in one pass: y = silu(gate) * up = gate * sigmoid(gate) * up.

    gate and up: the same shape (>= 1 dim), dtype and device; fp32/bf16/fp16 (and fp64 on the CPU kernels: the
    gradcheck path). Math in fp32 (fp64 for fp64), y in the inputs' dtype (bf16/fp16 inputs are rounded once, at
    the end: eager `F.silu(gate) * up` also rounds silu(gate) to the dtype before the multiply). Any strides: a view
    whose leading dims collapse into rows with a unit last-dim stride (e.g. the two halves of a [M, 2F] projection)
    is read in place, anything else is copied; the outputs are contiguous.
    Differentiable in gate and up; the backward is one pass as well:
        dgate = grad * up * s * (1 + gate * (1 - s)),  dup = grad * gate * s,   s = sigmoid(gate).
    sigmoid is formed from exp(-|gate|), which cannot overflow, so silu stays accurate far into the negative tail
    (fp32 silu(-89) = -1.98e-37, where eager's x / (1 + exp(-x)) gives -0). Non-finite inputs give what eager gives:
    NaN propagates, silu(+inf) = +inf, silu(-inf) = NaN, and both gradients at gate = +-inf are NaN, except
    dup = grad * inf at gate = +inf; the one difference: an infinite up at fp32 gate < -88.7, where eager's silu is
    -0, gives eager NaN and the op the limit, -inf (docs/swiglu.md). reference.swiglu is the plain-PyTorch oracle.
    """
    return _call("swiglu", gate, up)


def check_swiglu_inputs(gate, up, *, op: str = "lladapter::swiglu", cuda_kernels: bool = False) -> None:
    """The kernels' argument checks (csrc/swiglu.h) with the same messages, for the fake implementations."""
    _check_same_device(op, "gate", gate, up=up)
    _check_dtype_in(op, "gate", gate, _CUDA_FLOAT_DTYPES if cuda_kernels else _CPU_FLOAT_DTYPES)
    torch._check(up.dtype == gate.dtype, lambda: f"{op}: up must have gate's dtype ({_dtype_name(gate.dtype)}), got "
                                                 f"{_dtype_name(up.dtype)}")
    torch._check(gate.dim() >= 1, lambda: f"{op}: gate must have at least 1 dimension, got a 0-d tensor")
    torch._check(up.shape == gate.shape, lambda: f"{op}: up must have gate's shape {list(gate.shape)}, got "
                                                 f"{list(up.shape)}")


def _swiglu_fake(gate, up):
    check_swiglu_inputs(gate, up)
    return gate.new_empty(gate.shape)


def _swiglu_backward_fake(grad, gate, up):
    op = "lladapter::swiglu_backward"
    check_swiglu_inputs(gate, up, op=op)
    _check_same_device(op, "gate", gate, grad=grad)
    torch._check(grad.dtype == gate.dtype, lambda: f"{op}: grad must have gate's dtype ({_dtype_name(gate.dtype)}), "
                                                   f"got {_dtype_name(grad.dtype)}")
    torch._check(grad.shape == gate.shape, lambda: f"{op}: grad must have gate's shape {list(gate.shape)}, got "
                                                   f"{list(grad.shape)}")
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _swiglu_setup_context(ctx, inputs, output, lib):
    ctx.lib = lib
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _swiglu_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    if grad is None:
        return None, None
    dgate, dup = ctx.lib.swiglu_backward(grad, gate, up)
    return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


# --------------------------------------------------------------------------------------------- registrations
def register_implementations(namespace: str) -> None:
    """Registers the fake (meta) and autograd implementations of every op of torch.ops.<namespace>: 'lladapter'
    (at import) and 'lladapter_emu' (the emulated CUDA kernels, by lladapter_ext.emulator), which share the schemas
    (csrc/schemas.h). A backward calls the backward op of the namespace its forward ran in."""
    lib = getattr(torch.ops, namespace)
    fakes = {"rms_norm": _rms_norm_fake, "rms_norm_backward": _rms_norm_backward_fake, "rope": _rope_fake,
             "rope_": _rope_inplace_fake, "gated_prompt_attention": _gated_prompt_attention_fake,
             "gated_prompt_attention_backward": _gated_prompt_attention_backward_fake,
             "quantized_linear": _quantized_linear_fake, "dequantize_rows": _dequantize_rows_fake,
             "swiglu": _swiglu_fake,
             "swiglu_backward": _swiglu_backward_fake}
    for op, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{op}", fake)
    autograd = {"rms_norm": (_rms_norm_backward, _rms_norm_setup_context),
                "rope": (_rope_backward, _rope_setup_context),
                "gated_prompt_attention": (_gated_prompt_attention_backward, _gated_prompt_attention_setup_context),
                "quantized_linear": (_quantized_linear_backward, _quantized_linear_setup_context),
                "swiglu": (_swiglu_backward, _swiglu_setup_context)}
    for op, (backward, setup_context) in autograd.items():
        torch.library.register_autograd(f"{namespace}::{op}", backward,
                                        setup_context=functools.partial(setup_context, lib=lib))
    _EAGER_AUTOGRAD[namespace] = {op: _eager_autograd_function(lib, op, backward, setup_context)
                                  for op, (backward, setup_context) in autograd.items()}


# namespace -> op -> the op's autograd.Function for eager calls (see _call)
_EAGER_AUTOGRAD: dict[str, dict[str, type[torch.autograd.Function]]] = {}


def _eager_autograd_function(lib, op: str, backward, setup_context) -> type[torch.autograd.Function]:
    """An autograd.Function running lib.<op> below its autograd kernel, with the registered autograd's
    setup_context and backward (so the two paths save the same tensors and compute the same gradients)."""
    kernel = getattr(lib, op)

    def forward(ctx, *args):
        with _BelowAutograd():
            output = kernel(*args)
        setup_context(ctx, args, output, lib)
        return output

    return type(f"{lib.name}_{op}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


register_implementations("lladapter")

# The entry points whose kernels the C++ layer loop (csrc/cpu/decode_layers.cpp) calls directly, as defined here,
# before any caller can replace them: while one is replaced (the benchmarks' reference-ops variant patches them),
# model.py keeps its Python layer loop, so that the replacement runs.
DECODE_LAYERS_ENTRY_POINTS = {"rms_norm": rms_norm, "rope": rope, "gated_prompt_attention": gated_prompt_attention,
                              "swiglu": swiglu}
