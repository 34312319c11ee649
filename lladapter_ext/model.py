"""LLaMA-family decoder with LLaMA-Adapter prompts, built on the lladapter ops.

One config type (`LlamaConfig`) covers LLaMA-1/2/3/3.1, Mistral-7B-style and SmolLM2 models (presets by name in
`PRESETS`). Parameter names follow Meta's checkpoints (`tok_embeddings`, `layers.N.attention.wq`, ...); the
loaders in lladapter_ext.loaders map Hugging Face and GGUF names onto them.

Adapter (docs/models.md, "The adapter"): the top `adapter_layer` layers (clipped to the depth) each own a prompt
`adapter_prompt` [K, D] and a per-head gate `adapter_gate` [H] initialised to zero. The prompt is projected by the
layer's own wk/wv (no RoPE) and attended with a separate softmax; the result is scaled by phi(gate) (tanh or
identity) and added to the word attention. Only prompts and gates require grad. Adapter tensors are kept in fp32
whatever the model dtype (they are what the optimiser updates) and cast to the compute dtype where used.

RoPE layout: `rope_interleaved=True` is Meta's/GGUF's layout of the q/k features (pairs (2i, 2i+1)), False HF's
rotate_half layout (pairs (i, i + d/2)). The loaders keep the checkpoint's layout and set this flag, so no weight
is permuted; adapters are layout-independent (prompts live in model space, gates are per head).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _C, ops, reference
from .ops import GATE_ACTS
from .adapter import AdapterMixin
from .kv_cache import KVCache
from .nn import DecodeLinear, RMSNorm, openblas_route_takes, few_rows_route, linear, lm_head_cross_entropy
from .quantize import QuantizedLinear

__all__ = ["LlamaConfig", "PRESETS", "LlamaForCausalLM", "KVCache", "CausalLMOutput", "BlockInputs",
           "config_from_preset"]



PROMPT_PROJECTIONS = ("wk_wv", "litgpt")


@dataclass
class LlamaConfig:
    """Architecture and adapter hyper-parameters of a LLaMA-family decoder."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: = n_heads (multi-head attention)
    ffn_dim: int = 11008
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1 "llama3" scaling, see reference.rope_inv_freq
    rope_interleaved: bool = False  # q/k feature layout: True = Meta/GGUF pairs (2i, 2i+1), False = HF rotate_half
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # adapter
    adapter_len: int = 10
    adapter_layer: int = 30
    gate_act: str = "tanh"
    adapter_init_std: float = 1.0  # prompts start as N(0, std^2), like an nn.Embedding
    # how a prompt becomes keys/values: "wk_wv" (the paper, PEFT, the official code: the layer's wk and wv) or
    # "litgpt" (LitGPT 0.5's adapter, which slices its stacked [q; k; v] projection as if it were interleaved per
    # kv group; the same as wk_wv only with one kv head). Kept so that LitGPT adapters give LitGPT's outputs.
    prompt_projection: str = "wk_wv"

    def __post_init__(self):
        # sizes first, before anything divides by them (n_heads 0 would be a ZeroDivisionError)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if value is None and name in ("n_kv_heads", "head_dim"):
                continue  # derived below
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"LlamaConfig: {name} must be a positive integer, got {value!r} "
                                 f"(dim={self.dim!r}, n_heads={self.n_heads!r}, n_kv_heads={self.n_kv_heads!r}, "
                                 f"head_dim={self.head_dim!r})")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"LlamaConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "when head_dim is not given")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be even for RoPE, got {self.head_dim}")
        if self.adapter_len < 0 or self.adapter_layer < 0:
            raise ValueError(f"LlamaConfig: adapter_len and adapter_layer must be >= 0, got {self.adapter_len}, "
                             f"{self.adapter_layer}")
        if self.gate_act not in GATE_ACTS:
            raise ValueError(f"LlamaConfig: gate_act must be one of {GATE_ACTS}, got {self.gate_act!r}")
        if self.prompt_projection not in PROMPT_PROJECTIONS:
            raise ValueError(f"LlamaConfig: prompt_projection must be one of {PROMPT_PROJECTIONS}, got "
                             f"{self.prompt_projection!r}")

    @property
    def n_adapted_layers(self) -> int:
        """Number of layers that carry a prompt: adapter_layer clipped to the depth (0 when adapter_len is 0)."""
        return min(self.adapter_layer, self.n_layers) if self.adapter_len > 0 else 0

    @property
    def first_adapted_layer(self) -> int:
        return self.n_layers - self.n_adapted_layers

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _llama1(dim, n_layers, n_heads, ffn_dim):
    return dict(vocab_size=32000, dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=ffn_dim, norm_eps=1e-6,
                max_seq_len=2048)


def _llama2(dim, n_layers, n_heads, ffn_dim, n_kv_heads=None):
    return dict(vocab_size=32000, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                ffn_dim=ffn_dim, norm_eps=1e-5, max_seq_len=4096)


_LLAMA3 = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5,
               rope_base=500000.0, max_seq_len=8192)
_SMOLLM2 = dict(vocab_size=49152, norm_eps=1e-5, rope_base=100000.0, max_seq_len=8192, tie_embeddings=True)

# Architecture hyper-parameters of the published checkpoints (their params.json / config.json).
PRESETS: dict[str, dict] = {
    "llama-7b": _llama1(4096, 32, 32, 11008),
    "llama-13b": _llama1(5120, 40, 40, 13824),
    "llama-33b": _llama1(6656, 60, 52, 17920),
    "llama-65b": _llama1(8192, 80, 64, 22016),
    "llama2-7b": _llama2(4096, 32, 32, 11008),
    "llama2-13b": _llama2(5120, 40, 40, 13824),
    "llama2-70b": _llama2(8192, 80, 64, 28672, n_kv_heads=8),
    "llama3-8b": dict(_LLAMA3),
    "llama3.1-8b": dict(_LLAMA3, max_seq_len=131072, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)),
    # Mistral-7B v0.1 uses a 4096-token sliding window; this decoder attends to the full context.
    "mistral-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       norm_eps=1e-5, max_seq_len=32768),
    "tinyllama-1.1b": _llama2(2048, 22, 32, 5632, n_kv_heads=4) | dict(max_seq_len=2048),
    "smollm2-135m": dict(_SMOLLM2, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536),
    "smollm2-360m": dict(_SMOLLM2, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560),
    "smollm2-1.7b": dict(_SMOLLM2, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, ffn_dim=8192,
                         rope_base=130000.0),
}


def config_from_preset(name: str, **overrides) -> LlamaConfig:
    """LlamaConfig of a preset by name (see PRESETS), with any field overridden."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return LlamaConfig(**{**copy.deepcopy(PRESETS[key]), **overrides})


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, vocab] (None when labels were given: only labelled positions ran)
    loss: torch.Tensor | None = None
    cache: KVCache | None = None


@dataclass
class BlockInputs:
    """What every block of one forward call reads, resolved once by LlamaForCausalLM.forward from its arguments."""

    cos: torch.Tensor  # RoPE tables [n_positions, d/2] (fp32), indexed by `positions`
    sin: torch.Tensor
    positions: torch.Tensor  # [B, T] RoPE position of each token
    kv_start: torch.Tensor | None  # first key each query may see: [B] (left padding), [B, T] (packed rows) or None
    cache: KVCache | None
    use_adapter: bool  # False: the frozen base (prompts ignored)
    prompt_offset: torch.Tensor | None  # [B, D] added to every prompt token (multi-modal)


# --------------------------------------------------------------------------------------------- modules
class Attention(torch.nn.Module):
    def __init__(self, config: LlamaConfig, adapted: bool, device=None, dtype=None):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = DecodeLinear(c.dim, c.n_heads * c.head_dim, device=device, dtype=dtype)
        self.wk = DecodeLinear(c.dim, c.n_kv_heads * c.head_dim, device=device, dtype=dtype)
        self.wv = DecodeLinear(c.dim, c.n_kv_heads * c.head_dim, device=device, dtype=dtype)
        self.wo = DecodeLinear(c.n_heads * c.head_dim, c.dim, device=device, dtype=dtype)
        self.gate_act = c.gate_act
        self.rope_interleaved = c.rope_interleaved
        self.prompt_projection = c.prompt_projection
        if adapted:
            self.adapter_prompt = torch.nn.Parameter(torch.empty(c.adapter_len, c.dim, device=device,
                                                                 dtype=torch.float32))
            self.adapter_gate = torch.nn.Parameter(torch.zeros(c.n_heads, device=device, dtype=torch.float32))
        else:
            self.adapter_prompt = None
            self.adapter_gate = None

    def prompt_kv(self, prompt_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's prompt keys/values: the prompt projected by wk/wv, without RoPE. [1, K, Hkv, d] when shared
        by the batch; with prompt_offset [B, D] (multi-modal: the projected image feature, added to every prompt
        token) they are per sample, [B, K, Hkv, d]. prompt_projection "litgpt": LitGPT's slices instead (config)."""
        p = self.adapter_prompt.to(self.wk.compute_dtype).unsqueeze(0)  # [1, K, D]
        if prompt_offset is not None:
            p = p + prompt_offset.to(p.dtype).unsqueeze(1)  # [B, K, D]
        return self.project_prompt(p, self.prompt_projection)

    def project_prompt(self, p: torch.Tensor, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens p [B, K, D] as keys/values [B, K, Hkv, d] of this layer (no RoPE), by `projection`."""
        B, K = p.shape[0], p.shape[1]
        G, d = self.n_kv_heads, self.head_dim
        if projection == "litgpt":
            # LitGPT stacks [q; k; v] rows and reads the prompt's projection as [G, q_per_kv + 2, d] per token
            qkv = torch.cat([self.wq(p), self.wk(p), self.wv(p)], dim=-1).view(B, K, G, self.n_heads // G + 2, d)
            return qkv[:, :, :, -2], qkv[:, :, :, -1]
        return self.wk(p).view(B, K, G, d), self.wv(p).view(B, K, G, d)

    def forward(self, x: torch.Tensor, inputs: BlockInputs, layer_idx: int, query_start: int = 0) -> torch.Tensor:
        """The attention sublayer's output [B, T - query_start, D]: query_start > 0 (no cache) computes only the
        queries from that position on, against the keys and values of every position (LlamaForCausalLM.forward's
        last layer, where the loss reads no earlier row)."""
        B, T, _ = x.shape
        cache = inputs.cache
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = ops.rope(q, k, inputs.cos, inputs.sin, position_ids=inputs.positions,
                        interleaved=self.rope_interleaved)
        if cache is not None:
            k, v = cache.write(layer_idx, k, v)
        pk = pv = gate = None
        if inputs.use_adapter and self.adapter_prompt is not None:
            if cache is not None:
                if layer_idx not in cache.prompt_kv:
                    cache.prompt_kv[layer_idx] = self.prompt_kv(inputs.prompt_offset)
                pk, pv = cache.prompt_kv[layer_idx]
            else:
                pk, pv = self.prompt_kv(inputs.prompt_offset)
            gate = self.adapter_gate
        kv_start = inputs.kv_start
        if query_start:  # the last Tq = T - query_start queries: the causal bound j <= i + Tk - Tq still holds
            q = q[:, query_start:]
            if kv_start is not None and kv_start.dim() == 2:  # per-query bounds (packed rows)
                kv_start = kv_start[:, query_start:]
        out = ops.gated_prompt_attention(q, k, v, pk, pv, gate, causal=True, gate_act=self.gate_act,
                                         kv_start=kv_start)
        if cache is not None and cache.row_prompts is not None:  # serving: each row its own adapter (or none)
            out = cache.row_prompts.add_to(out, q, layer_idx)
        return self.wo(out.reshape(B, T - query_start, self.n_heads * self.head_dim))


class FeedForward(torch.nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), the gated activation fused (ops.swiglu: one pass each way)."""

    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.w1 = DecodeLinear(config.dim, config.ffn_dim, device=device, dtype=dtype)
        self.w2 = DecodeLinear(config.ffn_dim, config.dim, device=device, dtype=dtype)
        self.w3 = DecodeLinear(config.dim, config.ffn_dim, device=device, dtype=dtype)

    def forward(self, x):
        return self.w2(ops.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(torch.nn.Module):
    def __init__(self, config: LlamaConfig, adapted: bool, device=None, dtype=None):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.attention = Attention(config, adapted, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.feed_forward = FeedForward(config, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, inputs: BlockInputs, layer_idx: int, query_start: int = 0) -> torch.Tensor:
        """x [B, T, D] -> [B, T - query_start, D]: with query_start > 0 only the rows from that position on (the
        keys and values still from every row; see Attention.forward)."""
        h = x[:, query_start:] + self.attention(self.attention_norm(x), inputs, layer_idx, query_start)
        return h + self.feed_forward(self.ffn_norm(h))


# --------------------------------------------------------------------------------------------- model
class LlamaForCausalLM(AdapterMixin, torch.nn.Module):
    """LLaMA-family decoder with LLaMA-Adapter prompts in the top layers; the base is frozen at construction.

    `device="meta"` builds the structure without allocating weights (count_trainable() works; the loaders then
    fill it tensor by tensor). Otherwise weights get a random init (normal std 0.02, norms ones, prompts
    N(0, adapter_init_std^2), gates zero).
    """

    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"LlamaForCausalLM: config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.tok_embeddings = torch.nn.Embedding(c.vocab_size, c.dim, device=device, dtype=dtype)
        first = c.first_adapted_layer
        self.layers = torch.nn.ModuleList(
            TransformerBlock(c, adapted=(i >= first and c.n_adapted_layers > 0), device=device, dtype=dtype)
            for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps, device=device, dtype=dtype)
        self.output = None if c.tie_embeddings else torch.nn.Linear(c.dim, c.vocab_size, bias=False,
                                                                     device=device, dtype=dtype)
        self.use_adapter = True  # False runs the frozen base model (prompts ignored)
        self.quantization: dict | None = None  # a quantized base (lladapter_ext.quantize): format and layer counts
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()
        self.freeze_base()

    # ---------------------------------------------------------------- parameters
    @torch.no_grad()
    def reset_parameters(self, base: bool = True, adapter: bool = True):
        """Random init of the base weights (normal std 0.02, norms ones) and/or the adapter (prompts, gates 0)."""
        for name, p in self.named_parameters():
            if name.endswith("adapter_prompt"):
                if adapter:
                    p.normal_(0.0, self.config.adapter_init_std)
            elif name.endswith("adapter_gate"):
                if adapter:
                    p.zero_()
            elif base:
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)

    def lm_head_weight(self) -> torch.Tensor:
        """The float LM-head matrix [V, D] (the embeddings when tied); a quantized head has none (lm_head)."""
        if isinstance(self.output, QuantizedLinear):
            raise TypeError("the LM head is quantized (quantize_head=True): it has no float weight; use lm_head(h)")
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits h [..., D] -> [..., V] in h's dtype, through the float or the quantized head."""
        if isinstance(self.output, QuantizedLinear):
            return self.output(h)
        return _lm_head(h, self.lm_head_weight())

    # ---------------------------------------------------------------- adapter (lladapter_ext.adapter)
    ADAPTER_FAMILY = "llama"

    @staticmethod
    def is_adapter_param(name: str) -> bool:
        """Adapter prompts and gates (the names end in adapter_prompt / adapter_gate)."""
        return name.endswith("adapter_prompt") or name.endswith("adapter_gate")

    def adapter_metadata(self) -> dict[str, str]:
        c = self.config
        return {"adapter_len": str(c.adapter_len), "adapter_layer": str(c.adapter_layer), "gate_act": c.gate_act,
                "prompt_projection": c.prompt_projection, "n_layers": str(c.n_layers), "dim": str(c.dim),
                "n_heads": str(c.n_heads), "n_kv_heads": str(c.n_kv_heads)}

    @staticmethod
    def adapter_hparams(meta: dict[str, str], source: str | os.PathLike | None = None) -> dict:
        """adapter_len, adapter_layer and gate_act as an adapter file's metadata records them (adapter_metadata's
        inverse; None where absent). A value that is not a non-negative integer, or not a gate activation, is an
        error naming the file and key."""
        hp: dict = {}
        for key in ("adapter_len", "adapter_layer"):
            hp[key] = None
            if key in meta:
                try:
                    hp[key] = int(meta[key])
                except (TypeError, ValueError):
                    hp[key] = -1
                if hp[key] < 0:
                    raise ValueError(f"{source}: metadata {key}={meta[key]!r} is not a non-negative integer (a "
                                     "corrupt or foreign adapter file?)")
        hp["gate_act"] = meta.get("gate_act")
        if hp["gate_act"] is not None and hp["gate_act"] not in GATE_ACTS:
            raise ValueError(f"{source}: metadata gate_act={hp['gate_act']!r} is not tanh or identity")
        hp["prompt_projection"] = meta.get("prompt_projection")
        if hp["prompt_projection"] is not None and hp["prompt_projection"] not in PROMPT_PROJECTIONS:
            raise ValueError(f"{source}: metadata prompt_projection={hp['prompt_projection']!r} is not one of "
                             f"{PROMPT_PROJECTIONS}")
        return hp

    def read_adapter(self, path_or_state_dict):
        """Our adapter files, and PEFT, LitGPT and official LLaMA-Adapter ones converted exactly (interop)."""
        from .adapter import read_adapter_tensors
        from .interop import AdapterFormatError, detect_format, read_adapter

        if isinstance(path_or_state_dict, dict):
            return read_adapter_tensors(path_or_state_dict)
        try:
            fmt = detect_format(path_or_state_dict)
        except AdapterFormatError:
            fmt = "lladapter"  # not a known format: our reader names what is wrong with it
        if fmt == "lladapter":
            return read_adapter_tensors(path_or_state_dict)
        adapter = read_adapter(path_or_state_dict, fmt)
        if adapter.dim != self.config.dim or adapter.n_layers != self.config.n_layers:
            raise ValueError(f"load_adapter: {adapter.source}: a {fmt} adapter for a model of width {adapter.dim} "
                             f"and {adapter.n_layers} layers; this model has width {self.config.dim} and "
                             f"{self.config.n_layers} layers")
        return (adapter.state_dict(self.config.n_heads), adapter.metadata(),
                f"{os.fspath(path_or_state_dict)} ({fmt})")

    def check_adapter_metadata(self, meta: dict[str, str] | None, tensors: dict, source: str) -> None:
        """The gate activation and prompt projection an adapter file records must be this model's: they change
        what the same tensors compute, so a mismatch would load silently and give other outputs."""
        if not meta:
            return
        hp = self.adapter_hparams(meta, source)
        for key in ("gate_act", "prompt_projection"):
            if hp[key] is not None and hp[key] != getattr(self.config, key):
                raise ValueError(f"load_adapter: {source} was trained with {key}={hp[key]}, this model has "
                                 f"{key}={getattr(self.config, key)} (build it with {key}={hp[key]!r}; "
                                 "load_model(..., adapter=path) does)")

    def adapter_description(self) -> str:
        c = self.config
        return f"adapter_len={c.adapter_len}, adapter_layer={c.adapter_layer}, n_layers={c.n_layers}"

    # ---------------------------------------------------------------- forward
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.tok_embeddings.weight
        return KVCache(self.config, batch_size, max_len, w.dtype, w.device)

    def _rope_tables(self, n_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._rope_cache
        if cached is None or cached[0].shape[0] < n_positions or cached[0].device != torch.device(device):
            size = 1 << max(6, math.ceil(math.log2(max(n_positions, 1))))  # grow in powers of two
            self._rope_cache = reference.rope_cos_sin(size, self.config.head_dim, self.config.rope_base,
                                                      self.config.rope_scaling, device=device)
        return self._rope_cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, segment_ids: torch.Tensor | None = None,
                prompt_offset: torch.Tensor | None = None, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (or [B, cached + T]), 1 = real token, left or right padding;
        labels [B, T] with -100 ignored, HF convention: the loss compares logits[:, :-1] with labels[:, 1:], and
        only labelled positions go through the LM head (logits is then None); position_ids [B, T] (default: from
        segment_ids, else from the mask, so that each sample's first real token has position 0); cache: a KVCache
        from new_cache(); segment_ids [B, T] (packed rows, no cache): each run of equal consecutive ids is one
        sequence, attending only to its own earlier tokens (and the adapter prompt), with positions from 0 when
        position_ids is not given, so every packed sequence gets the outputs it would get alone;
        prompt_offset [B, D]: added to every adaption prompt token of every adapted layer, so prompt keys/values are
        per sample (the multi-modal adapter's projected image feature; with a cache, the first call's is kept);
        logits_to_keep > 0 (without labels): logits of the last logits_to_keep positions only, [B, logits_to_keep, V]
        (HF's name; a generation prefill needs one row, and the other rows' LM head would be a large GEMM)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
        B, T = input_ids.shape
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep is for calls without labels (a loss needs every labelled position)")
        if labels is not None and tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must be [B, T] = [{B}, {T}], got {list(labels.shape)}")
        inputs = self._block_inputs(B, T, input_ids.device, attention_mask, position_ids, cache, segment_ids,
                                    prompt_offset)
        first_trainable = self._first_layer_needing_grad(inputs.use_adapter)
        keep = None  # [B, T - 1]: the positions the loss reads (position t predicts labels[:, t + 1])
        if labels is not None:
            targets = labels[:, 1:].to(input_ids.device)
            keep = targets != -100
        query_start = self._loss_rows_start(keep, cache)

        def layer(i, h):  # (the last one from query_start on; the call stays (h, inputs, i) for any other module)
            if query_start and i == self.config.n_layers - 1:
                return self.layers[i](h, inputs, i, query_start)
            return self.layers[i](h, inputs, i)

        with torch.no_grad() if first_trainable > 0 else contextlib.nullcontext():
            h = self.tok_embeddings(input_ids)
            for i in range(first_trainable):
                h = layer(i, h)
        # (the C++ loop runs only with grad off, where first_trainable is 0: every layer)
        layers_args = self._decode_layers_args(h, inputs)
        if layers_args is not None:  # the same layer loop in one C++ call (decoding: ~500 op calls a step)
            h = _C.decode_layers(h, *layers_args)
        else:
            for i in range(first_trainable, self.config.n_layers):
                h = layer(i, h)
        if cache is not None:
            cache.length += T
            cache.next_pos = inputs.positions[:, -1] + 1

        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        h = self.norm(h)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(h), loss=None, cache=cache)
        h_sel = h[:, :-1][keep[:, query_start:]]  # only labelled positions go through the (large) LM head
        if h_sel.shape[0] == 0:  # nothing labelled: a zero loss that still backpropagates
            loss = h.sum().float() * 0.0
        elif isinstance(self.output, QuantizedLinear):
            loss = F.cross_entropy(self.lm_head(h_sel).float(), targets[keep].long())
        else:
            loss = lm_head_cross_entropy(h_sel, self.lm_head_weight(), targets[keep])
        return CausalLMOutput(logits=None, loss=loss, cache=cache)

    def _loss_rows_start(self, keep: torch.Tensor | None, cache: KVCache | None) -> int:
        """The first position whose output the loss reads in any sample (keep [B, T - 1]: labels[:, 1:] != -100, or
        None without labels), when the last layer may skip the rows before it, else 0. The last layer's outputs
        feed only the LM head, which runs on the labelled rows; its keys and values still come from every row. So
        with instruction data (no loss on the prompt) the last layer's queries, attention output, wo and
        feed-forward run only from there on: at B 4 x T 128 with the loss on the second half, half of one layer's
        GEMMs (~2% of a TinyLlama-shape step's). Only for a plain last layer (no hooks, wrappers or FSDP: they see
        its usual output), without a KV cache, not while compiling (a data-dependent shape), and only where the
        attention runs the CPU kernels: on CUDA the split attention's word branch would take SDPA's masked path for
        queries that start past the first key (a materialised mask instead of the flash kernel), which no GPU has
        measured yet."""
        if (keep is None or cache is not None or torch.compiler.is_compiling()
                or ops.runs_cuda_kernels(self.tok_embeddings.weight)):
            return 0
        layer = self.layers[-1]
        if type(layer) is not TransformerBlock or _global_module_hooks() or any(_hooked(m) for m in layer.modules()):
            return 0
        read = keep.any(0)  # [T - 1]: a column the loss reads in some sample
        if not bool(read.any()):  # nothing labelled (the loss is a zero that still backpropagates)
            return 0
        return int(read.to(torch.uint8).argmax())

    # (data-dependent checks and branches, e.g. on left padding: under torch.compile this runs eagerly, a graph
    # break that torch does not warn about, instead of the warning each such check would print)
    @torch.compiler.disable
    def _block_inputs(self, B: int, T: int, dev: torch.device, attention_mask, position_ids, cache, segment_ids,
                      prompt_offset) -> BlockInputs:
        """forward's arguments checked and resolved into what every block reads (see forward for their meaning).
        On a cache's first call this records the prompt's key start (left padding) in it."""
        past = cache.length if cache is not None else 0
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache was made for batch size {cache.batch_size}, input_ids has {B}")
        kv_start = self._padding_start(B, T, dev, attention_mask, cache, past)
        if cache is not None and past == 0:
            cache.kv_start = kv_start
        starts = None  # [B, T]: index of the first token of the packed sequence holding each token
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) cannot be used with a KV cache")
            if tuple(segment_ids.shape) != (B, T):
                raise ValueError(f"segment_ids must be [B, T] = [{B}, {T}], got {list(segment_ids.shape)}")
            starts = _segment_starts(segment_ids.to(dev))

        if position_ids is None:
            steps = torch.arange(T, device=dev).unsqueeze(0)
            if cache is not None and past > 0:  # decoding: continue from each sample's last position
                positions = cache.next_pos.view(B, 1) + steps
            elif starts is not None:  # packed rows: every sequence starts at position 0
                positions = steps - starts
            elif kv_start is not None:  # left padding: each sample's first real token is position 0
                positions = (steps - kv_start.view(B, 1)).clamp_min(0)
            else:
                positions = steps.expand(B, T)
            n_pos = past + T  # positions never exceed past + T - 1: no device sync needed
        else:
            if tuple(position_ids.shape) not in ((B, T), (1, T)):
                raise ValueError(f"position_ids must be [B, T] = [{B}, {T}] or [1, T], got "
                                 f"{list(position_ids.shape)}")
            positions = position_ids.to(device=dev, dtype=torch.long).expand(B, T)
            n_pos = int(positions.max()) + 1 if positions.numel() else 1
            if positions.numel() and int(positions.min()) < 0:
                raise ValueError("position_ids must be >= 0")
        cos, sin = self._rope_tables(n_pos, dev)
        if starts is not None and bool((starts > 0).any()):
            # per-query key bounds [B, T]: block-diagonal causal attention (left padding, if any, still applies);
            # rows without a boundary keep the cheaper [B] / no bound
            kv_start = starts if kv_start is None else torch.maximum(starts, kv_start.view(B, 1))

        if prompt_offset is not None and tuple(prompt_offset.shape) != (B, self.config.dim):
            raise ValueError(f"prompt_offset must be [B, dim] = [{B}, {self.config.dim}], got "
                             f"{list(prompt_offset.shape)}")
        return BlockInputs(cos=cos, sin=sin, positions=positions, kv_start=kv_start, cache=cache,
                           use_adapter=self.use_adapter and self.config.n_adapted_layers > 0,
                           prompt_offset=prompt_offset)

    def _decode_layers_args(self, h: torch.Tensor, inputs: BlockInputs) -> tuple | None:
        """The arguments of _C.decode_layers (csrc/decode_layers.h) for this forward's layer loop, or None where the
        Python loop runs: grad mode on, no KV cache, not the CPU kernels (CUDA, the emulator), serving's per-row
        prompts made for another batch size (the loop raises), a layer that is not the plain one (quantized or
        wrapped linears, hooks, activation checkpointing, FSDP), an ops function replaced (e.g. the benchmarks'
        reference ops: the C++ loop calls the registered kernels), or LLADAPTER_DECODE_LAYERS=0. Fills the cache's
        missing prompt keys/values as the layers would."""
        cache = inputs.cache
        if (cache is None or torch.is_grad_enabled() or h.device.type != "cpu" or h.shape[1] == 0
                or cache.length + h.shape[1] > cache.max_len  # (KVCache.write raises its own error)
                or (cache.row_prompts is not None and cache.row_prompts.batch_size != h.shape[0])
                or ops.kernel_namespace() != "lladapter"
                or os.environ.get(DECODE_LAYERS_ENV, "1") == "0" or _global_module_hooks()
                or any(getattr(ops, name) is not f for name, f in ops.DECODE_LAYERS_ENTRY_POINTS.items())):
            return None
        weights, eps, prompt_k, prompt_v, gates = [], [], [], [], []
        shape = None  # (n_heads, n_kv_heads, head_dim, rope_interleaved, gate_act): one for every layer
        use_adapter = inputs.use_adapter
        # (the modules' own dicts, not nn.Module.__getattr__: this runs before every decode step, ~0.1 ms)
        for i, layer in enumerate(self.layers._modules.values()):
            if type(layer) is not TransformerBlock or _hooked(layer):
                return None
            sub = layer._modules
            a, f, norm1, norm2 = sub["attention"], sub["feed_forward"], sub["attention_norm"], sub["ffn_norm"]
            if (type(a) is not Attention or type(f) is not FeedForward or type(norm1) is not RMSNorm
                    or type(norm2) is not RMSNorm or _hooked(a) or _hooked(f) or _hooked(norm1) or _hooked(norm2)):
                return None
            am, fm = a._modules, f._modules
            for m in (norm1, am["wq"], am["wk"], am["wv"], am["wo"], norm2, fm["w1"], fm["w3"], fm["w2"]):
                if m is not norm1 and m is not norm2 and (type(m) is not DecodeLinear or _hooked(m)):
                    return None
                weights.append(m._parameters["weight"])
            layer_shape = (a.n_heads, a.n_kv_heads, a.head_dim, a.rope_interleaved, a.gate_act)
            if shape is None:
                shape = layer_shape
            elif shape != layer_shape:
                return None
            eps += (norm1.eps, norm2.eps)
            prompt = a._parameters.get("adapter_prompt")  # (None: an unadapted layer)
            if use_adapter and prompt is not None:
                if i not in cache.prompt_kv:
                    cache.prompt_kv[i] = a.prompt_kv(inputs.prompt_offset)
                pk, pv = cache.prompt_kv[i]
                prompt_k.append(pk), prompt_v.append(pv), gates.append(a._parameters["adapter_gate"])
            else:
                prompt_k.append(None), prompt_v.append(None), gates.append(None)
        if shape is None:
            return None
        # every projection has B * T rows: routed as nn.linear (DecodeLinear) routes them
        if h.shape[0] * h.shape[1] <= 4:
            route = few_rows_route(weights[1].dtype)
        else:
            route = "openblas" if openblas_route_takes(h, weights[1]) else "linear"
        if route == "gemv" and not all(w.is_contiguous() for w in weights):
            return None  # (few_rows_linear sends those to F.linear; the C++ loop's gemv refuses them)
        groups = cache.row_prompts.groups if cache.row_prompts is not None else {}
        row_prompts = [groups.get(i, ()) for i in range(len(prompt_k))]
        return (weights, eps, cache.k, cache.v, prompt_k, prompt_v, gates, row_prompts, cache.length,
                inputs.positions, inputs.cos, inputs.sin, inputs.kv_start, *shape, 1.0 / math.sqrt(shape[2]),
                route)

    @staticmethod
    def _padding_start(B: int, T: int, dev: torch.device, attention_mask, cache, past: int) -> torch.Tensor | None:
        """[B] index of each sample's first real key (left padding), or None when no sample is left-padded."""
        kv_start = cache.kv_start if (cache is not None and past > 0) else None
        if attention_mask is None:
            return kv_start
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
            raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}]" +
                             (f" or [B, cached + T] = [{B}, {past + T}]" if past else "") +
                             f", got {list(attention_mask.shape)}")
        m = attention_mask.to(device=dev) != 0
        first, contiguous = _mask_first_real(m)
        if not bool(contiguous.all()):
            raise ValueError("attention_mask: the real tokens of each sample must be one contiguous run "
                             "(left or right padding only)")
        if cache is not None and not bool(m[:, -1].all()):
            raise ValueError("attention_mask: with a KV cache, prompts must be left-padded (the last position "
                             "of every sample must be a real token)")
        if past == 0 or m.shape[1] == past + T:  # the mask covers every key
            return first if bool((first > 0).any()) else None
        if not bool(m.all()):
            raise ValueError("attention_mask: in decoding steps the new tokens must all be real")
        return kv_start

    def _first_layer_needing_grad(self, use_adapter: bool) -> int:
        """Layers below this index need no autograd graph: nothing in or below them requires grad."""
        if not torch.is_grad_enabled():
            return 0
        if self.tok_embeddings.weight.requires_grad:
            return 0
        for i, layer in enumerate(self.layers):
            if any(p.requires_grad and (use_adapter or not self.is_adapter_param(n))
                   for n, p in layer.named_parameters()):
                return i
        return self.config.n_layers

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={c.n_layers}, dim={c.dim}, heads={c.n_heads}/{c.n_kv_heads}, adapter_len={c.adapter_len}, "
                f"adapted_layers={c.n_adapted_layers}, gate_act={c.gate_act}")



DECODE_LAYERS_ENV = "LLADAPTER_DECODE_LAYERS"  # "0": no-grad cached forwards keep the Python layer loop (A/B runs)


def _hooked(m: torch.nn.Module) -> bool:
    """Whether calling m runs more than its class's forward (hooks, or an instance-level forward)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def _lm_head(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Logits h [B, T, D] @ w[V, D]^T through nn.linear, up to 16 rows by few_rows_linear's route (the tall LM-head
    matrix gains up to 8 rows and more)."""
    return linear(h, w, max_rows=16)


def _mask_first_real(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the first real token per row and whether the real tokens form one contiguous run."""
    L = m.shape[1]
    idx = torch.arange(L, device=m.device).expand_as(m)
    count = m.sum(1)
    first = torch.where(m, idx, torch.full_like(idx, L)).min(1).values
    last = torch.where(m, idx, torch.full_like(idx, -1)).max(1).values
    contiguous = (count == 0) | (last - first + 1 == count)
    return first, contiguous


def _segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the first token of the run of equal consecutive segment ids that holds each token."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    new_run = torch.ones(B, T, dtype=torch.bool, device=segment_ids.device)
    new_run[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.where(new_run, idx, 0).cummax(1).values


def enable_activation_checkpointing(model: torch.nn.Module) -> str:
    """Turn on activation checkpointing: the model's own switch when it has one
    (``set_activation_checkpointing(True)``, or HF's ``gradient_checkpointing_enable()``), else every block of its
    ``layers`` ModuleList is wrapped so that, while training with grad enabled, its forward runs under
    ``torch.utils.checkpoint`` (non-reentrant; activations inside a block are recomputed in backward). Inference
    (no grad or eval mode) runs the block as before, so a KV cache is never written twice. Returns which way
    was used; a model with none of these raises."""
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(True)
        return "model"
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        return "model"
    layers = getattr(model, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        for layer in layers:
            _checkpoint_forward(layer)
        return "layers"
    raise ValueError(f"activation_checkpointing=True but {type(model).__name__} has no "
                     "set_activation_checkpointing(enabled) method and no `layers` ModuleList to wrap")


def _checkpoint_forward(module: torch.nn.Module) -> None:
    if getattr(module, "_lladapter_checkpointed", False):
        return
    from torch.utils.checkpoint import checkpoint
    forward = module.forward

    def checkpointed_forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    module.forward = checkpointed_forward
    module._lladapter_checkpointed = True
