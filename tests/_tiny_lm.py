"""TEST DOUBLES for the data and training tests: not product code.

- ``ByteTokenizer``: one token per UTF-8 byte (ids 3..258), BOS 1, EOS 2, PAD 0, optional toy chat template.
- ``TinyAdapterLM``: a one-layer causal LM with a LLaMA-Adapter-style gated prompt branch (frozen embedding and
  projections; trainable ``adapter_prompt`` and ``adapter_gate``, the gate zero-initialised) that satisfies the
  model contract the trainer codes against (forward(input_ids, attention_mask, labels, position_ids, cache,
  segment_ids) -> .logits/.loss with the HF shift; adapter_parameters / adapter_state_dict / load_adapter /
  save_adapter;
  config.adapter_len / adapter_layer / gate_act; set_activation_checkpointing).

``make_test_model()`` returns the real ``lladapter_ext.model.LlamaForCausalLM`` with a tiny config (or the double
with LLADAPTER_TEST_MODEL=double), so the trainer's tests run on the real model and the contract stays checkable
against the double.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class ByteTokenizer:
    """Byte-level tokenizer double: text -> [BOS] + (byte + 3 for each UTF-8 byte) (+ [EOS])."""
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259

    def __init__(self, chat_template: str | None = None):
        self.chat_template = chat_template

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("ByteTokenizer has no chat template")
        text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


@dataclass
class TinyConfig:
    vocab_size: int = ByteTokenizer.vocab_size
    dim: int = 32
    n_heads: int = 4
    adapter_len: int = 6
    adapter_layer: int = 1
    gate_act: str = "tanh"


class TinyAdapterLM(nn.Module):
    def __init__(self, config: TinyConfig | None = None, seed: int = 1234):
        super().__init__()
        self.config = config or TinyConfig()
        c = self.config
        g = torch.Generator().manual_seed(seed)  # same frozen weights in every process
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(c.dim, c.dim, bias=False) for _ in range(4))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(c.dim))
                p.requires_grad_(False)
        self.adapter_prompt = nn.Parameter(torch.randn(c.adapter_len, c.dim, generator=g) * 0.02)
        self.adapter_gate = nn.Parameter(torch.zeros(c.n_heads))
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = bool(enabled)

    def _heads(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.config.n_heads, -1).transpose(1, 2)

    def _mix(self, h, attention_mask, segment_ids=None):
        c = self.config
        b, t, d = h.shape
        q, k, v = self._heads(self.wq(h)), self._heads(self.wk(h)), self._heads(self.wv(h))
        scale = 1.0 / math.sqrt(d // c.n_heads)
        scores = (q @ k.transpose(-1, -2)) * scale
        allowed = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        if segment_ids is not None:  # packed rows: block-diagonal
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        words = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        pk = self.wk(self.adapter_prompt).view(1, c.adapter_len, c.n_heads, -1).transpose(1, 2)
        pv = self.wv(self.adapter_prompt).view(1, c.adapter_len, c.n_heads, -1).transpose(1, 2)
        prompt = ((q @ pk.transpose(-1, -2)) * scale).softmax(-1) @ pv
        gate = torch.tanh(self.adapter_gate) if c.gate_act == "tanh" else self.adapter_gate
        out = words + gate.view(1, -1, 1, 1) * prompt
        return h + self.wo(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, cache=None, segment_ids=None):
        if cache is not None:
            raise NotImplementedError("the test double has no KV cache")
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        half = self.config.dim // 2
        freq = torch.exp(-math.log(1e4) * torch.arange(half, device=input_ids.device) / half)
        angle = position_ids[..., None].float() * freq
        h = self.embed(input_ids) + torch.cat([angle.sin(), angle.cos()], -1)
        if self.activation_checkpointing and torch.is_grad_enabled():
            x = checkpoint(self._mix, h, attention_mask, segment_ids, use_reentrant=False)
        else:
            x = self._mix(h, attention_mask, segment_ids)
        logits = x @ self.embed.weight.t()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        return SimpleNamespace(logits=logits, loss=loss)

    # adapter contract
    def adapter_parameters(self):
        return [self.adapter_prompt, self.adapter_gate]

    def adapter_state_dict(self):
        return {"adapter_prompt": self.adapter_prompt.detach().clone(),
                "adapter_gate": self.adapter_gate.detach().clone()}

    def save_adapter(self, path):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in self.adapter_state_dict().items()}, os.fspath(path))

    def load_adapter(self, path_or_state_dict):
        if isinstance(path_or_state_dict, dict):
            state = path_or_state_dict
        else:
            from safetensors.torch import load_file
            state = load_file(os.fspath(path_or_state_dict))
        mine = dict(self.named_parameters())
        if set(state) != {"adapter_prompt", "adapter_gate"}:
            raise KeyError(f"adapter tensors: expected ['adapter_gate', 'adapter_prompt'], got {sorted(state)}")
        with torch.no_grad():
            for name, value in state.items():
                if value.shape != mine[name].shape:
                    raise ValueError(f"{name}: expected shape {tuple(mine[name].shape)}, got {tuple(value.shape)}")
                mine[name].copy_(value)


# The real model with a tiny configuration; the keyword names follow issue 5's LlamaConfig (adjust here if the
# merged config spells them differently).
TINY_LLAMA_KWARGS = dict(vocab_size=ByteTokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=64, adapter_len=6, adapter_layer=1, gate_act="tanh")


def model_kind() -> str:
    kind = os.environ.get("LLADAPTER_TEST_MODEL", "auto")
    if kind not in ("auto", "double", "llama"):
        raise ValueError(f"LLADAPTER_TEST_MODEL must be auto, double or llama, got {kind!r}")
    if kind == "auto":
        try:
            from lladapter_ext.model import LlamaForCausalLM  # noqa: F401
        except ImportError:
            return "double"
        return "llama"
    return kind


def make_test_model(seed: int = 1234) -> nn.Module:
    """A small adapter LM honouring the model contract, identical for a given seed in every process."""
    if model_kind() == "llama":
        from lladapter_ext.model import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_KWARGS)).float()
        # The model's own init (std 0.02) leaves a random 2-layer model nearly insensitive to anything; unit-scale
        # frozen weights (std 1/sqrt(fan_in), embeddings std 1) make it behave more like a trained network, so a
        # few adapter steps move the loss.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad and p.ndim == 2:
                    p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
        return model
    return TinyAdapterLM(seed=seed)
