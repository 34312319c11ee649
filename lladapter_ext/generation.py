"""Text generation with a KV cache for LlamaForCausalLM.

Prompts of different lengths run as one left-padded batch: each sample's first real token gets RoPE position 0 and
padding keys are masked (attention kv_start), so a batch gives the same tokens as one-by-one generation. The
adapter prompt keys/values of every adapted layer are computed once per call (on the prefill; the KVCache keeps
them) since they do not depend on the tokens.

    texts = generate(model, tokenizer, ["Tell me about alpacas."], max_new_tokens=64, temperature=0.1, top_p=0.75,
                     seed=0, stop=["\\n\\n"], stream=lambda i, piece: print(piece, end=""))
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["generate", "generate_tokens", "sample_next", "render_prompts", "PROMPT_STYLES"]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits [B, V]: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0.0:
        return logits.max(-1).indices  # (argmax: the same first index of the max, ~2x slower on a CPU row)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts (id lists) as one left-padded batch [B, L] on device, and its attention mask (None when no prompt is
    padded): each prompt's last token is in the last column, where decoding continues."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
    return ids.to(device), (mask.to(device) if bool((mask == 0).any()) else None)


def pad_id_of(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS, else 0 (always masked out)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)


@torch.no_grad()
def generate_tokens(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
                    pad_id: int = 0, on_token: Callable[[int, int], bool] | None = None,
                    model_kwargs: dict | None = None) -> list[list[int]]:
    """Generate up to max_new_tokens ids after each prompt (a list of id lists), batched and left-padded.

    A sample stops at eos_id (not included in its output) or when on_token(sample, token_id) returns True
    (the token is kept). model_kwargs go to every forward call (e.g. a multi-modal model's image_features, one
    row per prompt). Returns the new ids of each sample.

    The model's context (config.max_seq_len) bounds prompt + generated tokens: a prompt longer than the context
    is refused (ValueError naming both lengths); when prompt + max_new_tokens exceeds it, a warning says so and
    generation stops at the context length (positions past it were never trained and give garbage).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompts = [list(map(int, p)) for p in prompt_ids]
    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty (no tokens); encode with bos=True or give some text")
    B = len(prompts)
    out: list[list[int]] = [[] for _ in range(B)]
    L = max(len(p) for p in prompts)
    context = getattr(getattr(model, "config", None), "max_seq_len", None)
    if context is not None:
        longest = max(range(B), key=lambda i: len(prompts[i]))
        if L > context:
            raise ValueError(f"prompt {longest} has {L} tokens, more than the model's context of {context} tokens "
                             "(max_seq_len): shorten it")
        if L + max_new_tokens > context:
            warnings.warn(f"prompt {longest} has {L} tokens and max_new_tokens is {max_new_tokens}, which exceeds the "
                          f"model's context of {context} tokens (max_seq_len): generating at most {context - L} "
                          "tokens", stacklevel=2)
            max_new_tokens = context - L
    if max_new_tokens == 0:
        return out
    dev = model.tok_embeddings.weight.device
    ids, mask = left_padded(prompts, pad_id, dev)

    gen = None
    if seed is not None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, L + max_new_tokens)
        extra = dict(model_kwargs or {})
        logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1, **extra).logits[:, -1]
        done = [False] * B
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, gen)
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if eos_id is not None and t == eos_id:
                    done[b] = True
                    continue
                out[b].append(t)
                if on_token is not None and on_token(b, t):
                    done[b] = True
            if all(done) or step == max_new_tokens - 1:
                break
            logits = model(nxt.view(B, 1), cache=cache, **extra).logits[:, -1]
    finally:
        model.train(was_training)
    return out


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the prefix of text that is safe to stream: no incomplete UTF-8 character at the end and no
    tail that could still grow into a stop string."""
    n = len(text)
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    safe = n
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k:n] == s[:k]:
                safe = min(safe, n - k)
                break
    return safe


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop: Sequence[str] | None = None,
             stream: Callable[[int, str], None] | None = None, model_kwargs: dict | None = None) -> list[str]:
    """Continue each prompt; returns the generated texts (without the prompt, the EOS token or the stop string).

    temperature 0 is greedy; otherwise sampling with top_p, reproducible with seed. A sample stops at the
    tokenizer's EOS, at the first occurrence of any string in stop (cut there), or after max_new_tokens.
    stream(i, piece) is called with each new piece of text of prompt i as it is generated (pieces concatenate to
    the returned text). model_kwargs go to every forward call (see generate_tokens).
    """
    if isinstance(prompts, str):
        raise TypeError("generate: prompts must be a list of strings, got a single str")
    stops = [s for s in (stop or []) if s]
    prompt_ids = [tokenizer.encode(p, bos=True) for p in prompts]
    texts = [""] * len(prompts)
    emitted = [0] * len(prompts)
    ids_so_far: list[list[int]] = [[] for _ in prompts]
    track = bool(stops) or stream is not None

    def on_token(b: int, t: int) -> bool:
        ids_so_far[b].append(t)
        text = tokenizer.decode(ids_so_far[b])
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        texts[b] = text
        if stream is not None:
            upto = len(text) if cut >= 0 else _holdback(text, stops)
            if upto > emitted[b]:
                stream(b, text[emitted[b]:upto])
                emitted[b] = upto
        return cut >= 0

    new_ids = generate_tokens(model, prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              eos_id=tokenizer.eos_id, pad_id=pad_id_of(tokenizer),
                              on_token=on_token if track else None, model_kwargs=model_kwargs)
    if not track:
        return [tokenizer.decode(ids) for ids in new_ids]
    for b in range(len(prompts)):  # flush what was held back when the sample ended
        if stream is not None and len(texts[b]) > emitted[b]:
            stream(b, texts[b][emitted[b]:])
            emitted[b] = len(texts[b])
    return texts


PROMPT_STYLES = ("alpaca", "chat", "raw", "choices")


def render_prompts(prompts: Sequence[str], tokenizer=None, style: str = "alpaca", *, input: str = "",
                   choices: Sequence[str] | None = None) -> list[str]:
    """The texts to generate from, as the model was fine-tuned to see them: "alpaca" (the Alpaca template with
    ``input`` as every prompt's Input field), "chat" (the tokenizer's chat template, one user turn, generation
    prompt added), "raw" (as given) or "choices" (a multiple-choice question with ``choices``, the multi-modal
    adapter's format)."""
    if style == "alpaca":
        from .data import alpaca_prompt
        return [alpaca_prompt(p, input) for p in prompts]
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("style 'chat': the tokenizer has no chat template")
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                for p in prompts]
    if style == "raw":
        return list(prompts)
    if style == "choices":
        if not choices:
            raise ValueError("style 'choices': give the answer choices")
        from .mm_data import MCQuestion, format_question
        return [format_question(MCQuestion("prompt", p, list(choices), 0)) for p in prompts]
    raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}")
