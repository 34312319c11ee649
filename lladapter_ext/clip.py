"""CLIP (OpenAI / open_clip ViT towers) with LLaMA-Adapter zero-init gated prompts, a BPE tokenizer, and a
few-shot classifier built from class-name prompts (the paper's base-to-novel CLIP experiment).

- `CLIPConfig.from_open_clip(cfg)` reads an open_clip model config (e.g. open_clip's model_configs/ViT-B-16.json);
  `CLIP.load_open_clip_state_dict(sd)` loads an open_clip / OpenAI state dict (strict; errors name the tensor).
- Vision tower: conv patchify (no bias), class embedding, learned positions (resampled for other image sizes),
  ln_pre, pre-norm blocks, ln_post on the class token, projection. Non-causal attention.
- Text tower: token + position embeddings, causal pre-norm blocks, ln_final, the feature at the end-of-text
  token (the largest id in each row), projection.
- Both towers' attention goes through `ops.gated_prompt_attention`; `add_adapter(vision_layers=, text_layers=)`
  puts K prompts and zero-init per-head gates in the top layers of either tower or both (see vit.py for the
  math). With gates at zero the adapted model equals the frozen one exactly.
- `CLIPTokenizer`: byte-level BPE over the vocabulary file open_clip ships (bpe_simple_vocab_16e6.txt.gz).
- `ClassNameClassifier`: logits = exp(logit_scale) * cos(image embedding, text embedding of
  template.format(class name)); training the adapter on base classes and evaluating on unseen (novel) class
  names is the base-to-novel protocol; `harmonic_mean` combines the two accuracies.
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import os
import re
from dataclasses import dataclass, field
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._optional import find_spec, optional, require
from .prompted_blocks import Block, PromptAdapterMixin, copy_checked, pair, resample_pos_embed

__all__ = [
    "CLIPVisionConfig",
    "CLIPTextConfig",
    "CLIPConfig",
    "CLIPVisionTower",
    "CLIPTextTower",
    "CLIP",
    "CLIPTokenizer",
    "ClassNameClassifier",
    "harmonic_mean",
    "load_checkpoint_file",
    "OPENAI_IMAGE_MEAN",
    "OPENAI_IMAGE_STD",
]

OPENAI_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------- configs
@dataclass
class CLIPVisionConfig:
    image_size: int | tuple = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64  # heads = width // head_width, as open_clip defines it
    mlp_ratio: float = 4.0
    layer_scale: bool = False  # open_clip ls_init_value is not None

    def __post_init__(self):
        self.image_size = pair(self.image_size)
        if self.width % self.head_width:
            raise ValueError(f"vision width ({self.width}) must be a multiple of head_width ({self.head_width})")

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size


@dataclass
class CLIPTextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    layer_scale: bool = False


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    quick_gelu: bool = False  # OpenAI's checkpoints use QuickGELU (open_clip's "-quickgelu" configs)
    norm_eps: float = 1e-5

    @classmethod
    def from_open_clip(cls, cfg: dict | str | os.PathLike) -> CLIPConfig:
        """Read an open_clip model config (a dict or a path to its JSON file: embed_dim, vision_cfg, text_cfg).

        Options that change the computation and are not implemented here (attentional pooling, timm or HF
        towers, qk-norm, ...) raise a ValueError naming the option.
        """
        if not isinstance(cfg, dict):
            with open(cfg) as f:
                cfg = json.load(f)
        vc, tc = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
        # options with the value they must have here (open_clip's defaults); training-only knobs are ignored
        vision_fixed = dict(attentional_pool=False, no_ln_pre=False, pos_embed_type="learnable",
                            final_ln_after_pool=False, pool_type="tok", timm_model_name=None, qk_norm=False,
                            scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False, scale_attn=False,
                            scale_fc=False, act_kwargs=None, norm_kwargs=None)
        text_fixed = dict(hf_model_name=None, embed_cls=False, no_causal_mask=False, final_ln_after_pool=False,
                          pool_type="argmax", proj_bias=False, proj_type="linear", qk_norm=False,
                          scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False, scale_attn=False,
                          scale_fc=False, act_kwargs=None, norm_kwargs=None, hf_tokenizer_name=None)
        ignored = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "block_type",
                   "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                   "timm_drop_path", "tokenizer_mode", "tokenizer_kwargs", "pad_id", "eos_id",
                   "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
        for where, c, fixed, known in (
                ("vision_cfg", vc, vision_fixed,
                 {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value"}),
                ("text_cfg", tc, text_fixed,
                 {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value"})):
            for k, v in c.items():
                if k in fixed:
                    if v != fixed[k]:
                        raise ValueError(f"open_clip {where}.{k}={v!r} is not supported (only {fixed[k]!r})")
                elif k not in known and k not in ignored:
                    raise ValueError(f"open_clip {where}.{k} is not a known option")
        if not isinstance(vc.get("layers", 12), int):
            raise ValueError(f"open_clip vision_cfg.layers={vc['layers']!r}: ResNet towers are not supported")
        for k in cfg:
            if k not in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "cast_dtype",
                         "init_logit_scale"):
                raise ValueError(f"open_clip config option {k!r} is not supported")
        vision = CLIPVisionConfig(
            image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 16), width=vc.get("width", 768),
            layers=vc.get("layers", 12), head_width=vc.get("head_width", 64), mlp_ratio=vc.get("mlp_ratio", 4.0),
            layer_scale=vc.get("ls_init_value") is not None)
        text = CLIPTextConfig(
            context_length=tc.get("context_length", 77), vocab_size=tc.get("vocab_size", 49408),
            width=tc.get("width", 512), heads=tc.get("heads", 8), layers=tc.get("layers", 12),
            mlp_ratio=tc.get("mlp_ratio", 4.0), layer_scale=tc.get("ls_init_value") is not None)
        return cls(embed_dim=cfg["embed_dim"], vision=vision, text=text, quick_gelu=bool(cfg.get("quick_gelu")))


# --------------------------------------------------------------------------------------------- towers
class CLIPVisionTower(nn.Module):
    def __init__(self, c: CLIPVisionConfig, embed_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.config = c
        W = c.width
        self.conv1 = nn.Conv2d(3, W, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(W) * W ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(1 + c.grid[0] * c.grid[1], W) * W ** -0.5)
        self.ln_pre = nn.LayerNorm(W, eps=norm_eps)
        self.blocks = nn.ModuleList(Block(W, c.heads, int(W * c.mlp_ratio), True, act, norm_eps, c.layer_scale)
                                    for _ in range(c.layers))
        self.ln_post = nn.LayerNorm(W, eps=norm_eps)
        self.proj = nn.Parameter(torch.randn(W, embed_dim) * W ** -0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (H, W multiples of the patch) -> image embedding [B, embed_dim] (not normalised)."""
        c = self.config
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        if images.shape[-2] % c.patch_size or images.shape[-1] % c.patch_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of patch {c.patch_size}")
        x = self.embed(images)
        for blk in self.blocks:
            x = blk(x, causal=False)
        return self.ln_post(x[:, 0]) @ self.proj

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The tokens entering the first block: [class token, patch embeddings] + positions, after ln_pre."""
        x = self.conv1(images)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        pos = resample_pos_embed(self.positional_embedding.unsqueeze(0), self.config.grid, grid, 1)
        return self.ln_pre(torch.cat((cls, x), dim=1) + pos.to(x.dtype))


class CLIPTextTower(nn.Module):
    def __init__(self, c: CLIPTextConfig, embed_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.config = c
        W = c.width
        self.token_embedding = nn.Embedding(c.vocab_size, W)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.randn(c.context_length, W) * 0.01)
        self.blocks = nn.ModuleList(Block(W, c.heads, int(W * c.mlp_ratio), True, act, norm_eps, c.layer_scale)
                                    for _ in range(c.layers))
        self.ln_final = nn.LayerNorm(W, eps=norm_eps)
        self.text_projection = nn.Parameter(torch.randn(W, embed_dim) * W ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (T <= context_length; each row's largest id is its end-of-text token) -> [B, embed_dim]."""
        c = self.config
        if tokens.dim() != 2 or tokens.shape[1] > c.context_length:
            raise ValueError(f"tokens must be [B, T] with T <= {c.context_length}, got {list(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
        T = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:T]
        for blk in self.blocks:
            x = blk(x, causal=True)
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)  # the end-of-text id is the largest in the vocabulary
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection


# --------------------------------------------------------------------------------------------- state-dict names
_BLOCK_RENAMES = (("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_weight", "attn.qkv.weight"),
                  ("attn.in_proj_bias", "attn.qkv.bias"), ("attn.out_proj.", "attn.proj."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2."), ("ls_1.", "ls1."), ("ls_2.", "ls2."))
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's state dicts


def _open_clip_name_to_ours(name: str) -> str:
    if name == "logit_scale":
        return name
    tower, rest = ("visual.", name[len("visual."):]) if name.startswith("visual.") else ("text.", name)
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", rest)
    if m:
        inner = m.group(2)
        for theirs, ours in _BLOCK_RENAMES:
            if inner.startswith(theirs):
                inner = ours + inner[len(theirs):]
                break
        rest = f"blocks.{m.group(1)}.{inner}"
    return tower + rest


def _ours_to_open_clip_name(name: str) -> str:
    """Inverse of _open_clip_name_to_ours (for error messages about tensors a checkpoint lacks)."""
    if name == "logit_scale":
        return name
    tower, rest = name.split(".", 1)
    m = re.match(r"blocks\.(\d+)\.(.*)$", rest)
    if m:
        inner = m.group(2)
        for theirs, ours in _BLOCK_RENAMES:
            if inner.startswith(ours):
                inner = theirs + inner[len(ours):]
                break
        rest = f"transformer.resblocks.{m.group(1)}.{inner}"
    return ("visual." if tower == "visual" else "") + rest


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, a torch.save'd dict (optionally under 'state_dict', with a 'module.'
    prefix from DDP), or OpenAI's TorchScript CLIP archive."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as e:
        if "TorchScript" not in str(e) and "constants.pkl" not in str(e):
            raise
        obj = torch.jit.load(path, map_location="cpu").state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------- the model
class CLIP(PromptAdapterMixin, nn.Module):
    ADAPTER_FAMILY = "clip"

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        act = "quick_gelu" if config.quick_gelu else "gelu"
        self.visual = CLIPVisionTower(config.vision, config.embed_dim, act, config.norm_eps)
        self.text = CLIPTextTower(config.text, config.embed_dim, act, config.norm_eps)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592600345611572))  # log(1 / 0.07)
        self.adapter_config = None

    def _adapter_towers(self) -> dict:
        return {"vision": (list(self.visual.blocks), "visual.blocks"), "text": (list(self.text.blocks), "text.blocks")}

    def add_adapter(self, vision_layers: int = 0, text_layers: int = 0, prompt_len: int = 10, mode: str = "gated",
                    gate_act: str = "tanh", prompt_init_std: float = 1.0) -> None:
        """Zero-init gated prompts (K=prompt_len) in the top vision_layers of the image tower and the top
        text_layers of the text tower (0 leaves a tower frozen as it is)."""
        if self.adapter_config is not None:
            raise ValueError("the model already has an adapter; call remove_adapter() first")
        if vision_layers == 0 and text_layers == 0:
            raise ValueError("add_adapter: give vision_layers and/or text_layers > 0")
        if vision_layers:
            self._add_tower_adapter("vision", vision_layers, prompt_len, mode, gate_act, prompt_init_std,
                                    "vision_layers")
        if text_layers:
            self._add_tower_adapter("text", text_layers, prompt_len, mode, gate_act, prompt_init_std,
                                    "text_layers")
        self.adapter_config = dict(vision_layers=vision_layers, text_layers=text_layers, prompt_len=prompt_len,
                                   mode=mode, gate_act=gate_act)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Image-to-text logits [B_img, B_text] = exp(logit_scale) * cosine similarity."""
        return self.logit_scale.exp() * self.encode_image(images, True) @ self.encode_text(tokens, True).T

    def load_open_clip_state_dict(self, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load an open_clip CLIP / OpenAI CLIP state dict (strict; errors use the checkpoint's tensor names).

        A vision position table for another square grid is resampled to this model's image size.
        """
        converted = {}
        back = {n: _ours_to_open_clip_name(n) for n in self.state_dict()}
        for k, v in sd.items():
            if k in _OPENAI_METADATA and not (isinstance(v, torch.Tensor) and v.is_floating_point()):
                continue
            ours = _open_clip_name_to_ours(k)
            converted[ours], back[ours] = v, k
        pos = converted.get("visual.positional_embedding")
        own_pos = self.visual.positional_embedding
        if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape != own_pos.shape \
                and pos.shape[1] == own_pos.shape[1]:
            side = int(round((pos.shape[0] - 1) ** 0.5))
            if side * side == pos.shape[0] - 1:
                converted["visual.positional_embedding"] = resample_pos_embed(
                    pos.unsqueeze(0), (side, side), self.config.vision.grid, 1)[0]
        copy_checked(self, converted, source, back)

    @classmethod
    def from_open_clip(cls, model: nn.Module, config: dict | CLIPConfig) -> CLIP:
        """Build from an instantiated open_clip CLIP model and its config (dict as open_clip's JSON, or ours)."""
        cfg = config if isinstance(config, CLIPConfig) else CLIPConfig.from_open_clip(config)
        ours = cls(cfg)
        ours.load_open_clip_state_dict(model.state_dict(), source=type(model).__name__)
        return ours


# --------------------------------------------------------------------------------------------- tokenizer
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: printable Latin-1 bytes map to themselves, the other 68 bytes to
    code points 256, 257, ... in byte order, so every byte is one visible, non-space character.

    The dict lists the printable bytes first, then the remapped ones: that order is the order of the first 256
    vocabulary ids.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), 256)))
    table = {b: chr(b) for b in printable}
    remapped = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(remapped)})
    return table


def default_vocab_path() -> str:
    """open_clip's bpe_simple_vocab_16e6.txt.gz (the vocabulary of OpenAI's CLIP), found in its package dir."""
    spec = find_spec("open_clip", "CLIP's BPE vocabulary (else pass vocab_path=, the bpe_simple_vocab_16e6.txt.gz "
                     "file)")
    if not spec.submodule_search_locations:
        raise FileNotFoundError("CLIP BPE vocabulary: open_clip is not a package directory; pass vocab_path=")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}")
    return path


class CLIPTokenizer:
    """CLIP's byte-level BPE (49408 ids: 256 bytes, 256 end-of-word bytes, 48894 merges, <|startoftext|>,
    <|endoftext|>), lower-cased, with words ending in '</w>'.

    Text is cleaned as CLIP does (ftfy.fix_text when ftfy is installed, HTML entities unescaped twice,
    whitespace collapsed), lower-cased, split into words by CLIP's pattern, and each word's UTF-8 bytes are
    merged greedily by merge rank. Special-token strings in the text are ordinary text (never control tokens).
    """

    # special-token strings inside the text are not parsed: they tokenize as ordinary characters
    _PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    NUM_MERGES = 49152 - 256 - 2

    def __init__(self, vocab_path: str | None = None, context_length: int = 77):
        regex = require("regex", "the CLIP tokenizer")
        path = vocab_path or default_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + self.NUM_MERGES]]  # line 0 is a version header
        if len(merges) != self.NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path}: expected {self.NUM_MERGES} merge pairs after the header line")
        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {u: b for b, u in self.byte_encoder.items()}
        alphabet = list(self.byte_encoder.values())
        vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.merges = merges
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.sot_token_id = self.encoder["<|startoftext|>"]
        self.eot_token_id = self.encoder["<|endoftext|>"]
        self.context_length = context_length
        self._word_re = regex.compile(self._PATTERN, regex.IGNORECASE)
        self._bpe_cached = functools.lru_cache(maxsize=65536)(self._bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @staticmethod
    def clean(text: str) -> str:
        ftfy = optional("ftfy")
        if ftfy is not None:
            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return re.sub(r"\s+", " ", text).strip().lower()

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Split a byte-encoded word into BPE tokens: repeatedly merge the adjacent pair of lowest rank."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranks = [self.merge_rank.get(pair) for pair in zip(parts, parts[1:])]
            known = [r for r in ranks if r is not None]
            if not known:
                break
            first, second = self.merges[min(known)]
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without start/end tokens."""
        ids = []
        for word in self._word_re.findall(self.clean(text)):
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe_cached(chars))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray()
        for ch in text.replace("</w>", " "):
            raw.append(self.byte_decoder[ch]) if ch in self.byte_decoder else raw.extend(ch.encode("utf-8"))
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """[len(texts), context_length] int64: <|startoftext|> ids <|endoftext|>, zero-padded; a text too long
        is cut and its last kept position becomes <|endoftext|> (so the text tower's pooling still finds it)."""
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for r, t in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(t) + [self.eot_token_id]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot_token_id
            out[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# --------------------------------------------------------------------------------------------- few-shot head
def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b): the base-to-novel summary (0 when both are 0)."""
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


class ClassNameClassifier(nn.Module):
    """Zero-/few-shot classifier whose class weights are the text embeddings of class-name prompts.

    logits[b, c] = exp(logit_scale) * cos(image_embedding(b), text_embedding(template.format(name_c))).
    With a text adapter the class embeddings are recomputed (with gradients) each call; otherwise they are
    computed once per class list and cached. Nothing here has parameters of its own: training changes only the
    adapter's prompts and gates, so the classifier applies to class names never seen in training.
    """

    def __init__(self, clip: CLIP, tokenizer: CLIPTokenizer, template: str = "a photo of a {}."):
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the class name, got {template!r}")
        self.clip, self.tokenizer, self.template = clip, tokenizer, template
        self._cache: dict[tuple, torch.Tensor] = {}

    def _text_adapted(self) -> bool:
        return any(b.attn.prompt is not None for b in self.clip.text.blocks)

    def class_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings [C, embed_dim] of the class-name prompts.

        Without a text adapter they are cached per (class list, device); call `clear_cache()` after changing
        the text tower's weights.
        """
        tokens = self.tokenizer([self.template.format(n.replace("_", " ")) for n in class_names],
                                context_length=self.clip.config.text.context_length)
        tokens = tokens.to(self.clip.logit_scale.device)
        if self._text_adapted():  # the text tower changes as the adapter trains: never cache
            return self.clip.encode_text(tokens, normalize=True)
        key = (tuple(class_names), str(tokens.device))
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self.clip.encode_text(tokens, normalize=True)
        return self._cache[key]

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(self, images: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        text = self.class_embeddings(class_names)
        return self.clip.logit_scale.exp() * self.clip.encode_image(images, normalize=True) @ text.T

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 batch_size: int = 64) -> float:
        """Top-1 accuracy over class_names (labels index into class_names)."""
        text = self.class_embeddings(class_names)
        correct = 0
        for i in range(0, images.shape[0], batch_size):
            img = self.clip.encode_image(images[i:i + batch_size], normalize=True)
            correct += int(((img @ text.T).argmax(-1) == labels[i:i + batch_size].to(img.device)).sum())
        return correct / max(images.shape[0], 1)
