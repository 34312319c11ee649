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

The blocks, the prompt plumbing and the checked copy are lladapter_ext.prompted_blocks', shared with
lladapter_ext.clip; the adapter methods and file come from lladapter_ext.adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from .prompted_blocks import Block, PromptAdapterMixin, copy_checked, pair, resample_pos_embed

__all__ = ["ViTConfig", "TIMM_PRESETS", "VisionTransformer"]

# --------------------------------------------------------------------------------------------- ViT
@dataclass
class ViTConfig:
    img_size: int | tuple = 224
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
    fc_norm: bool | None = None  # final norm after pooling; None: timm's default (on for "avg")
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP-style); also drops the patch-embed bias
    layer_scale: bool = False  # timm init_values (DINOv2)
    norm_eps: float = 1e-6
    act: str = "gelu"
    num_classes: int = 0  # 0: no head, forward returns pooled features

    def __post_init__(self):
        self.img_size = pair(self.img_size)
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
    def from_timm_name(cls, name: str, **overrides) -> ViTConfig:
        """Config of a timm model name in TIMM_PRESETS (architecture only; weights are loaded separately)."""
        if name not in TIMM_PRESETS:
            raise ValueError(f"unknown timm preset {name!r}; known: {sorted(TIMM_PRESETS)}")
        return cls(**{**TIMM_PRESETS[name], **overrides})

    @classmethod
    def from_timm(cls, model: nn.Module) -> ViTConfig:
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
        copy_checked(self, sd, source, {})

    @classmethod
    def from_timm(cls, model: nn.Module) -> VisionTransformer:
        """Build from an instantiated timm VisionTransformer (config and weights)."""
        p = next(model.parameters())
        with torch.device("meta"):  # every tensor is overwritten by the load: skip the random init
            ours = cls(ViTConfig.from_timm(model))
        ours = ours.to_empty(device=p.device).to(dtype=p.dtype)
        ours.load_timm_state_dict(model.state_dict(), source=type(model).__name__)
        return ours


