"""The key/value cache of incremental decoding (LlamaForCausalLM.new_cache), and what stays fixed across its steps."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from . import ops

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
        self.row_prompts: RowPrompts | None = None  # serving: one adapter per row (the model's own is off)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[KVCache, int]], room: int) -> KVCache:
        """A cache of the given (cache, row) pairs, each row's keys/values so far (from its kv_start) right-aligned
        at a common length, left-padded, with `room` free positions after it: rows of different caches and lengths
        join one decode batch, and finished rows leave, without changing what any row computes (its RoPE positions
        and the keys it sees stay its own)."""
        if not rows:
            raise ValueError("KVCache.from_rows: no rows")
        spans = []
        for cache, r in rows:
            start = 0 if cache.kv_start is None else int(cache.kv_start[r])
            spans.append((cache, r, start, cache.length - start))
        length = max(n for *_, n in spans)
        first = rows[0][0]
        new = cls.__new__(cls)
        new.batch_size, new.max_len, new.length = len(rows), length + room, length
        shape = (len(rows), new.max_len, *first.k[0].shape[2:])
        new.k = [t.new_zeros(shape) for t in first.k]
        new.v = [t.new_zeros(shape) for t in first.v]
        for j, (cache, r, start, n) in enumerate(spans):
            for dst, src in ((new.k, cache.k), (new.v, cache.v)):
                for layer in range(len(dst)):
                    dst[layer][j, length - n:length] = src[layer][r, start:cache.length]
        dev = first.next_pos.device
        new.kv_start = torch.tensor([length - n for *_, n in spans], dtype=torch.long, device=dev)
        new.next_pos = torch.stack([cache.next_pos[r] for cache, r in rows])
        new.prompt_kv, new.row_prompts = {}, None
        return new

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
        new.row_prompts = None
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


class RowPrompts:
    """Adapter prompts of a batch whose rows use different adapters, or none (serving many adapters on one base).

    `rows[b]` maps each layer that row b's adapter adapts to (pk, pv, phi): its prompt keys/values [1, K, Hkv, d]
    and phi(gate) [H]; an empty mapping is the bare base model. The model runs the word attention once for the whole
    batch with its own adapter off, and `add_to` adds each row's prompt branch scaled by its phi: the fused op's
    result for that row alone, since the two branches have separate softmaxes. Rows are grouped per layer by prompt
    length, so the usual batch (one K) costs one extra op call per adapted layer.
    """

    def __init__(self, rows: Sequence[Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]):
        self.batch_size = len(rows)
        self.groups: dict[int, list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for layer in sorted({i for r in rows for i in r}):
            by_len: dict[int, list[int]] = {}
            for b, r in enumerate(rows):
                if layer in r:
                    by_len.setdefault(r[layer][0].shape[1], []).append(b)
            for members in by_len.values():
                parts = [rows[b][layer] for b in members]
                if all(p[0] is parts[0][0] for p in parts):  # one adapter: its prompt K/V serve every row
                    pk, pv = parts[0][0], parts[0][1]
                else:
                    pk, pv = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
                phi = torch.stack([p[2].float() for p in parts]).view(len(parts), 1, -1, 1)
                index = None if len(members) == len(rows) else torch.tensor(members, device=pk.device)
                self.groups.setdefault(layer, []).append((index, pk, pv, phi))

    def add_to(self, out: torch.Tensor, q: torch.Tensor, layer: int) -> torch.Tensor:
        """out [B, T, H, d] (the word attention) plus each row's gated prompt branch for queries q [B, T, H, d]."""
        if q.shape[0] != self.batch_size:
            raise ValueError(f"RowPrompts: made for {self.batch_size} rows, the batch has {q.shape[0]}")
        for index, pk, pv, phi in self.groups.get(layer, ()):
            qr = q if index is None else q.index_select(0, index)
            no_keys = pk.new_empty((qr.shape[0], 0, *pk.shape[2:]))
            ones = torch.ones(q.shape[2], dtype=torch.float32, device=q.device)
            prompt = ops.gated_prompt_attention(qr, no_keys, no_keys, pk, pv, ones, causal=False,
                                                gate_act="identity")
            prompt = (prompt.float() * phi).to(out.dtype)
            out = out + prompt if index is None else out.index_add(0, index, prompt)
        return out
