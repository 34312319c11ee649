"""The key/value cache of incremental decoding (LlamaForCausalLM.new_cache), and what stays fixed across its steps."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import LlamaConfig


class KVCache:
    """Pre-allocated key/value cache for incremental decoding, plus what stays fixed across steps.

    k[i], v[i]: [B, max_len, Hkv, d] for layer i, filled up to `length`. `kv_start` [B] is the index of each
    sample's first real token (left padding; None when no sample is padded), `next_pos` [B] the RoPE position of
    each sample's next token. `prompt_kv[i]` holds layer i's adapter prompt keys/values, computed on the first
    forward that uses this cache and reused afterwards (they do not depend on the tokens).
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: str | torch.device):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"KVCache: batch_size and max_len must be positive, got {batch_size}, {max_len}")
        shape = (batch_size, max_len, config.n_kv_heads, config.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0
        self.kv_start: torch.Tensor | None = None
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def broadcast(self, batch_size: int, max_len: int) -> KVCache:
        """A new cache of `batch_size` rows, each holding this one-row cache's keys and values so far, with room
        for `max_len` positions: several continuations of one context reuse its prefill (the prompt K/V too)."""
        if self.batch_size != 1 or max_len < self.length:
            raise ValueError(f"KVCache.broadcast: needs a one-row cache and max_len >= {self.length}, got batch "
                             f"{self.batch_size}, max_len {max_len}")
        new = KVCache.__new__(KVCache)
        new.k, new.v = [], []
        for src, dst in ((self.k, new.k), (self.v, new.v)):
            for t in src:
                rows = t.new_empty((batch_size, max_len, *t.shape[2:]))
                rows[:, :self.length] = t[:, :self.length]
                dst.append(rows)
        new.batch_size, new.max_len, new.length = batch_size, max_len, self.length
        new.kv_start = None if self.kv_start is None else self.kv_start.expand(batch_size).clone()
        new.next_pos = self.next_pos.expand(batch_size).clone()
        new.prompt_kv = dict(self.prompt_kv)  # [1, K, Hkv, d]: shared by every row
        return new

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of one layer at [length, length + T) and return all keys/values so far."""
        T = k.shape[1]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions needed but the cache holds max_len={self.max_len}")
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]
