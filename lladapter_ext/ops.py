"""The Python face of the lladapter ops (torch.ops.lladapter.*): autograd and fake (meta) registrations, so
they work with autograd, torch.compile and FakeTensor tracing, and one documented function per op.

Ops whose kernels have not landed yet call lladapter_ext.reference with the same signature, so models can be
written against this module today.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference

_lib = torch.ops.lladapter


# --------------------------------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: y = weight * cast_to(x.dtype)(x / sqrt(mean(x^2) + eps)).

    Statistics in fp32 (fp64 for fp64 x); result dtype = promotion of x and weight (fp32 weight with bf16/fp16
    x gives fp32, as HF's LlamaRMSNorm does). weight: [x.size(-1)], x's dtype or fp32 for half x.
    Differentiable in x and weight.
    """
    y, _ = _lib.rms_norm(x, weight, float(eps))
    return y


@torch.library.register_fake("lladapter::rms_norm")
def _rms_norm_fake(x, weight, eps):
    torch._check(x.dim() >= 1, lambda: "lladapter::rms_norm: x must have at least 1 dimension")
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                 lambda: f"lladapter::rms_norm: weight must have shape [{x.shape[-1]}], got {list(weight.shape)}")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.new_empty(x.shape, dtype=out_dtype)
    rstd = x.new_empty(x.shape[:-1], dtype=stat_dtype)
    return y, rstd


@torch.library.register_fake("lladapter::rms_norm_backward")
def _rms_norm_backward_fake(grad_y, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        weight, memory_format=torch.contiguous_format)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        return None, None, None
    dx, dw = _lib.rms_norm_backward(grad_y, x, weight, rstd)
    return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None


torch.library.register_autograd("lladapter::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup_context)


# --------------------------------------------------------------------------------------------- RoPE
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         position_ids: Optional[torch.Tensor] = None, offset: int = 0,
         interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q [B, T, Hq, d] and k [B, T, Hk, d]; see reference.rope for the math.

    Stand-in: the reference implementation until the RoPE kernel lands.
    """
    return reference.rope(q, k, cos, sin, position_ids=position_ids, offset=offset, interleaved=interleaved)


# --------------------------------------------------------------------------------------------- attention
def gated_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           pk: Optional[torch.Tensor] = None, pv: Optional[torch.Tensor] = None,
                           gate: Optional[torch.Tensor] = None, causal: bool = True, gate_act: str = "tanh",
                           scale: Optional[float] = None, kv_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LLaMA-Adapter zero-init gated attention; see reference.gated_prompt_attention for the math.

    Stand-in: the reference implementation until the fused kernel lands.
    """
    return reference.gated_prompt_attention(q, k, v, pk, pv, gate, causal=causal, gate_act=gate_act, scale=scale,
                                            kv_start=kv_start)
