"""Vision Transformer with LLaMA-Adapter zero-init gated prompts (the paper's ViT / VTAB-1k variant).

A frozen pre-norm ViT (patch embedding, class / register tokens, learned position embeddings that resample to
other image sizes, LayerNorm blocks) whose self-attention goes through `ops.gated_prompt_attention`
(non-causal). `add_adapter(num_layers=L, prompt_len=K)` gives each of the top L blocks a learnable prompt of K
tokens and a per-head gate initialised to zero; the block's own qkv projection maps the prompt to prompt
keys/values (no position embedding, no LayerNorm: the prompt is learned directly in the projection's input
space, as LLaMA-Adapter's adaption prompt is), and

    out_i = softmax(q_i K^T / sqrt(d)) V + tanh(g_h) * softmax(q_i PK^T / sqrt(d)) PV

so with g = 0 the adapted model computes exactly what the frozen one does. `mode="joint"` is the VPT-style
baseline: the same prompt keys/values join the tokens' softmax, with no gate (not zero-init).

Loads timm `VisionTransformer` state dicts: the vit_tiny/small/base_patch16_224 family, the no-class-token
global-average-pool variants (`vit_*_gap_*`), DINOv2-style layer scale and register tokens
(`vit_*_dinov2`, `vit_*_reg4_dinov2`). The layout (module names) is timm's, so `state_dict()` of a timm model
loads with `load_timm_state_dict`.

The prompt plumbing here (`PromptAdapterMixin`: towers of prompted blocks, add/remove) is shared with
lladapter_ext.clip; the adapter methods and file come from lladapter_ext.adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .adapter import AdapterMixin, check_tensors, config_metadata, saved_config

__all__ = [
    "ViTConfig",
    "TIMM_PRESETS",
    "QuickGELU",
    "LayerScale",
    "Mlp",
    "PromptedSelfAttention",
    "Block",
    "PromptAdapterMixin",
    "VisionTransformer",
    "resample_pos_embed",
]

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
        self.prompt: Optional[nn.Parameter] = None
        self.gate: Optional[nn.Parameter] = None
        self.adapter_mode: Optional[str] = None
        self.gate_act = "tanh"

    def add_adapter(self, prompt_len: int, mode: str = "gated", gate_act: str = "tanh",
                    prompt_init_std: float = 1.0) -> None:
        if prompt_len <= 0:
            raise ValueError(f"prompt_len must be positive, got {prompt_len}")
        if mode not in _ADAPTER_MODES:
            raise ValueError(f"mode must be one of {_ADAPTER_MODES}, got {mode!r}")
        if gate_act not in ("tanh", "identity"):
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

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        pk = pv = None
        if self.prompt is not None:
            pk, pv = self.prompt_kv()
            if self.adapter_mode == "joint":
                # prepended prompt keys: one softmax over [prompt, tokens]; with causal masking every query
                # still sees all prompt keys (the op's causal offset is Tk - Tq = K)
                k = torch.cat((pk.expand(B, -1, -1, -1), k), dim=1)
                v = torch.cat((pv.expand(B, -1, -1, -1), v), dim=1)
                pk = pv = None
        out = ops.gated_prompt_attention(q, k, v, pk, pv, self.gate if pk is not None else None, causal=causal,
                                         gate_act=self.gate_act)
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


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


# --------------------------------------------------------------------------------------------- adapter plumbing
class PromptAdapterMixin(AdapterMixin):
    """Adapter bookkeeping shared by the ViT and CLIP models.

    Subclasses provide `_adapter_towers()`: {tower name: (list of Blocks, prefix of those blocks' names)}, and
    `_head_prefixes()`: names of task-head parameters that train with the adapter (may be empty).
    """

    adapter_config: Optional[dict]

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

    def check_adapter_metadata(self, meta: Optional[dict[str, str]], tensors: dict, source: str) -> None:
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


def _copy_checked(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
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


# --------------------------------------------------------------------------------------------- ViT
@dataclass
class ViTConfig:
    img_size: Union[int, tuple] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # position embeddings cover the patches only (DeiT-3, DINOv2 + registers)
    global_pool: str = "token"  # "token" (class token) or "avg" (mean of patch tokens)
    fc_norm: Optional[bool] = None  # final norm after pooling; None: timm's default (on for "avg")
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP-style); also drops the patch-embed bias
    layer_scale: bool = False  # timm init_values (DINOv2)
    norm_eps: float = 1e-6
    act: str = "gelu"
    num_classes: int = 0  # 0: no head, forward returns pooled features

    def __post_init__(self):
        self.img_size = _pair(self.img_size)
        if self.fc_norm is None:  # timm's default: the final norm moves after pooling for average pooling
            self.fc_norm = self.global_pool == "avg"
        self.fc_norm = bool(self.fc_norm)
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        for s in self.img_size:
            if s % self.patch_size:
                raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")

    @property
    def use_fc_norm(self) -> bool:
        return self.fc_norm

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @classmethod
    def from_timm_name(cls, name: str, **overrides) -> "ViTConfig":
        """Config of a timm model name in TIMM_PRESETS (architecture only; weights are loaded separately)."""
        if name not in TIMM_PRESETS:
            raise ValueError(f"unknown timm preset {name!r}; known: {sorted(TIMM_PRESETS)}")
        return cls(**{**TIMM_PRESETS[name], **overrides})

    @classmethod
    def from_timm(cls, model: nn.Module) -> "ViTConfig":
        """Read the architecture of an instantiated timm VisionTransformer."""
        blk = model.blocks[0]
        unsupported = []
        if getattr(model, "attn_pool", None) is not None:
            unsupported.append("attention pooling")
        if not isinstance(blk.attn.q_norm, nn.Identity):
            unsupported.append("qk_norm")
        if model.global_pool not in ("token", "avg"):
            unsupported.append(f"global_pool={model.global_pool!r}")
        if type(blk.mlp).__name__ != "Mlp":
            unsupported.append(f"mlp {type(blk.mlp).__name__}")
        if unsupported:
            raise ValueError(f"unsupported timm ViT features: {', '.join(unsupported)}")
        act = "quick_gelu" if "QuickGELU" in type(blk.mlp.act).__name__ else "gelu"
        D = model.embed_dim
        return cls(img_size=tuple(model.patch_embed.img_size), patch_size=model.patch_embed.patch_size[0],
                   in_chans=model.patch_embed.proj.in_channels, embed_dim=D, depth=len(model.blocks),
                   num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / D,
                   qkv_bias=blk.attn.qkv.bias is not None, class_token=model.cls_token is not None,
                   reg_tokens=model.num_reg_tokens, no_embed_class=model.no_embed_class,
                   global_pool=model.global_pool, fc_norm=not isinstance(model.fc_norm, nn.Identity),
                   pre_norm=not isinstance(model.norm_pre, nn.Identity),
                   layer_scale=not isinstance(blk.ls1, nn.Identity), norm_eps=blk.norm1.eps, act=act,
                   num_classes=model.num_classes)


# architectures as timm defines them (timm/models/vision_transformer.py); num_classes defaults to 1000 there
TIMM_PRESETS: dict[str, dict] = {
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3, num_classes=1000),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6, num_classes=1000),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12, num_classes=1000),
    "vit_base_patch16_gap_224": dict(embed_dim=768, depth=12, num_heads=16, class_token=False, global_pool="avg",
                                     fc_norm=False, num_classes=1000),
    "vit_small_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6,
                                     layer_scale=True, num_classes=0),
    "vit_small_patch14_reg4_dinov2": dict(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6,
                                          layer_scale=True, reg_tokens=4, no_embed_class=True, num_classes=0),
    "vit_base_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12,
                                    layer_scale=True, num_classes=0),
}


class _PatchEmbed(nn.Module):
    """Conv patchify; a module so that the weight is named patch_embed.proj.* as in timm."""

    def __init__(self, in_chans: int, dim: int, patch: int, bias: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class VisionTransformer(PromptAdapterMixin, nn.Module):
    """Pre-norm ViT (timm layout) with optional zero-init gated prompts in its top blocks."""

    ADAPTER_FAMILY = "vit"

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        D = c.embed_dim
        self.patch_embed = _PatchEmbed(c.in_chans, D, c.patch_size, bias=not c.pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if c.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, D)) if c.reg_tokens else None
        n_pos = c.grid[0] * c.grid[1] + (0 if c.no_embed_class else c.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, n_pos, D) * 0.02)
        self.norm_pre = nn.LayerNorm(D, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        hidden = int(D * c.mlp_ratio)
        self.blocks = nn.ModuleList(Block(D, c.num_heads, hidden, c.qkv_bias, c.act, c.norm_eps, c.layer_scale)
                                    for _ in range(c.depth))
        self.norm = nn.Identity() if c.use_fc_norm else nn.LayerNorm(D, eps=c.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=c.norm_eps) if c.use_fc_norm else nn.Identity()
        self.head = nn.Linear(D, c.num_classes) if c.num_classes > 0 else None
        self.adapter_config = None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    # ---------------------------------------------------------------- adapter
    def _adapter_towers(self) -> dict:
        return {"vision": (list(self.blocks), "blocks")}

    def _head_prefixes(self) -> tuple[str, ...]:
        return ("head.",)

    def add_adapter(self, num_layers: int, prompt_len: int = 10, mode: str = "gated", gate_act: str = "tanh",
                    prompt_init_std: float = 1.0) -> None:
        """Give the top num_layers blocks a K=prompt_len prompt and a zero-init per-head gate.

        mode="gated": LLaMA-Adapter zero-init attention; mode="joint": VPT-style prompts in the tokens' softmax.
        """
        if self.adapter_config is not None:
            raise ValueError("the model already has an adapter; call remove_adapter() first")
        self._add_tower_adapter("vision", num_layers, prompt_len, mode, gate_act, prompt_init_std)
        self.adapter_config = dict(num_layers=num_layers, prompt_len=prompt_len, mode=mode, gate_act=gate_act,
                                   num_classes=self.config.num_classes)

    def reset_head(self, num_classes: int) -> None:
        """Replace the task head (zero-initialised, so training starts from uniform logits)."""
        w = self.pos_embed
        self.config.num_classes = num_classes
        self.head = nn.Linear(self.config.embed_dim, num_classes, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.adapter_config is not None:
            self.adapter_config["num_classes"] = num_classes

    # ---------------------------------------------------------------- forward
    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        c = self.config
        return resample_pos_embed(self.pos_embed, c.grid, grid, 0 if c.no_embed_class else c.num_prefix_tokens)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + prefix tokens + position embeddings -> [B, prefix + gh*gw, D]. Any size divisible by the patch."""
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.in_chans:
            raise ValueError(f"images must be [B, {c.in_chans}, H, W], got {list(images.shape)}")
        H, W = images.shape[-2:]
        if H % c.patch_size or W % c.patch_size:
            raise ValueError(f"image size {H}x{W} must be a multiple of patch_size {c.patch_size}")
        x = self.patch_embed(images)  # [B, D, gh, gw]
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pos = self.pos_embed_for(grid)
        if c.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return self.norm_pre(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the blocks and the final norm: [B, prefix + patches, D] (timm's forward_features)."""
        x = self.embed(images)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled feature [B, D] (timm's forward_head(pre_logits=True))."""
        c = self.config
        x = tokens[:, 0] if c.global_pool == "token" else tokens[:, c.num_prefix_tokens:].mean(dim=1)
        return self.fc_norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(images))
        return self.head(x) if self.head is not None else x

    # ---------------------------------------------------------------- checkpoints
    def resize_pos_embed(self, img_size) -> None:
        """Resample the stored position embeddings for a new default image size (e.g. after loading)."""
        c = self.config
        new = ViTConfig(**{**{f.name: getattr(c, f.name) for f in fields(c)}, "img_size": img_size})
        with torch.no_grad():
            self.pos_embed = nn.Parameter(self.pos_embed_for(new.grid).clone())
        self.config = new

    def load_timm_state_dict(self, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a timm VisionTransformer state dict (strict; errors name the tensor).

        A position table for another square grid is resampled to this model's grid (as timm does on load).
        The head loads strictly when the checkpoint has one (build the model with the checkpoint's num_classes,
        then reset_head); a checkpoint without a head (timm num_classes=0) leaves this model's head as it is.

        Meta's DINOv2 layout loads too: `mask_token` (masked-image modelling, unused at inference) is dropped,
        and with registers (`register_tokens`; a position table with a class-token entry, registers inserted
        after the class token without positions) it is converted to timm's no_embed_class form: the class
        token absorbs its position entry, which gives the same sums.
        """
        c = self.config
        sd = dict(sd)
        sd.pop("mask_token", None)
        if "register_tokens" in sd:
            sd["reg_token"] = sd.pop("register_tokens")
            pos, cls = sd.get("pos_embed"), sd.get("cls_token")
            # Meta's table is 1 + a square grid; timm's (no_embed_class) is the square grid alone
            has_cls_entry = (isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[1] > 1
                             and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1)
            if c.no_embed_class and c.class_token and has_cls_entry and isinstance(cls, torch.Tensor):
                sd["cls_token"] = cls + pos[:, :1]
                sd["pos_embed"] = pos[:, 1:]
        pos = sd.get("pos_embed")
        if isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape != self.pos_embed.shape:
            n_prefix = 0 if c.no_embed_class else c.num_prefix_tokens
            n_grid = pos.shape[1] - n_prefix
            side = int(round(math.sqrt(max(n_grid, 0))))
            if side * side == n_grid and pos.shape[-1] == c.embed_dim:
                sd["pos_embed"] = resample_pos_embed(pos, (side, side), c.grid, n_prefix)
        if self.head is None:
            for k in ("head.weight", "head.bias"):
                t = sd.get(k)
                if t is not None and t.numel() > 0:
                    raise ValueError(f"{source}: tensor {k!r} is a classifier head of shape {list(t.shape)} but "
                                     "this model has num_classes=0; set num_classes to load it")
                sd.pop(k, None)
        elif "head.weight" not in sd:
            sd["head.weight"], sd["head.bias"] = self.head.weight.detach(), self.head.bias.detach()
        _copy_checked(self, sd, source, {})

    @classmethod
    def from_timm(cls, model: nn.Module) -> "VisionTransformer":
        """Build from an instantiated timm VisionTransformer (config and weights)."""
        p = next(model.parameters())
        with torch.device("meta"):  # every tensor is overwritten by the load: skip the random init
            ours = cls(ViTConfig.from_timm(model))
        ours = ours.to_empty(device=p.device).to(dtype=p.dtype)
        ours.load_timm_state_dict(model.state_dict(), source=type(model).__name__)
        return ours


