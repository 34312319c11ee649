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


# ----------------------------------------------------------------------------------------------- log-likelihood
def encode_text(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """lm-evaluation-harness's tok_encode: the tokenizer's own BOS convention unless add_special_tokens says, and no
    second BOS for a text that already starts with it."""
    bos = True if add_special_tokens is None else add_special_tokens
    bos_token = getattr(tokenizer, "bos_token", None)
    if add_special_tokens is None and bos_token and text.startswith(bos_token):
        bos = False
    return tokenizer.encode(text, bos=bos)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them for a causal model: trailing spaces of
    the context move to the continuation, the whole text is encoded and cut after the context's tokens (so the
    continuation's tokens are those of the text as a whole); an empty context is the BOS (else EOS) token."""
    if context == "":
        cont = encode_text(tokenizer, continuation, add_special_tokens=False)
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode_text(tokenizer, context + continuation)
    ctx = encode_text(tokenizer, context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def score_continuations(model: torch.nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int = 8, max_length: int | None = None,
                        progress: bool = False) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the sum of the continuation tokens' log-probabilities given the
    context, and whether greedy decoding would have produced exactly them. Requests with the same context run it
    once: its prefill fills a KV cache that all of its continuations continue from, `batch_size` at a time (right
    padding needs no mask: no real token attends to a later one). A sequence longer than max_length (default: the
    model's max_seq_len) loses tokens from the left of its context, as lm-evaluation-harness does."""
    max_length = max_length or model.config.max_seq_len
    device = next(model.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    trimmed = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not cont or not ctx:
            raise ValueError(f"request {i}: the context and the continuation need a token each")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: a continuation of {len(cont)} tokens does not fit the model's "
                             f"{max_length}-token window")
        whole = (ctx + cont)[-(max_length + 1):]
        trimmed.append((whole[:len(whole) - len(cont)], cont))
        groups.setdefault(tuple(ctx), []).append(i)
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    try:
        from tqdm.auto import tqdm
        for ctx, members in tqdm(groups.items(), desc="log-likelihoods", disable=not progress, unit="context"):
            prefix = model.new_cache(1, len(ctx) - 1) if len(ctx) > 1 else None
            if prefix is not None:
                model(torch.tensor([ctx[:-1]], device=device), cache=prefix)
            for s in range(0, len(members), batch_size):
                rows = members[s:s + batch_size]
                conts = [trimmed[i][1] for i in rows]
                T = max(len(c) for c in conts)
                steps = torch.tensor([[ctx[-1]] + c[:-1] + [c[-1]] * (T - len(c)) for c in conts], device=device)
                cache = (prefix.broadcast(len(rows), len(ctx) - 1 + T) if prefix is not None
                         else model.new_cache(len(rows), T))
                logp = torch.log_softmax(model(steps, cache=cache).logits.float(), dim=-1)
                for r, i in enumerate(rows):
                    c = conts[r]
                    target = torch.tensor(c, device=device)
                    lp = logp[r, :len(c)]
                    results[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return results


def read_multiple_choice(path: str | os.PathLike) -> list[dict]:
    """Multiple-choice records (ARC, HellaSwag, MMLU, TruthfulQA style), one JSON object a line: "query" (or
    "question") the context as the model sees it, "choices" the answer texts, "gold" (or "label"/"answer") the
    index of the right one, or its letter A, B, ..."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: not JSON ({e.msg})") from None
            query = obj.get("query", obj.get("question")) if isinstance(obj, dict) else None
            choices = obj.get("choices") if isinstance(obj, dict) else None
            gold = next((obj[k] for k in ("gold", "label", "answer") if k in obj), None) if query is not None else None
            if not isinstance(query, str) or not isinstance(choices, list) or len(choices) < 2 or not all(
                    isinstance(c, str) and c for c in choices):
                raise DataFormatError(f"{where}: a multiple-choice record needs \"query\" (or \"question\") text and "
                                      "\"choices\": at least two non-empty strings")
            if isinstance(gold, str) and len(gold) == 1 and gold.isalpha():
                gold = ord(gold.upper()) - ord("A")
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise DataFormatError(f"{where}: \"gold\" must be the index (or letter) of one of the "
                                      f"{len(choices)} choices, got {gold!r}")
            records.append({"query": query, "choices": choices, "gold": gold})
    if not records:
        raise DataFormatError(f"{os.fspath(path)}: no multiple-choice records")
    return records


def evaluate_multiple_choice(model: torch.nn.Module, tokenizer, path: str | os.PathLike, *,
                             target_delimiter: str = " ", limit: int | None = None, batch_size: int = 8,
                             progress: bool = False) -> dict:
    """Log-likelihood scoring of multiple-choice records (read_multiple_choice), as lm-evaluation-harness scores a
    multiple_choice task: each choice is the continuation target_delimiter + choice of the query; acc picks the
    highest log-likelihood, acc_norm the highest per character of the choice. Returns acc, acc_norm, their
    standard errors, n and per record the log-likelihoods."""
    records = read_multiple_choice(path)[:limit] if limit else read_multiple_choice(path)
    requests, owner = [], []
    for r, rec in enumerate(records):
        for choice in rec["choices"]:
            requests.append(encode_pair(tokenizer, rec["query"], f"{target_delimiter}{choice}"))
            owner.append(r)
    scores = score_continuations(model, requests, batch_size=batch_size, progress=progress)
    per_record: list[list[float]] = [[] for _ in records]
    for r, (ll, _) in zip(owner, scores):
        per_record[r].append(ll)
    hits, hits_norm = [], []
    for rec, lls in zip(records, per_record):
        norm = [ll / len(c) for ll, c in zip(lls, rec["choices"])]
        hits.append(max(range(len(lls)), key=lambda i: (lls[i], -i)) == rec["gold"])
        hits_norm.append(max(range(len(norm)), key=lambda i: (norm[i], -i)) == rec["gold"])

    def mean_stderr(xs):
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        return m, sd / math.sqrt(len(xs))

    acc, acc_se = mean_stderr([float(h) for h in hits])
    acc_norm, acc_norm_se = mean_stderr([float(h) for h in hits_norm])
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_se,
            "n": len(records), "loglikelihoods": per_record}
