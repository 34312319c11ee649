"""Evaluation of a fine-tuned adapter on held-out data: the loss over answer tokens (and its perplexity), and
greedy generation scored by exact match against each record's reference answer.

``evaluate_text`` is the whole job (what ``lladapter eval`` prints); ``evaluate_loss``, ``eval_prompts`` and
``exact_match`` are its parts, for scripts that need only one. A multi-modal model is evaluated by
``multimodal.evaluate_scienceqa``.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence

import torch

from .batching import collate
from .data import IGNORE_INDEX, DataFormatError, Record, TokenizedDataset, alpaca_prompt, chat_segments, \
    load_dataset, read_records


def normalize_answer(text: str) -> str:
    """Strip and collapse runs of whitespace."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """True when the prediction equals the reference after whitespace normalisation; a JSON reference also
    matches a prediction that parses to the same JSON value (so '{"a": 1}' matches '{"a":1}')."""
    if normalize_answer(prediction) == normalize_answer(reference):
        return True
    ref = reference.strip()
    if ref[:1] in ("{", "["):
        try:
            return json.loads(prediction.strip()) == json.loads(ref)
        except (json.JSONDecodeError, ValueError):
            return False
    return False


def eval_prompts(records: Iterable[Record], tokenizer=None) -> list[tuple[str, str, Record]]:
    """(prompt text, reference answer, record) for generation-based evaluation.

    Alpaca: the Alpaca prompt and the output. Chat: the conversation up to its last assistant turn rendered with
    the chat template (needs ``tokenizer``; add_generation_prompt=True) and that turn's content. Plain-text
    records have no reference answer and raise.
    """
    out = []
    for r in records:
        if r.kind == "alpaca":
            out.append((alpaca_prompt(r.data["instruction"], r.data.get("input")), r.data["output"], r))
        elif r.kind == "chat":
            msgs = r.data["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            if tokenizer is None:
                raise ValueError(f"{r.source}: chat records need the tokenizer to render the prompt")
            prompt = "".join(t for t, _ in chat_segments(msgs[:last + 1], tokenizer)[:-1])
            out.append((prompt, msgs[last]["content"], r))
        else:
            raise DataFormatError(f"{r.source}: plain-text record has no reference answer for exact-match eval")
    return out


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, dataset: TokenizedDataset, *, batch_size: int = 8) -> dict:
    """Mean loss over all answer tokens of ``dataset`` (token-weighted), its perplexity, and the token count.
    (A model sharded by FSDP runs collectives in its forward: every process must call this.)"""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]))  # little padding
        for s in range(0, len(order), batch_size):
            batch = getattr(dataset, "collate", collate)([dataset[i] for i in order[s:s + batch_size]], dataset.pad_id)
            k = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if k == 0:
                continue
            out = model(**{key: v.to(device) for key, v in batch.items()})
            total += float(out.loss.float()) * k
            n += k
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate_loss: the data set has no loss tokens")
    mean = total / n
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": n}


def evaluate_text(model: torch.nn.Module, tokenizer, paths: str | os.PathLike | Sequence[str | os.PathLike],
                  max_seq_len: int, max_new_tokens: int, *, limit: int | None = None, batch_size: int = 8) -> dict:
    """Held-out evaluation on data files (Alpaca or chat records): ``evaluate_loss`` over every record, then
    greedy generation for the first ``limit`` records (all when None), ``batch_size`` prompts at a time, each
    scored by ``exact_match``. Returns loss, perplexity, tokens, exact_match (the fraction), n, correct, and per
    generated record its prompt, reference, prediction and hit (lists), and generation_s."""
    from .generation import generate

    res = evaluate_loss(model, load_dataset(paths, tokenizer, max_seq_len), batch_size=batch_size)
    records: list[Record] = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        records += read_records(path)
    pairs = eval_prompts(records[:limit] if limit else records, tokenizer)
    t0 = time.time()
    predictions: list[str] = []
    for s in range(0, len(pairs), batch_size):
        predictions += generate(model, tokenizer, [p for p, _, _ in pairs[s:s + batch_size]],
                                max_new_tokens=max_new_tokens)
    hits = [exact_match(pred, ref) for pred, (_, ref, _) in zip(predictions, pairs)]
    return dict(res, exact_match=sum(hits) / max(1, len(hits)), n=len(hits), correct=sum(hits),
                prompts=[p for p, _, _ in pairs], references=[r for _, r, _ in pairs], predictions=predictions,
                hits=hits, generation_s=time.time() - t0)
