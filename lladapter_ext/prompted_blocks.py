"""Pre-norm transformer blocks with LLaMA-Adapter prompts, shared by the ViT (lladapter_ext.vit) and CLIP
(lladapter_ext.clip) models, in timm's layout (module names), so timm and open_clip state dicts map onto them.

- `PromptedSelfAttention`: self-attention through `ops.gated_prompt_attention` (non-causal, or causal for CLIP's
  text tower) that can carry a prompt of K tokens. `mode="gated"` is the zero-init gated prompt (LLaMA-Adapter),
  `mode="joint"` the VPT-style baseline (the prompt joins the tokens' softmax, no gate).
- `Block` (LayerNorm, attention, optional LayerScale, MLP), `Mlp`, `LayerScale`, `QuickGELU`.
- `PromptAdapterMixin`: a model made of towers of such blocks (add_adapter / remove_adapter, which parameters are
  the adapter's, the adapter config in the file); the rest of the adapter interface is lladapter_ext.adapter's.
- `resample_pos_embed` (learned position embeddings to another grid), `copy_checked` (a strict state-dict copy).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .adapter import AdapterMixin, check_tensors, config_metadata, saved_config

__all__ = ["QuickGELU", "LayerScale", "Mlp", "PromptedSelfAttention", "Block", "PromptAdapterMixin",
           "resample_pos_embed", "copy_checked", "pair"]

_ADAPTER_MODES = ("gated", "joint")


# --------------------------------------------------------------------------------------------- building blocks
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {name!r}")


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT / DINOv2); parameter named `gamma` as in timm and open_clip."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PromptedSelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and an optional LLaMA-Adapter prompt.

    Without an adapter it is plain scaled-dot-product attention. `add_adapter` creates `prompt` [K, D] and
    `gate` [H] (fp32, zeros); prompt keys/values are the prompt through the k and v thirds of `qkv`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.prompt: nn.Parameter | None = None
        self.gate: nn.Parameter | None = None
        self.adapter_mode: str | None = None
        self.gate_act = "tanh"

    def add_adapter(self, prompt_len: int, mode: str = "gated", gate_act: str = "tanh",
                    prompt_init_std: float = 1.0) -> None:
        if prompt_len <= 0:
            raise ValueError(f"prompt_len must be positive, got {prompt_len}")
        if mode not in _ADAPTER_MODES:
            raise ValueError(f"mode must be one of {_ADAPTER_MODES}, got {mode!r}")
        if gate_act not in ops.GATE_ACTS:
            raise ValueError(f"gate_act must be 'tanh' or 'identity', got {gate_act!r}")
        w = self.qkv.weight
        self.prompt = nn.Parameter(torch.randn(prompt_len, self.dim, device=w.device, dtype=w.dtype)
                                   * prompt_init_std)
        # the joint (VPT-style) baseline has no gate: its prompts act at full strength from the start
        self.gate = (nn.Parameter(torch.zeros(self.num_heads, device=w.device, dtype=torch.float32))
                     if mode == "gated" else None)
        self.adapter_mode, self.gate_act = mode, gate_act

    def remove_adapter(self) -> None:
        self.prompt = self.gate = self.adapter_mode = None

    def prompt_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt keys and values [1, K, H, d] from the layer's own k/v projections (no RoPE, no norm)."""
        D = self.dim
        bias = None if self.qkv.bias is None else self.qkv.bias[D:]
        kv = F.linear(self.prompt, self.qkv.weight[D:], bias)  # [K, 2D]
        pk, pv = kv.view(1, -1, 2, self.num_heads, self.head_dim).unbind(2)
        return pk, pv

    def forward(self, x: torch.Tensor, causal: bool = False, kv_start: torch.Tensor | None = None) -> torch.Tensor:
        """kv_start [B] (non-causal only): the first real key of each left-padded row (the encoder's padding)."""
        B, T, D = x.shape
        if causal and kv_start is not None:
            raise ValueError("kv_start (left padding) is supported only with causal=False")
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        pk = pv = None
        if self.prompt is not None:
            pk, pv = self.prompt_kv()
            if self.adapter_mode == "joint":
                # one softmax over [prompt, tokens]: prepended, so that with causal masking every query still sees
                # all prompt keys (the op's causal offset is Tk - Tq = K); with left padding appended instead, so
                # that kv_start masks only the padding (non-causal: the order of the keys does not matter)
                pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
                k = torch.cat((k, pk) if kv_start is not None else (pk, k), dim=1)
                v = torch.cat((v, pv) if kv_start is not None else (pv, v), dim=1)
                pk = pv = None
        out = ops.gated_prompt_attention(q, k, v, pk, pv, self.gate if pk is not None else None, causal=causal,
                                         gate_act=self.gate_act, kv_start=kv_start)
        return self.proj(out.reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))) (timm names)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool = True, act: str = "gelu",
                 norm_eps: float = 1e-6, layer_scale: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = PromptedSelfAttention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden, act)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), causal=causal))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       num_prefix: int) -> torch.Tensor:
    """Resample learned position embeddings [1, num_prefix + gh*gw, D] to another patch grid.

    Prefix (class / register) entries are kept; the grid part is resized with bicubic interpolation with
    anti-aliasing in fp32 (what timm does for dynamic image sizes and when loading at another resolution).
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    if pos.shape[1] != num_prefix + old_grid[0] * old_grid[1]:
        raise ValueError(f"pos_embed has {pos.shape[1]} entries, expected {num_prefix} prefix + "
                         f"{old_grid[0]}x{old_grid[1]} grid")
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    D = pos.shape[-1]
    g = grid.float().reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos.dtype)
    return torch.cat((prefix, g), dim=1)


def pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


# --------------------------------------------------------------------------------------------- adapter plumbing
class PromptAdapterMixin(AdapterMixin):
    """Adapter bookkeeping shared by the ViT and CLIP models.

    Subclasses provide `_adapter_towers()`: {tower name: (list of Blocks, prefix of those blocks' names)}, and
    `_head_prefixes()`: names of task-head parameters that train with the adapter (may be empty).
    """

    adapter_config: dict | None

    def _adapter_towers(self) -> dict:
        raise NotImplementedError

    def _head_prefixes(self) -> tuple[str, ...]:
        return ()

    def _add_tower_adapter(self, tower: str, num_layers: int, prompt_len: int, mode: str, gate_act: str,
                           prompt_init_std: float, arg_name: str = "num_layers") -> None:
        blocks, _ = self._adapter_towers()[tower]
        if not 0 < num_layers <= len(blocks):
            raise ValueError(f"{arg_name} must be in [1, {len(blocks)}] ({tower} blocks), got {num_layers}")
        for blk in blocks[len(blocks) - num_layers:]:
            blk.attn.add_adapter(prompt_len, mode=mode, gate_act=gate_act, prompt_init_std=prompt_init_std)

    def remove_adapter(self) -> None:
        for blocks, _ in self._adapter_towers().values():
            for blk in blocks:
                blk.attn.remove_adapter()
        self.adapter_config = None

    # ---------------------------------------------------------------- adapter (lladapter_ext.adapter)
    def is_adapter_param(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return (leaf in ("prompt", "gate") and ".attn." in name) or self.is_head_param(name)

    def is_head_param(self, name: str) -> bool:
        heads = self._head_prefixes()
        return bool(heads) and name.startswith(heads)

    def adapter_metadata(self) -> dict[str, str]:
        if self.adapter_config is None:
            raise ValueError("save_adapter: the model has no adapter (call add_adapter first)")
        return config_metadata(self.adapter_config)

    def adapter_description(self) -> str:
        return "no adapter" if self.adapter_config is None else super().adapter_description()

    def check_adapter_metadata(self, meta: dict[str, str] | None, tensors: dict, source: str) -> None:
        if meta is None:  # a state dict: the tensors decide
            return
        saved = saved_config(meta)
        if saved is None:
            raise ValueError(f"{source}: not an lladapter adapter file (no adapter metadata)")
        if self.adapter_config is None:
            raise ValueError(f"load_adapter: call add_adapter({', '.join(f'{k}={v}' for k, v in saved.items())}) "
                             f"before loading {source}")
        if saved != config_metadata(self.adapter_config):
            raise ValueError(f"{source}: adapter config {saved} does not match the model's "
                             f"{config_metadata(self.adapter_config)}")


def copy_checked(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
                  rename: dict[str, str]) -> None:
    """Copy a converted state dict into model, strictly (adapter params excluded); errors name the tensor.

    rename maps our names back to the checkpoint's, so messages name what the user's file calls it.
    """
    own = {n: t for n, t in model.state_dict().items()
           if not (n.endswith((".prompt", ".gate")) and ".attn." in n)}
    check_tensors(own, sd, source, display=lambda name: rename.get(name, name))
    with torch.no_grad():
        for name, dst in own.items():
            dst.copy_(sd[name])
