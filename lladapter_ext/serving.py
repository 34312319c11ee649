"""Many adapters on one base model: the scheduler behind `lladapter serve` (continuous batching, mixed adapters).

An `Engine` holds one frozen base model and any number of adapters (`load_adapter`: our files, run directories,
PEFT, LitGPT and official ones). Each request names an adapter or the base model. A worker thread runs the batch:

- between decode steps, queued requests join (their prompts prefilled together, left-padded) and finished or
  cancelled ones leave; the KV cache is rebuilt then (KVCache.from_rows), each row keeping its own positions;
- every decode step is one forward pass for the whole batch, whatever mix of adapters it holds: the word attention
  runs once, each row's prompt branch is added with its own adapter's prompt keys/values and gate (RowPrompts);
  an adapter's prompt keys/values are projected once, when it is loaded;
- per request: max_tokens, temperature / top_p / seed (its own generator: a seeded request draws what it would
  draw alone), stop strings, a timeout, cancellation (a client that goes away frees its slot at the next step).

Greedy text is the text the request gets alone (tests/test_serve.py checks it against generation.generate).
The HTTP layer (OpenAI's shapes) is lladapter_ext.server.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .generation import _holdback, left_padded, pad_id_of, sample_next
from .kv_cache import KVCache, RowPrompts

__all__ = ["Engine", "ServedAdapter", "GenerationRequest", "QueueFull", "RequestError"]


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class RequestError(ValueError):
    """A request the engine refuses: `param` names the field at fault (OpenAI's error object carries it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ServedAdapter:
    """One servable model: the base (`format` None) or an adapter as served: per adapted layer, its prompt
    keys/values [1, K, Hkv, d] under the base model's projections and phi(gate) [H]. The prompts themselves are not
    kept (the keys/values are all a step reads): 2 K Hkv d numbers per layer against the file's K D, less with
    grouped-query attention (SmolLM2: 2/3), twice as much without."""

    name: str
    source: str = ""
    format: str | None = None
    adapter_len: int = 0
    adapter_layer: int = 0
    gate_act: str = ""
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def is_base(self) -> bool:
        return self.format is None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in layer)

    def describe(self) -> str:
        if self.is_base:
            return f"{self.name}: the base model"
        return (f"{self.name}: {self.format} adapter {self.source} (K={self.adapter_len} prompt tokens in the top "
                f"{self.adapter_layer} layers, {self.gate_act} gate)")


@dataclass
class GenerationRequest:
    """One completion. `on_event(kind, data)` is called from the engine's thread: ("text", piece) for each new piece
    of text (only when `stream`; the whole text is in `text` at the end), then ("done", finish_reason) with
    finish_reason "stop" or "length", or ("error", message)."""

    prompt_ids: list[int]
    adapter: ServedAdapter
    max_tokens: int
    on_event: Callable[[str, object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    timeout: float | None = None
    stream: bool = True
    id: int = field(default_factory=itertools.count().__next__)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    _emitted: int = 0
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating (the client went away): the slot is freed at the next step; no more events."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled


class Engine:
    """The base model, its adapters, the waiting queue and the running batch. `start()` runs the scheduler in a
    thread; `submit` queues a request (thread-safe). `step()` runs one scheduling round in the caller's thread
    (tests and benchmarks drive it directly)."""

    def __init__(self, model, tokenizer, *, base_name: str = "base", max_batch_size: int = 8,
                 max_queue: int = 64, request_timeout: float | None = 600.0):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        if model.config.n_adapted_layers and model.use_adapter:
            model.use_adapter = False  # the model's own adapter (if any) is not served: every row brings its own
        self.model, self.tokenizer = model.eval(), tokenizer
        self.base_name = base_name
        self.max_batch_size, self.max_queue, self.request_timeout = max_batch_size, max_queue, request_timeout
        self.context = model.config.max_seq_len
        self._adapters: dict[str, ServedAdapter] = {base_name: ServedAdapter(base_name)}
        self._queue: deque[GenerationRequest] = deque()
        self._rows: list[GenerationRequest] = []
        self._cache: KVCache | None = None
        self._last_tokens: torch.Tensor | None = None  # [B]: each row's newest token, fed at the next step
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (forward passes of the running batch)
        self.completed = 0
        self.generated_tokens = 0

    # ------------------------------------------------------------------ adapters
    def models(self) -> list[ServedAdapter]:
        with self._cond:
            return list(self._adapters.values())

    def get(self, name: str) -> ServedAdapter | None:
        with self._cond:
            return self._adapters.get(name)

    def load_adapter(self, name: str, path: str | os.PathLike) -> ServedAdapter:
        """Load an adapter (any format interop reads; a run directory gives its adapter file) under `name`. It must
        fit the base model (width, depth, heads); its prompt keys/values are projected now, once."""
        from .checkpoint import find_adapter_file
        from .interop import detect_format, read_adapter

        if not name or not isinstance(name, str):
            raise RequestError("an adapter needs a non-empty name", "name")
        with self._cond:
            if name in self._adapters:
                raise RequestError(f"a model named {name!r} is already being served (unload it first)", "name")
        path = os.fspath(path)
        fmt = detect_format(path)
        if fmt == "lladapter":
            path = find_adapter_file(path)
        adapter = read_adapter(path, fmt)
        c = self.model.config
        if (adapter.dim, adapter.n_layers) != (c.dim, c.n_layers) or adapter.n_heads not in (None, c.n_heads) \
                or adapter.n_kv_heads not in (None, c.n_kv_heads):
            raise RequestError(f"{path}: an adapter for a model of width {adapter.dim}, {adapter.n_layers} layers, "
                               f"{adapter.n_heads} heads; the served model has width {c.dim}, {c.n_layers} layers, "
                               f"{c.n_heads} heads", "path")
        served = ServedAdapter(name, path, adapter.format, adapter.adapter_len, adapter.adapter_layer,
                               adapter.gate_act)
        w = self.model.tok_embeddings.weight
        with torch.no_grad():
            for i, phi in adapter.effective_gates().items():
                attn = self.model.layers[i].attention
                prompt = adapter.prompts[i].to(device=w.device, dtype=attn.wk.compute_dtype).unsqueeze(0)
                pk, pv = attn.project_prompt(prompt, adapter.prompt_projection)
                served.layers[i] = (pk.contiguous(), pv.contiguous(), phi.expand(c.n_heads).to(w.device).clone())
        with self._cond:
            if name in self._adapters:
                raise RequestError(f"a model named {name!r} is already being served (unload it first)", "name")
            self._adapters[name] = served
        return served

    def unload_adapter(self, name: str) -> None:
        """Stop serving `name`: new requests for it are refused; requests already queued or running finish."""
        with self._cond:
            if name == self.base_name:
                raise RequestError("the base model cannot be unloaded", "name")
            if name not in self._adapters:
                raise KeyError(name)
            del self._adapters[name]

    # ------------------------------------------------------------------ requests
    def check(self, req: GenerationRequest) -> None:
        """Refuse what cannot run, naming the field: an empty or too long prompt, max_tokens out of range, bad
        sampling settings."""
        n = len(req.prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty", "prompt")
        if n >= self.context:
            raise RequestError(f"the prompt has {n} tokens; this model's context is {self.context} tokens",
                               "prompt")
        if not 1 <= req.max_tokens <= self.context - n:
            raise RequestError(f"max_tokens must be between 1 and {self.context - n} (the context of "
                               f"{self.context} tokens minus the prompt's {n}), got {req.max_tokens}", "max_tokens")
        if not req.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {req.temperature}", "temperature")
        if not 0 < req.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {req.top_p}", "top_p")

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request (checked first). Raises RequestError, or QueueFull when max_queue requests wait."""
        self.check(req)
        if req.timeout is None:
            req.timeout = self.request_timeout
        if req.seed is not None and req.temperature > 0:
            req._generator = torch.Generator(device=self.model.tok_embeddings.weight.device)
            req._generator.manual_seed(int(req.seed))
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (the queue's bound, --max-queue)",
                                retry_after=1)
            self._queue.append(req)
            self._cond.notify()

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._rows), "queued": len(self._queue)}

    # ------------------------------------------------------------------ the worker
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lladapter-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in [*self._rows, *self._queue]:
            self._fail(req, "the server is shutting down")
        self._rows, self._cache = [], None
        self._queue.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._queue and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    return
            self.step()

    @torch.no_grad()
    def step(self) -> None:
        """One round: drop finished rows, prefill what joins, then one decode step for the batch. A failure
        ends the requests of the batch with an error and leaves the engine ready for new ones."""
        rows = self._rows
        try:
            self._drop_finished()
            with self._cond:
                joining = []
                while self._queue and len(self._rows) + len(joining) < self.max_batch_size:
                    req = self._queue.popleft()
                    if req.timeout is not None and time.monotonic() - req.submitted > req.timeout:
                        self._fail(req, f"the request timed out after {req.timeout:g} s (waiting in the queue)")
                    elif not req.cancelled:
                        joining.append(req)
            rows = self._rows + joining
            if joining:
                self._prefill(joining)
            if self._rows:
                self._decode()
            self._drop_finished()
        except Exception as e:  # noqa: BLE001 - the server must outlive a failing batch, and say why
            for req in rows:
                self._fail(req, f"generation failed: {type(e).__name__}: {e}")
            self._rows, self._cache, self._last_tokens = [], None, None

    def _drop_finished(self) -> None:
        now = time.monotonic()
        for req in self._rows:
            if not req.finished and req.timeout is not None and now - req.submitted > req.timeout:
                self._fail(req, f"the request timed out after {req.timeout:g} s")
        keep = [i for i, req in enumerate(self._rows) if not req.finished]
        if len(keep) == len(self._rows):
            return
        self._regroup([(self._cache, i) for i in keep], [self._rows[i] for i in keep],
                      [self._last_tokens[i] for i in keep])

    def _regroup(self, sources, rows, last_tokens) -> None:
        """The running batch becomes `rows`, their cache rows gathered from `sources`."""
        self._rows = rows
        if not rows:
            self._cache, self._last_tokens = None, None
            return
        room = max(r.max_tokens - len(r.generated) for r in rows)
        self._cache = KVCache.from_rows(sources, room)
        self._cache.row_prompts = RowPrompts([r.adapter.layers for r in rows])
        self._last_tokens = torch.stack(last_tokens)

    def _prefill(self, joining: list[GenerationRequest]) -> None:
        ids, mask = left_padded([r.prompt_ids for r in joining], pad_id_of(self.tokenizer),
                                self.model.tok_embeddings.weight.device)
        cache = self.model.new_cache(*ids.shape)
        cache.row_prompts = RowPrompts([r.adapter.layers for r in joining])
        logits = self.model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
        tokens = self._sample(joining, logits)
        sources = [(self._cache, i) for i in range(len(self._rows))]
        last = [self._last_tokens[i] for i in range(len(self._rows))]
        rows = list(self._rows)
        for b, r in enumerate(joining):
            r.first_token_at = time.monotonic()
            self._accept(r, int(tokens[b]))
            if not r.finished:
                sources.append((cache, b))
                rows.append(r)
                last.append(tokens[b])
        self._regroup(sources, rows, last)

    def _decode(self) -> None:
        B = len(self._rows)
        logits = self.model(self._last_tokens.view(B, 1), cache=self._cache).logits[:, -1]
        self.steps += 1
        tokens = self._sample(self._rows, logits)
        for b, r in enumerate(self._rows):
            self._accept(r, int(tokens[b]))
        self._last_tokens = tokens

    @staticmethod
    def _sample(rows: Sequence[GenerationRequest], logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.float().argmax(-1)
        for b, r in enumerate(rows):
            if r.temperature > 0:
                tokens[b] = sample_next(logits[b:b + 1], r.temperature, r.top_p, r._generator)[0]
        return tokens

    def _accept(self, req: GenerationRequest, token: int) -> None:
        """One new token of req: EOS, stop strings, max_tokens; the new text goes out as an event."""
        if req.finished:
            return
        if token == self.tokenizer.eos_id:
            self._finish(req, "stop")
            return
        req.generated.append(token)
        self.generated_tokens += 1
        text = self.tokenizer.decode(req.generated)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        req.text = text
        upto = len(text) if cut >= 0 or len(req.generated) >= req.max_tokens else _holdback(text, req.stop)
        if req.stream and upto > req._emitted:
            self._emit(req, "text", text[req._emitted:upto])
            req._emitted = upto
        if cut >= 0:
            self._finish(req, "stop")
        elif len(req.generated) >= req.max_tokens:
            self._finish(req, "length")

    def _finish(self, req: GenerationRequest, reason: str) -> None:
        if req.stream and len(req.text) > req._emitted:
            self._emit(req, "text", req.text[req._emitted:])
            req._emitted = len(req.text)
        req.finish_reason = reason
        self.completed += 1
        self._emit(req, "done", reason)

    def _fail(self, req: GenerationRequest, message: str) -> None:
        if req.finished:
            return
        req.finish_reason = "error"
        self._emit(req, "error", message)

    @staticmethod
    def _emit(req: GenerationRequest, kind: str, data) -> None:
        if req.cancelled:
            return
        try:
            req.on_event(kind, data)
        except Exception:  # noqa: BLE001 - a broken listener ends its own request, not the batch
            req.cancel()
