"""Plain-PyTorch references of every lladapter op: the tests' oracle, and the attention backend for head dims the
CUDA kernels are not built for. Written for clarity, not speed (attention materialises the score matrix).

Each function's docstring states what it computes (docs/gated_prompt_attention.md, docs/rope.md: the math at more
length).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "rms_norm",
    "rope_inv_freq",
    "rope_cos_sin",
    "rope",
    "gated_prompt_attention",
    "dequantize_rows",
    "dequantize_weight",
    "quantized_linear",
    "swiglu",
]


# --------------------------------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = weight * cast_to(x.dtype)(x * rsqrt(mean(x^2, -1) + eps)), statistics in fp32 (fp64 for fp64 x).

    The normalised value is cast back to x's dtype before the weight multiply, as Meta's and HF's LLaMA do;
    the result dtype is the promotion of x's and weight's dtypes.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# --------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(rotary_dim: int, base: float = 10000.0, scaling: dict | None = None,
                  device=None) -> torch.Tensor:
    """theta_i = base^(-2i/rotary_dim), i < rotary_dim/2, in fp64 then fp32; optional Llama-3.1 scaling.

    scaling (Llama-3.1 "llama3" rope_scaling): {"factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}. Wavelengths longer than original/low_freq_factor are divided by factor,
    shorter than original/high_freq_factor are kept, and the band between is interpolated smoothly.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    i = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device)
    inv = base ** (-i / rotary_dim)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "llama3"))
        if kind != "llama3":
            raise ValueError(f"unsupported rope scaling type {kind!r} (supported: 'llama3')")
        factor = float(scaling["factor"])
        lo = float(scaling.get("low_freq_factor", 1.0))
        hi = float(scaling.get("high_freq_factor", 4.0))
        orig = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        long_wl = orig / lo  # longer than this: slow frequencies, scaled fully
        short_wl = orig / hi  # shorter than this: fast frequencies, unchanged
        smooth = (orig / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > long_wl, inv / factor, torch.where(wavelen < short_wl, inv, blended))
    return inv.to(torch.float32)


def rope_cos_sin(max_positions: int, rotary_dim: int, base: float = 10000.0, scaling: dict | None = None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tables cos[p, i], sin[p, i] of angle p * theta_i, shape [max_positions, rotary_dim // 2].

    Angles are formed in fp64 so that large positions keep their precision, then rounded to fp32.
    """
    inv = rope_inv_freq(rotary_dim, base, scaling, device=device).to(torch.float64)
    pos = torch.arange(max_positions, dtype=torch.float64, device=device)
    ang = torch.outer(pos, inv)
    return ang.cos().to(torch.float32), ang.sin().to(torch.float32)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # x [B, T, H, d]; cos/sin [B, T, rd/2] fp32 (already gathered at the token positions)
    rd = cos.shape[-1] * 2
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr, xpass = x[..., :rd].to(acc), x[..., rd:]
    c = cos.to(acc).unsqueeze(2)
    s = sin.to(acc).unsqueeze(2)
    if interleaved:  # Meta: pairs (2i, 2i+1) rotate as complex numbers
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:  # HF rotate_half: pairs (i, i + rd/2)
        a, b = xr[..., : rd // 2], xr[..., rd // 2:]
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((out.to(x.dtype), xpass), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         position_ids: torch.Tensor | None = None, offset: int = 0,
         interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, Hq, d] and k [B, T, Hk, d] by angle position * theta_i (tables from rope_cos_sin).

    Positions are offset + t (KV-cache decoding: offset = cached length) or, when given, position_ids [B, T].
    Only the first rotary_dim = 2 * cos.shape[-1] features rotate; the rest pass through.
    interleaved=True is Meta's layout (pairs (2i, 2i+1)), False HF's rotate_half (pairs (i, i + rd/2)).
    Math in fp32 (fp64 for fp64 inputs), result in the input dtype.
    """
    B, T = q.shape[0], q.shape[1]
    if position_ids is None:
        pos = torch.arange(offset, offset + T, device=q.device).unsqueeze(0).expand(B, T)
    else:
        pos = position_ids.to(q.device).long()
    c, s = cos[pos], sin[pos]
    return _rope_one(q, c, s, interleaved), _rope_one(k, c, s, interleaved)


# --------------------------------------------------------------------------------------------- attention
def allowed_word_keys(B: int, Tq: int, Tk: int, causal: bool, kv_start: torch.Tensor | None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, Tq, Tk] bool: may query i of sample b see word key j (gated_prompt_attention's rule: j <= i + Tk - Tq
    when causal, j >= kv_start[b] or kv_start[b, i] when given)."""
    i = torch.arange(Tq, device=device).view(1, Tq, 1)
    j = torch.arange(Tk, device=device).view(1, 1, Tk)
    allowed = torch.ones(B, Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (j <= i + (Tk - Tq))
    if kv_start is not None:
        starts = kv_start.to(device=device, dtype=torch.long)
        allowed = allowed & (j >= (starts.view(B, 1, 1) if starts.dim() == 1 else starts.view(B, Tq, 1)))
    return allowed


def gated_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           pk: torch.Tensor | None, pv: torch.Tensor | None, gate: torch.Tensor | None,
                           causal: bool = True, gate_act: str = "tanh", scale: float | None = None,
                           kv_start: torch.Tensor | None = None) -> torch.Tensor:
    """LLaMA-Adapter attention: word branch + phi(gate) * prompt branch, two separate softmaxes.

    q [B, Tq, H, d]; k, v [B, Tk, Hkv, d]; pk, pv [Bp, K, Hkv, d] with Bp in {1, B} (or None / K = 0: plain
    attention); gate [H] (phi = tanh for gate_act="tanh", identity for "identity").
    Query head h uses kv head h // (H // Hkv). Scale defaults to 1/sqrt(d).
    Word branch: softmax over keys j allowed for query i: j <= i + (Tk - Tq) when causal, and
    j >= kv_start[b] when kv_start [B] (left padding) is given, or j >= kv_start[b, i] when kv_start [B, Tq] (one
    start per query; with causal and kv_start[b, i] = first index of the packed sequence holding token i, this is
    block-diagonal causal attention over packed sequences); a query with no allowed key gets 0 from it.
    Prompt branch: softmax over all K prompt tokens (prompts carry no RoPE and are never masked).
    Computed in fp32 (fp64 for fp64 q), returned in q's dtype.
    """
    B, Tq, H, d = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"H ({H}) must be a multiple of Hkv ({Hkv})")
    rep = H // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc).transpose(1, 2)  # [B, H, Tq, d]
    kf = k.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)
    s = (qf @ kf.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    allowed = allowed_word_keys(B, Tq, Tk, causal, kv_start, q.device).unsqueeze(1)  # [B, 1, Tq, Tk]
    # masked scores are -inf; selecting with the mask then zeroes rows that have no allowed key (their softmax is
    # NaN), keeps a NaN row (a NaN in q) off the keys it may not see, forward and backward (a product with the mask
    # would give 0 * NaN = NaN there), and leaves NaN in a row whose allowed keys all score -inf, as softmax does.
    s = s.masked_fill(~allowed, float("-inf"))
    a = torch.where(allowed, torch.softmax(s, dim=-1), 0.0)
    out = a @ vf
    if pk is not None and pk.shape[1] > 0:
        pkf = pk.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)  # [Bp, H, K, d]
        pvf = pv.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)
        b = torch.softmax((qf @ pkf.transpose(-1, -2)) * scale, dim=-1)
        g = gate.to(acc)
        if gate_act == "tanh":
            g = torch.tanh(g)
        elif gate_act != "identity":
            raise ValueError(f"gate_act must be 'tanh' or 'identity', got {gate_act!r}")
        out = out + g.view(1, H, 1, 1) * (b @ pvf)
    return out.transpose(1, 2).to(q.dtype)


# --------------------------------------------------------------------------------------------- quantized matmul
def _unpack_int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (int64) of int4 codes packed two per byte in quantize.pack_int4's layout, read element by element
    from the layout's definition (not from quantize.unpack_int4): rows in blocks of 32, each block stored input by
    input as 16 bytes, row r of the block in the low nibble of byte r (r < 16) or the high nibble of byte r - 16; a
    trailing block of 16 rows stored input by input as 8 bytes, row 2p in the low and row 2p + 1 in the high nibble
    of byte p."""
    N, K = packed.shape[0], packed.shape[1] * 2
    flat = packed.reshape(-1).long()
    n = torch.arange(N, device=packed.device)[:, None]
    k = torch.arange(K, device=packed.device)[None, :]
    full = N // 32 * 32
    r, t = n % 32, n - full
    idx = torch.where(n < full, (n // 32) * 16 * K + k * 16 + r % 16, full * K // 2 + k * 8 + t // 2)
    shift = torch.where(n < full, 4 * (r // 16), 4 * (t % 2))
    return (flat[idx.clamp(0, flat.numel() - 1)] >> shift) & 15


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight W [N, K] that quantized_linear multiplies by, in dtype (computed in fp32, fp64 for fp64):
    int8 codes [N, K]: w = code * scales[n] (scales [N]) or code * scales[n, k // g] (scales [N, K / g]);
    int4 codes uint8 [N, K / 2] (pack_int4's layout) with scales [G, N, 2]: w = q * scale + low of k's group."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = scales.to(acc)
    if codes.dtype == torch.int8:
        N, K = codes.shape
        if s.dim() == 1:
            return (codes.to(acc) * s[:, None]).to(dtype)
        return (codes.to(acc) * s.repeat_interleave(K // s.shape[1], dim=1)).to(dtype)
    q = _unpack_int4_codes(codes).to(acc)
    g = q.shape[1] // s.shape[0]
    scale = s[..., 0].t().repeat_interleave(g, dim=1)
    low = s[..., 1].t().repeat_interleave(g, dim=1)
    return (q * scale + low).to(dtype)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, row_start: int, row_end: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [row_start, row_end) of dequantize_weight(codes, scales, dtype): what the op dequantize_rows writes into
    its out (in out's dtype)."""
    return dequantize_weight(codes, scales, dtype)[row_start:row_end]


def quantized_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = x W^T with W = dequantize_weight(codes, scales), in fp32 (fp64 for fp64 x), cast to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc) @ dequantize_weight(codes, scales, acc).t()).to(x.dtype)


# --------------------------------------------------------------------------------------------- SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) * up, computed in fp32 (fp64 for fp64) with torch.nn.functional.silu and cast to gate's dtype
    (one rounding for bf16/fp16, as the kernels do). Gradients: autograd through the same expression."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (torch.nn.functional.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)
