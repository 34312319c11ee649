"""A quantized frozen base: weight-only int8 / int4 storage for the base model's linear layers.

The base never trains, so it needs no full-precision master weights: `QuantizedLinear` keeps a layer's weight as
integer codes plus scales, and the loaders (weights._fill_model) quantize each weight as it is read, so no
full-precision copy of the base stays alive. Norms, embeddings (and a tied LM head), an untied LM head and the
adapter stay in the model dtype.

Formats (`FORMATS`):
  int8  symmetric codes in [-127, 127] with one fp32 scale per output row (quantized from floats) or an fp16
        one per block of 32 inputs (a GGUF Q8_0 tensor, mapped exactly).
  int4  asymmetric codes in [0, 15] with an fp16 scale and low value per group of 64 inputs (32 where the width
        is not a multiple of 64): w = q * scale + low, 4.5 bits per weight; GGUF Q4_1 and Q4_0 tensors map
        exactly (groups of 32, scale d and low m, or d and -8 d: 5 bits), others are requantised from fp32. The codes
        are packed two per byte in the layout of torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) on AVX2
        CPUs, which ops.quantized_linear reads as well; `pack_int4` / `unpack_int4` write and read that layout in
        plain torch. torch packs differently where it has AVX-512 kernels (packed_int4_kernel_ok() checks, once per
        process), so DECODE_KERNEL = "torch" only takes its int4 kernel where the layouts agree.

Kernels: for the few rows of a decode step, our weight-only matmul ops.quantized_linear, which reads these buffers
as they are stored, every format included (GGUF Q8_0's per-block scales too), the codes turned into fp32 in registers
as they stream by: on the CPU (csrc/cpu/quantized_linear.cpp: AVX-512 where the CPU has it, else AVX2) up to
KERNEL_MAX_ROWS_BY_FORMAT rows (KERNEL_MAX_ROWS_AVX512 on the AVX-512 path), on CUDA (csrc/cuda/quantized_linear.cu;
so far run only under the emulator, never on a GPU) up to CUDA_KERNEL_MAX_ROWS_BY_FORMAT rows. Otherwise (more rows:
prefill, training, batched decode) the weight is dequantized on the fly, one layer at a time, by ops.dequantize_rows
(one pass over the codes, written straight in the activations' dtype into a reused per-thread buffer), and multiplied
by the dense GEMM (nn.linear / nn.mm: nn.gemm_route's for fp32 CPU rows). _decode_kernel_for chooses; while the
emulated CUDA kernels are active (lladapter_ext.emulator.kernels()) it chooses for CPU tensors as it does on CUDA,
so the emulator runs the GPU's route. Measured on the CPU (docs/quantization.md): one row of a 5632 x 2048 weight
from DRAM in 0.66 ms (int4) / 1.03 ms (int8) on the AVX-512 path (AVX2: 1.14 / 1.89 ms) where the bf16 GEMV takes
1.82 ms, and torch's packed kernels (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu: DECODE_KERNEL =
"torch", the rule used before ours) 17-30 ms; torchao 0.18's int8 weight-only layer took 84 ms and bitsandbytes' CPU
nf4 94 ms for the 49152 x 576 head, where fp32 takes 11 ms.

Training: `QuantizedLinear`'s matmul is an autograd Function whose backward is dX = dY W with W dequantized on the fly;
the codes get no gradient (they are buffers).
"""
from __future__ import annotations

import dataclasses
import threading

import torch

from . import ops
from .nn import linear, mm

FORMATS = ("int8", "int4")
INT4_GROUP_SIZE = 32  # GGUF's block size: Q4_0 and Q4_1 map onto it exactly; torch's CPU kernel takes 32, 64, 128, 256


class QuantizationError(ValueError):
    """A quantization the platform or the layer cannot take (format, device, layer width)."""


def check_format(fmt: str | None) -> str | None:
    """None/"none" -> None; a name in FORMATS -> itself; anything else -> QuantizationError naming it."""
    if fmt is None or fmt == "none":
        return None
    if fmt not in FORMATS:
        hint = " (nf4 is not offered: int4 with per-32 scales and offsets is the 4-bit format)" \
            if str(fmt).lower() == "nf4" else ""
        raise QuantizationError(f"quantize={fmt!r}: unknown format; expected none, {', '.join(FORMATS)}{hint}")
    return fmt


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a load stores the frozen base: every attention and MLP projection in `format` ("int8" or "int4"), and with
    `head` an untied LM head too. Made once from the user's arguments (Quantization.of: load_model's quantize= and
    quantize_head=, the CLI's --quantize and --quantize-head) and passed down as one value; None is a float base."""

    format: str
    head: bool = False

    def __post_init__(self):
        if check_format(self.format) is None:
            raise QuantizationError(f"Quantization: format {self.format!r} is no quantization; use None instead")

    @classmethod
    def of(cls, quantize: str | Quantization | None, quantize_head: bool = False) -> Quantization | None:
        """The user's quantize (None/"none", "int8", "int4", or a Quantization already) and quantize_head -> the
        value, or None for a float base. An unknown format is a QuantizationError naming it; quantize_head without a
        format a ValueError."""
        if isinstance(quantize, Quantization):
            return dataclasses.replace(quantize, head=True) if quantize_head else quantize
        fmt = check_format(quantize)
        if fmt is None:
            if quantize_head:
                raise ValueError("quantize_head=True needs a quantize format (int8 or int4)")
            return None
        return cls(fmt, bool(quantize_head))

    def quantizes(self, name: str) -> bool:
        """Whether the base parameter `name` is stored quantized (is_quantizable, the head as `head` says)."""
        return is_quantizable(name, self.head)


# ----------------------------------------------------------------------------------------------- int8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes int8 [N, K] in [-127, 127], scales fp32 [N]); w ~= codes * scales[:, None]."""
    w = w.float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: codes 0, any scale
    codes = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def _dequant_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes int8 [N, K] and scales ([N] or per block [N, K / g]) -> weight [N, K] in dtype (computed in fp32; fp64
    for fp64)."""
    N, K = codes.shape
    acc = _dequant_dtype(dtype)
    if scales.dim() == 1:
        return (codes.to(acc) * scales.to(acc)[:, None]).to(dtype)
    g = K // scales.shape[1]
    return (codes.view(N, -1, g).to(acc) * scales.to(acc)[:, :, None]).view(N, K).to(dtype)


# ----------------------------------------------------------------------------------------------- int4
def int4_group_size(in_features: int) -> int:
    """Inputs per int4 group when quantizing from floats: 64 (4.5 bits per weight with fp16 scale and low), else
    32 where the width is not a multiple of 64. GGUF Q4_0 and Q4_1 tensors keep their 32."""
    return 64 if in_features % 64 == 0 else INT4_GROUP_SIZE


def quantize_int4(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes uint8 [N, K] in [0, 15], scale_low fp16 [K / g, N, 2]) with
    w ~= codes * scale + low per group of g inputs (default int4_group_size(K))."""
    N, K = w.shape
    g = group_size or int4_group_size(K)
    wg = w.float().reshape(N, K // g, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).half().float()  # the fp16 values that are stored: codes are computed against them
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: codes 0, value lo
    lo = lo.half().float()
    codes = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return codes, _scale_low(scale, lo)


def _scale_low(scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Per-group scale and low value [N, G] -> the stored fp16 [G, N, 2]; refuses values fp16 cannot hold."""
    out = torch.stack([scale, low], dim=-1).transpose(0, 1).contiguous().half()
    if not torch.isfinite(out).all():
        raise QuantizationError("int4: a weight group's range does not fit fp16 scales (|w| > 65504)")
    return out


def kernel_scales_and_zeros(scale_low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored (scale, low) [G, N, 2] -> torch's int4 kernels' (scale, zero = low + 8 * scale) in dtype, for
    w = (q - 8) * scale + zero."""
    s = scale_low.float()
    return torch.stack([s[..., 0], s[..., 1] + 8.0 * s[..., 0]], dim=-1).to(dtype)


def dequantize_int4(codes: torch.Tensor, scale_low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes uint8 [N, K] (unpacked) -> weight [N, K] in dtype (computed in fp32; fp64 for fp64)."""
    N, K = codes.shape
    G = scale_low.shape[0]
    acc = _dequant_dtype(dtype)
    sl = scale_low.to(acc).transpose(0, 1)  # [N, G, 2]
    w = codes.view(N, G, K // G).to(acc) * sl[..., :1] + sl[..., 1:]
    return w.view(N, K).to(dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in dtype of codes as QuantizedLinear stores them: int8 [N, K] (dequantize_int8) or int4
    packed uint8 [N, K / 2] (pack_int4's layout, dequantize_int4)."""
    if codes.dtype == torch.int8:
        return dequantize_int8(codes, scales, dtype)
    return dequantize_int4(unpack_int4(codes), scales, dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in [0, 15] (N a multiple of 16, K even) -> uint8 [N, K / 2] in the layout of torch's CPU int4
    kernel: rows in blocks of 32, each block stored input by input (16 bytes per input: row i in the low nibble,
    row 16 + i in the high one); a last block of 16 rows pairs even rows (low) with odd rows (high)."""
    N, K = codes.shape
    c = codes.to(torch.uint8)
    full = N // 32 * 32
    parts = []
    if full:
        b = c[:full].view(full // 32, 2, 16, K)  # [block, half, row, k]
        parts.append(((b[:, 1] << 4) | b[:, 0]).transpose(1, 2).reshape(-1))  # [block, k, row]
    if N > full:  # one block of 16 rows
        b = c[full:].view(8, 2, K)  # [pair, even/odd, k]
        parts.append(((b[:, 1] << 4) | b[:, 0]).t().reshape(-1))  # [k, pair]
    return torch.cat(parts).view(N, K // 2) if len(parts) > 1 else parts[0].view(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, K / 2] -> codes uint8 [N, K]."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    _unpack_int4_into(packed, out)
    return out


def _unpack_int4_into(packed: torch.Tensor, out: torch.Tensor) -> None:
    """The codes of pack_int4's layout written straight into out [N, K] (uint8, or a float dtype, converted as they are
    copied). The layer's matmuls do not use it: ops.dequantize_rows reads the packed codes itself."""
    N, K = out.shape
    flat = packed.reshape(-1)
    full = N // 32 * 32
    if full:
        b = flat[:full * K // 2].view(full // 32, K, 16)  # [block, k, row]
        o = out[:full].view(full // 32, 2, 16, K)  # [block, half, row, k]
        o[:, 0].copy_((b & 15).transpose(1, 2))
        o[:, 1].copy_((b >> 4).transpose(1, 2))
    if N > full:
        b = flat[full * K // 2:].view(K, 8)  # [k, pair]
        o = out[full:].view(8, 2, K)  # [pair, even/odd, k]
        o[:, 0].copy_((b & 15).t())
        o[:, 1].copy_((b >> 4).t())


_packed_layout_lock = threading.Lock()
_packed_layout_ok: bool | None = None


def packed_int4_kernel_ok() -> bool:
    """Whether this torch's CPU int4 kernel exists and packs as pack_int4 does (checked once, on 48 x 64 codes:
    a 32-row block and a 16-row one). If not, int4 layers take the dequantize path, which reads our layout."""
    global _packed_layout_ok
    with _packed_layout_lock:
        if _packed_layout_ok is None:
            try:
                g = torch.Generator().manual_seed(0)
                codes = torch.randint(0, 16, (48, 64), generator=g, dtype=torch.int32)
                theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                _packed_layout_ok = bool(torch.equal(theirs, pack_int4(codes)))
            except (AttributeError, RuntimeError):
                _packed_layout_ok = False
        return _packed_layout_ok


# ----------------------------------------------------------------------------------------------- GGUF blocks
def _block_fp16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 number at byte offset ``at`` of every GGUF block (blocks [N, K / 32, block bytes]), as fp32."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16).squeeze(-1).float()


def _block_nibbles(qs: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Codes [N, K] of the 16 nibble bytes of every block (Q4_0 and Q4_1 alike: weight j of a block in the low
    nibble of byte j, weight 16 + j in the high one)."""
    return torch.cat([qs & 15, qs >> 4], dim=-1).reshape(N, K)


def from_gguf_q4_1(raw: torch.Tensor, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q4_1 tensor's bytes (N rows of K / 32 blocks: fp16 d, fp16 m, 16 bytes of nibbles; weight j of a
    block in the low nibble of byte j, weight 16 + j in the high one; w = d * q + m) -> int4 (codes, sz), exact."""
    b = raw.reshape(N, K // 32, 20)
    return _block_nibbles(b[..., 4:20], N, K), _scale_low(_block_fp16(b, 0), _block_fp16(b, 2))


def from_gguf_q4_0(raw: torch.Tensor, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q4_0 tensor's bytes (N rows of K / 32 blocks: fp16 d, 16 bytes of nibbles laid out as Q4_1's;
    w = d * (q - 8)) -> int4 (codes, sz) with scale d and low -8 d, exact (both fp16 numbers, and fp32 gives
    d * q - 8 d = d * (q - 8) without rounding)."""
    b = raw.reshape(N, K // 32, 18)
    d = _block_fp16(b, 0)
    return _block_nibbles(b[..., 2:18], N, K), _scale_low(d, -8.0 * d)


def from_gguf_q8_0(raw: torch.Tensor, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q8_0 tensor's bytes (N rows of K / 32 blocks: fp16 d, 32 int8; w = d * q) -> int8 (codes, per-block
    scales [N, K / 32]), exact."""
    b = raw.reshape(N, K // 32, 34)
    d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    codes = b[..., 2:34].contiguous().view(torch.int8).reshape(N, K)
    return codes, d


# ----------------------------------------------------------------------------------------------- the layer
class QuantizedLinear(torch.nn.Module):
    """A frozen bias-free linear layer y = x W^T with W stored as int8 or int4 codes (see the module docstring).

    Buffers: `codes` (int8 [N, K]; int4: uint8 [N, K / 2], packed) and `scales` (int8: fp32 [N], or fp16
    [N, K / 32] from GGUF Q8_0; int4: fp16 [K / g, N, 2], each group's scale and low value). Activations keep
    their dtype (the model's: `compute_dtype`).
    """

    def __init__(self, fmt: str, codes: torch.Tensor, scales: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__()
        self.format = fmt
        self.out_features = codes.shape[0]
        self.in_features = codes.shape[1] * (2 if fmt == "int4" else 1)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        # a zero-size tensor in the model dtype: follows .to(dtype) with the rest of the model
        self.register_buffer("_dtype_marker", torch.empty(0, dtype=compute_dtype, device=codes.device),
                             persistent=False)
        # the most weight elements dequantised at once (None: the whole weight). A quantized LM head gets the
        # largest projection's size (limit_head_scratch): dequantised whole, it would grow every thread's scratch
        # buffer to the float head it replaced
        self.max_dequant_elems: int | None = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, fmt: str, compute_dtype: torch.dtype, device=None,
                   name: str = "weight") -> QuantizedLinear:
        """Quantize a float weight [N, K] (on its own device; the result goes to `device`)."""
        check_layer_shape(fmt, weight.shape, name)
        if fmt == "int8":
            codes, scales = quantize_int8(weight)
        else:
            c, scales = quantize_int4(weight)
            codes = pack_int4(c)
        return cls(fmt, codes.to(device or weight.device), scales.to(device or weight.device), compute_dtype)

    @classmethod
    def from_codes(cls, fmt: str, codes: torch.Tensor, scales: torch.Tensor, compute_dtype: torch.dtype,
                   device=None, name: str = "weight") -> QuantizedLinear:
        """From unpacked codes (int8 [N, K] or int4 uint8 [N, K]) and their scales, e.g. a GGUF tensor's."""
        check_layer_shape(fmt, codes.shape, name)
        if fmt == "int4":
            codes = pack_int4(codes)
        return cls(fmt, codes.to(device or codes.device), scales.to(device or codes.device), compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._dtype_marker.dtype

    @property
    def group_size(self) -> int:
        """Inputs per scale (int8 with one scale per row: in_features)."""
        return self.in_features if self.scales.dim() == 1 else self.in_features // self.scales.shape[
            0 if self.format == "int4" else 1]

    @property
    def weight_nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [N, K] in dtype (default compute_dtype): a new tensor."""
        return dequantize(self.codes, self.scales, dtype or self.compute_dtype)

    def _row_blocks(self) -> list[tuple[int, int]]:
        """Output-row ranges dequantised one at a time: multiples of 32 rows (int4's packed blocks) within
        max_dequant_elems, or the whole weight."""
        N, K = self.out_features, self.in_features
        if self.max_dequant_elems is None or N * K <= self.max_dequant_elems:
            return [(0, N)]
        rows = max(32, self.max_dequant_elems // K // 32 * 32)
        return [(n0, min(n0 + rows, N)) for n0 in range(0, N, rows)]

    def _dequantized_for_matmul(self, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The weight (rows [n0, n1) of it) in dtype, written by ops.dequantize_rows (one pass over the codes, straight
        in dtype) into this thread's scratch buffer for that dtype: valid until the next call on this thread (a
        matmul consumes it at once). A fresh allocation of a LLaMA-7B MLP weight (180 MB) costs about as much in page
        faults as the conversion itself. fp64 (which the kernels' CUDA build does not write) is written in fp32 and
        converted, as quantize.dequantize's fp32 math would give it."""
        n0, n1 = rows if rows is not None else (0, self.out_features)
        N, K = n1 - n0, self.in_features
        out_dtype = dtype if dtype in _KERNEL_DTYPES else torch.float32
        buf = _scratch(N * K, out_dtype, self.codes.device)[:N * K].view(N, K)
        ops.dequantize_rows(self.codes, self.scales, n0, n1, buf)
        return buf if out_dtype == dtype else buf.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear: input has {x.shape[-1]} features, the layer takes "
                             f"{self.in_features}")
        return _QuantizedMatmul.apply(x, self.codes, self.scales, self)

    def _kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor | None:
        """x2 [M, K] @ W^T straight from the codes, where that beats dequantize + GEMM (_decode_kernel_for), else
        None: ops.quantized_linear (our CPU or CUDA kernel), or torch's packed CPU kernels with
        DECODE_KERNEL = "torch"."""
        kernel = _decode_kernel_for(self.format, x2, self.out_features * self.in_features)
        if kernel is None:
            return None
        if kernel == "lladapter":
            return ops.quantized_linear(x2, self.codes, self.scales)
        x2 = x2.contiguous()
        if self.format == "int8":
            if self.scales.dim() != 1:  # per-block scales (GGUF Q8_0): the kernel takes one scale per row
                return None
            return torch._weight_int8pack_mm(x2, self.codes, self.scales.to(x2.dtype))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.codes, self.group_size,
                                                          kernel_scales_and_zeros(self.scales, x2.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


# The training GEMMs dequantise the whole weight (ops.dequantize_rows into the per-thread buffer), then run one GEMM;
# cache-sized row blocks (dequantise R rows into a small buffer, multiply that block, next) were measured and lose at
# SmolLM2's shapes (bf16, M = 512 rows, 2 threads, interleaved median of 15; the whole bf16 weight is <= 1.8 MB there,
# L2-sized anyway): 1536 x 576 int4 forward whole 1.33 ms (the dense bf16 GEMM alone 1.09), blocks of 512 / 256 / 128
# / 64 rows 1.31 / 1.46 / 1.85 / 2.47 ms; dX whole 1.34 ms, blocks 1.59 / 1.69 / 2.17 / 3.11 ms; the other
# projections and int8 alike (each small AMX GEMM pays a fixed cost). At TinyLlama's 5632 x 2048 (23 MB in bf16; 1
# thread on a busy machine) blocks of 512 rows took the forward from 43.5 to 37.3 ms and dX from 38.3 to 35.9 ms, but
# tied at 2048 x 5632 (19.1 / 19.1-19.5 ms), and a blocked dX adds bf16 partial sums (one rounding per block): not
# taken, to be measured again on a quiet machine before large weights take blocks.
class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T with W from a QuantizedLinear; backward dX = dY W (W dequantized on the fly), no weight grad."""

    @staticmethod
    def forward(ctx, x, codes, scales, layer):
        ctx.layer = layer
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = layer._kernel_matmul(x2)
        if y is None:
            blocks = layer._row_blocks()
            if len(blocks) == 1:
                y = linear(x2, layer._dequantized_for_matmul(x.dtype))  # (fp32 CPU rows: nn.gemm_route's GEMM)
            else:
                y = x2.new_empty(x2.shape[0], layer.out_features)
                for n0, n1 in blocks:
                    y[:, n0:n1] = linear(x2, layer._dequantized_for_matmul(x.dtype, (n0, n1)))
        return y.view(*lead, layer.out_features)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            layer = ctx.layer
            g2 = grad_out.reshape(-1, layer.out_features)
            for n0, n1 in layer._row_blocks():
                part = mm(g2[:, n0:n1], layer._dequantized_for_matmul(grad_out.dtype, (n0, n1)))
                grad_x = part if grad_x is None else grad_x.add_(part)
            grad_x = grad_x.view(*grad_out.shape[:-1], layer.in_features)
        return grad_x, None, None, None


_scratch_buffers = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer of at least numel elements (grown on demand: it ends at the largest layer's size)."""
    bufs = getattr(_scratch_buffers, "by_key", None)
    if bufs is None:
        bufs = _scratch_buffers.by_key = {}
    key = (dtype, device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


# Which kernel multiplies the few rows of a decode step straight from the codes: "lladapter" (ours,
# ops.quantized_linear: csrc/cpu/quantized_linear.cpp on the CPU, csrc/cuda/quantized_linear.cu on CUDA), "torch"
# (aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu, by the rule measured before ours existed; CPU only: on CUDA
# it means dequantize + GEMM) or "none" (always dequantize + GEMM, on every device). A knob for benchmarks
# (benchmarks/bench_quant.py: --decode-ab, and the CUDA decode's A/B) and for CPUs where torch's AVX-512 kernels may
# win.
DECODE_KERNEL = "lladapter"
# Our kernel's row limit per format: it reads the codes once per tile of 1-4 (int8) or 1-2 (int4) rows, so its time
# grows with the rows, while dequantize + GEMM pays the dequantisation once. Measured crossover (one matmul, 1 thread,
# interleaved; docs/quantization.md): int8 ties dequantize + GEMM at 16 rows of a 1536 x 576 weight and loses at 32;
# int4 still wins by 1.5-2x at 32 rows of every model shape.
KERNEL_MAX_ROWS_BY_FORMAT = {"int8": 16, "int4": 32}
# The same on the kernel's AVX-512 path (tiles of up to 8 (int8) / 4 (int4) rows; measured on the Xeon of
# docs/quantization.md, fp32 and bf16 activations): int8 is 1.5-5x faster than dequantize + GEMM at 16 rows, 0.9-2.2x
# at 24 and 0.7-1.6x at 32, so it keeps 16; int4 is still 1.4-3x faster at 64 rows of every model shape.
KERNEL_MAX_ROWS_AVX512 = {"int8": 16, "int4": 64}
# The same for bf16 activations where the CPU has AMX (bf16 tiles: oneDNN's bf16 GEMM runs at several times the fp32
# rate, so dequantize + GEMM catches up sooner), since the one-pass ops.dequantize_rows. Measured on the Xeon of
# docs/quantization.md (Emerald Rapids, 2 threads, one matmul, median of 15; kernel time / dequantize + GEMM time at
# 5632 x 2048, 2048 x 5632, 2048 x 2048, 1536 x 576, 576 x 1536): int8 0.42-0.54 at 4 rows, 0.74-1.07 at 8, 1.37-1.77
# at 16; int4 0.24-0.30 at 4, 0.47-0.53 at 8, 0.91-1.04 at 16, 1.51-1.71 at 32. (fp32 activations on the same run:
# int8 0.66-0.89 at 16, 1.02-1.66 at 32; int4 0.70-0.85 at 32, 0.95-1.16 at 64: KERNEL_MAX_ROWS_AVX512 holds.)
KERNEL_MAX_ROWS_AMX_BF16 = {"int8": 8, "int4": 16}
# The CUDA kernel's row limit per format. Both of its kernels take the rows of x in chunks of 4 (kRowsChunk) per pass
# over the codes: int8 runs a warp per output row, which re-reads that row's codes for every chunk; int4 a block per
# 32-row block of codes, likewise. So up to 4 rows it reads the weights exactly once, as a GEMV must, and every 4 rows
# more read them again, on CUDA cores (no tensor cores), while dequantize + GEMM reads the codes once, writes and reads
# back a float copy (>= 9 bytes per weight) and runs the dense GEMM (cuBLAS), whose time hardly grows with a few rows.
# Not yet timed on a GPU (only run by the emulator): 4 is the conservative limit, one pass over the weights (batch-1
# to batch-4 decode). bench_quant.py's CUDA decode times both routes; raise it where a GPU says so.
CUDA_KERNEL_MAX_ROWS_BY_FORMAT = {"int8": 4, "int4": 4}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _decode_kernel_for(fmt: str, x2: torch.Tensor, weight_numel: int) -> str | None:
    """The kernel for this call (DECODE_KERNEL), or None for dequantize + GEMM. Only for fp32/bf16/fp16 activations
    and few rows, by device:
    - on the CUDA kernels (a CUDA tensor, or a CPU tensor while the emulated CUDA kernels are active:
      ops.runs_cuda_kernels, the rule the attention ops route by, so that the emulator takes the GPU's route): ours
      for 1..CUDA_KERNEL_MAX_ROWS_BY_FORMAT rows with DECODE_KERNEL = "lladapter"; "torch" names torch's CPU
      kernels, so on CUDA it dequantizes, as "none" does;
    - on the CPU: ours for 1..KERNEL_MAX_ROWS_BY_FORMAT rows (on its AVX-512 path KERNEL_MAX_ROWS_AVX512, or
      KERNEL_MAX_ROWS_AMX_BF16 for bf16 activations on a CPU with AMX), or torch's packed kernels
      (_use_packed_kernel);
    - elsewhere (meta, other devices): None."""
    if x2.dtype not in _KERNEL_DTYPES:
        return None
    rows = x2.shape[0]
    if ops.runs_cuda_kernels(x2):
        ours = DECODE_KERNEL == "lladapter" and 1 <= rows <= CUDA_KERNEL_MAX_ROWS_BY_FORMAT[fmt]
        return "lladapter" if ours else None
    if x2.device.type != "cpu":
        return None
    if DECODE_KERNEL == "lladapter":
        if rows < 1:
            return None
        if rows <= min(KERNEL_MAX_ROWS_BY_FORMAT[fmt], KERNEL_MAX_ROWS_AMX_BF16[fmt]):
            return "lladapter"  # (below every limit: a decode step's few rows never ask for the path)
        limit = KERNEL_MAX_ROWS_BY_FORMAT[fmt]
        if ops.quantized_linear_cpu_isa() == "avx512":
            amx_bf16 = x2.dtype == torch.bfloat16 and cpu_has_amx()
            limit = (KERNEL_MAX_ROWS_AMX_BF16 if amx_bf16 else KERNEL_MAX_ROWS_AVX512)[fmt]
        return "lladapter" if rows <= limit else None
    if DECODE_KERNEL == "torch":
        return "torch" if _use_packed_kernel(fmt, x2, weight_numel) else None
    return None


_has_amx: bool | None = None


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later: oneDNN's bf16 GEMMs run on them), as torch
    reports it (False where this torch cannot tell)."""
    global _has_amx
    if _has_amx is None:
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        try:
            _has_amx = bool(probe()) if probe is not None else False
        except RuntimeError:
            _has_amx = False
    return _has_amx


def _use_packed_kernel(fmt: str, x2: torch.Tensor, weight_numel: int) -> bool:
    """Whether torch's packed kernel is the faster way for this call (measured in whole-model decode A/Bs on an AVX2
    CPU, docs/quantization.md): only for one row (decode at batch 1) on the CPU (from 4 rows on, dequantize + GEMM
    wins by 3-7x at every shape), and only for weights of 1M elements and more: there the kernel won or tied
    (TinyLlama int4: 398 vs 470 ms per token), while for smaller ones dequantize + GEMV won or tied (SmolLM2 int8:
    119 vs 139 ms per token). Used with DECODE_KERNEL = "torch" only: ours is faster on AVX2 at every shape."""
    if x2.device.type != "cpu" or x2.shape[0] != 1 or x2.dtype not in (torch.float32, torch.bfloat16,
                                                                        torch.float16):
        return False
    if weight_numel < 1 << 20:
        return False
    return fmt == "int8" or packed_int4_kernel_ok()


def check_layer_shape(fmt: str, shape, name: str) -> None:
    """Refuse a layer width the format cannot store, naming the layer, the format and the reason."""
    N, K = int(shape[0]), int(shape[1])
    if fmt == "int4":
        if K % INT4_GROUP_SIZE:
            raise QuantizationError(f"{name}: int4 needs in_features divisible by {INT4_GROUP_SIZE} (its group "
                                    f"size), got [{N}, {K}]; use --quantize int8 for this model")
        if N % 16:
            raise QuantizationError(f"{name}: int4 needs out_features divisible by 16 (torch's packed layout), "
                                    f"got [{N}, {K}]; use --quantize int8 for this model")


def is_quantizable(name: str, head: bool = False) -> bool:
    """The base's linear weights that a quantized load stores quantized: every attention and MLP projection
    (layers.N.attention.w{q,k,v,o}.weight, layers.N.feed_forward.w{1,2,3}.weight), and with head=True an untied
    LM head (output.weight; a head tied to the embeddings stays in float with them)."""
    if head and name == "output.weight":
        return True
    parts = name.split(".")
    return (len(parts) == 5 and parts[0] == "layers" and parts[-1] == "weight"
            and ((parts[2] == "attention" and parts[3] in ("wq", "wk", "wv", "wo"))
                 or (parts[2] == "feed_forward" and parts[3] in ("w1", "w2", "w3"))))


def set_quantized(model: torch.nn.Module, weight_name: str, layer: QuantizedLinear) -> None:
    """Put `layer` where the linear module owning `weight_name` (e.g. layers.3.attention.wq.weight) is."""
    path = weight_name.rsplit(".", 1)[0]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    if (old.out_features, old.in_features) != (layer.out_features, layer.in_features):
        raise QuantizationError(f"{weight_name}: quantized layer is [{layer.out_features}, {layer.in_features}], "
                                f"the model's is [{old.out_features}, {old.in_features}]")
    setattr(parent, attr, layer)


def quantized_summary(model: torch.nn.Module) -> dict:
    """{format: (layers, bytes)} over the model's QuantizedLinear layers, plus 'float' for the rest's parameters
    and buffers in bytes (for logs and benchmarks)."""
    out: dict = {}
    qbytes = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            n, b = out.get(m.format, (0, 0))
            out[m.format] = (n + 1, b + m.weight_nbytes)
            qbytes += m.weight_nbytes
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    out["float"] = total - qbytes
    return out


def quantize_model(model: torch.nn.Module, fmt: str, head: bool = False) -> torch.nn.Module:
    """Quantize an already-built model's base linear layers in place (each layer's float weight is freed as it
    is replaced), and its untied LM head with head=True. Loading with quantize= is the way that never holds the
    whole float base."""
    fmt = check_format(fmt)
    if fmt is None:
        return model
    for name, p in list(model.named_parameters()):
        if is_quantizable(name, head):
            set_quantized(model, name, QuantizedLinear.from_float(p.detach(), fmt, p.dtype, name=name))
    model.quantization = dict(format=fmt, exact=0, requantized=sum(
        isinstance(m, QuantizedLinear) for m in model.modules()), head=head_is_quantized(model))
    limit_head_scratch(model)
    return model


def head_is_quantized(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "output", None), QuantizedLinear)


def limit_head_scratch(model: torch.nn.Module) -> None:
    """A quantized LM head is dequantised in row blocks no larger than the largest projection, so that it does
    not grow the per-thread scratch buffer (to 262 MB at TinyLlama's shape: the size of the float head)."""
    if not head_is_quantized(model):
        return
    sizes = [m.out_features * m.in_features for m in model.modules()
             if isinstance(m, QuantizedLinear) and m is not model.output]
    model.output.max_dequant_elems = max(sizes) if sizes else None
