"""Task heads, data readers and metrics for the encoder variant (issue 19; the paper's Table 5: NER, SRL, QA).

Models (an `Encoder` in `.encoder`, a linear `.head`; the adapter API of lladapter_ext.adapter):

- `EncoderForTokenClassification`: logits [B, T, num_labels] on the last hidden state (NER, SRL);
  `token_classification_loss` is cross-entropy ignoring -100.
- `EncoderForQuestionAnswering`: start / end logits [B, T]; `span_loss` is the mean of the start and end
  cross-entropies; `best_spans` decodes the best start <= end span of at most max_answer_len tokens inside the
  context tokens.

The head is zero-initialised and counts as a head parameter: it trains with the adapter and is saved in the
adapter file with the prompts and gates. The Table 5 settings: `add_adapter(mode="gated")` + `freeze_base()`
(zero-init gated prompts), `mode="joint"` (P-tuning v2), no adapter + `freeze_base()` (linear probe: only the
head trains), nothing frozen (full fine-tuning).

Data: `read_conll` (token first column, tag last, optional middle columns such as SRL's predicate column),
`read_squad` (SQuAD v1.1 JSON), `token_features` / `qa_features` (tokenized with a `tokenizers.Tokenizer`),
`collate`. Long QA contexts are split into doc-stride windows (the tokenizer's overflow with `stride` tokens of
overlap); a window that does not hold the whole answer is labelled start = end = 0 (the first special token).

Metrics: `span_scores` (CoNLL conlleval chunking: micro precision / recall / F1 over entities, for IOB1, IOB2 /
BIO and IOBES tags alike), `squad_exact_match`, `squad_f1`, `squad_scores` (the official v1.1 normalisation).
"""
from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder
from .prompted_blocks import PromptAdapterMixin

__all__ = ["IGNORE_INDEX", "EncoderForTokenClassification", "EncoderForQuestionAnswering",
           "token_classification_loss", "span_loss", "best_spans", "chunks", "span_scores", "normalize_answer",
           "squad_exact_match", "squad_f1", "squad_scores", "Sentence", "read_conll", "read_tags", "QAExample",
           "read_squad", "TokenFeatures", "token_features", "QAFeature", "qa_features", "collate", "predict_tags",
           "predict_answers"]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------- models
class _EncoderTaskModel(PromptAdapterMixin, nn.Module):
    """An Encoder plus a zero-initialised linear head; the adapter config in the file records the task."""

    ADAPTER_FAMILY = "encoder"
    TASK = ""

    def __init__(self, encoder: Encoder, num_outputs: int):
        super().__init__()
        if num_outputs <= 0:
            raise ValueError(f"the head needs at least one output, got {num_outputs}")
        self.encoder = encoder
        w = encoder.word_embed.weight
        self.head = nn.Linear(encoder.config.embed_dim, num_outputs, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.adapter_config = {**(encoder.adapter_config or {}), **self._task_config()}

    def _task_config(self) -> dict:
        return {"task": self.TASK, "num_labels": self.head.out_features}

    def _adapter_towers(self) -> dict:
        return {"text": (list(self.encoder.layers), "encoder.layers")}

    def _head_prefixes(self) -> tuple[str, ...]:
        return ("head.",)

    def add_adapter(self, num_layers: int, prompt_len: int = 10, mode: str = "gated", gate_act: str = "tanh",
                    prompt_init_std: float = 1.0) -> None:
        """Encoder.add_adapter on the wrapped encoder (gated: zero-init gated prompts; joint: P-tuning v2)."""
        self.encoder.add_adapter(num_layers, prompt_len, mode, gate_act, prompt_init_std)
        self.adapter_config = {**self.encoder.adapter_config, **self._task_config()}

    def remove_adapter(self) -> None:
        self.encoder.remove_adapter()
        self.adapter_config = self._task_config()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids))


class EncoderForTokenClassification(_EncoderTaskModel):
    """Per-token logits [B, T, num_labels] (NER, SRL)."""

    TASK = "token_classification"

    def __init__(self, encoder: Encoder, num_labels: int):
        super().__init__(encoder, num_labels)


class EncoderForQuestionAnswering(_EncoderTaskModel):
    """Extractive QA: forward returns (start_logits, end_logits), each [B, T]."""

    TASK = "question_answering"

    def __init__(self, encoder: Encoder):
        super().__init__(encoder, 2)

    def _task_config(self) -> dict:
        return {"task": self.TASK}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = super().forward(input_ids, attention_mask, token_type_ids).unbind(-1)
        return start, end


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) over the positions whose label is not IGNORE_INDEX (0 when there is none)."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {list(labels.shape)} must match the logits' {list(logits.shape[:-1])}")
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def span_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
              end_positions: torch.Tensor) -> torch.Tensor:
    """(CE(start) + CE(end)) / 2 in fp32; positions [B] index the logits' T axis."""
    T = start_logits.shape[-1]
    for name, p in (("start_positions", start_positions), ("end_positions", end_positions)):
        if bool(((p < 0) | (p >= T)).any()):
            raise ValueError(f"{name} must be in [0, {T}), got {p.tolist()}")
    return (F.cross_entropy(start_logits.float(), start_positions)
            + F.cross_entropy(end_logits.float(), end_positions)) / 2


def best_spans(start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor,
               max_answer_len: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start, end, score) [B] of the span maximising start_logit + end_logit with start <= end,
    end - start < max_answer_len and both ends on context tokens (context_mask [B, T], true on them). A row
    without context tokens gets start = end = -1 and score -inf."""
    s, e = start_logits.float(), end_logits.float()
    B, T = s.shape
    i = torch.arange(T, device=s.device)
    ok = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < max_answer_len)  # [start, end]
    m = context_mask.bool()
    ok = ok[None] & m[:, :, None] & m[:, None, :]
    score = (s[:, :, None] + e[:, None, :]).masked_fill(~ok, float("-inf")).flatten(1)
    best, flat = score.max(dim=1)
    start, end = flat // T, flat % T
    none = torch.isneginf(best)
    return start.masked_fill(none, -1), end.masked_fill(none, -1), best


# --------------------------------------------------------------------------------------------- span F1 (conlleval)
def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if prefix not in ("B", "I", "E", "S") or not sep or not kind:
        raise ValueError(f"tag {tag!r} is neither 'O' nor B-/I-/E-/S- followed by a type")
    return prefix, kind


def chunks(tags: list[str]) -> list[tuple[str, int, int]]:
    """The chunks (type, first, last) of one tag sequence as CoNLL's conlleval finds them: a chunk starts at
    B- or S-, at I-/E- after O, E- or S-, and at any tag whose type differs from the previous tag's; it ends
    before O, B-, S-, after E-/S-, and before a change of type. Works for IOB1, IOB2 (BIO) and IOBES."""
    out, start, prev, prev_kind = [], None, "O", ""
    for i, tag in enumerate([*tags, "O"]):
        p, kind = _split_tag(tag)
        if start is not None and (prev in ("E", "S") or (prev in ("B", "I") and p in ("B", "S", "O"))
                                  or prev_kind != kind):
            out.append((prev_kind, start, i - 1))
            start = None
        if p in ("B", "S") or (p in ("I", "E") and prev in ("E", "S", "O")) or (p != "O" and prev_kind != kind):
            start = i
        prev, prev_kind = p, kind
    return out


def _prf(correct: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def span_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Micro precision / recall / F1 over chunks (a predicted chunk counts when type and both ends match a gold
    one), as conlleval and seqeval's default mode compute them; 0 where a denominator is 0. Also per type:
    {"per_type": {type: {"precision", "recall", "f1", "support"}}}."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sequences but {len(pred)} predicted ones")
    g_set, p_set = set(), set()
    for n, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sequence {n}: {len(g)} gold tags but {len(p)} predicted ones")
        g_set.update((n, *c) for c in chunks(g))
        p_set.update((n, *c) for c in chunks(p))
    correct = g_set & p_set
    prec, rec, f1 = _prf(len(correct), len(p_set), len(g_set))
    per_type = {}
    for kind in sorted({c[1] for c in g_set | p_set}):
        k = [sum(c[1] == kind for c in s) for s in (correct, p_set, g_set)]
        tp, tr, tf = _prf(*k)
        per_type[kind] = dict(precision=tp, recall=tr, f1=tf, support=k[2])
    return dict(precision=prec, recall=rec, f1=f1, correct=len(correct), predicted=len(p_set), gold=len(g_set),
                per_type=per_type)


# --------------------------------------------------------------------------------------------- SQuAD metrics
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, drop punctuation, drop the articles a/an/the, collapse spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def squad_exact_match(prediction: str, answers: list[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def squad_f1(prediction: str, answers: list[str]) -> float:
    """Token F1 of the normalised strings, the best over the gold answers (v1.1: 0 when nothing is shared)."""
    def f1(gold: str) -> float:
        p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
        same = sum((Counter(p) & Counter(g)).values())
        if same == 0:
            return 0.0
        prec, rec = same / len(p), same / len(g)
        return 2 * prec * rec / (prec + rec)
    return max(f1(a) for a in answers)


def squad_scores(examples: list[QAExample], predictions: dict[str, str]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over the examples, as the official v1.1 script reports them; a question
    without a prediction scores 0."""
    if not examples:
        raise ValueError("no examples to score")
    em = f1 = 0.0
    for ex in examples:
        if ex.id in predictions:
            golds = [a for a, _ in ex.answers]
            em += squad_exact_match(predictions[ex.id], golds)
            f1 += squad_f1(predictions[ex.id], golds)
    return dict(exact_match=100 * em / len(examples), f1=100 * f1 / len(examples))


# --------------------------------------------------------------------------------------------- readers
@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    extra: list[list[str]] = field(default_factory=list)  # the middle columns of each token's line
    source: str = ""  # "file:line" of the sentence's first token


def read_tags(path: str | os.PathLike) -> list[str]:
    """A tag list, one a line (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_conll(path: str | os.PathLike, tags: list[str] | None = None) -> list[Sentence]:
    """Sentences of a CoNLL column file: whitespace-separated columns, the token first and the tag last, a blank
    line between sentences, -DOCSTART- lines skipped. Errors name the file and line: fewer than two columns, a
    column count unlike the sentence's first line, a tag that is not O / X-TYPE, or one outside `tags`."""
    path = os.fspath(path)
    allowed = None if tags is None else set(tags)
    out: list[Sentence] = []
    cur: Sentence | None = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if cur is not None:
                    out.append(cur)
                cur = None
                continue
            where = f"{path}:{lineno}"
            if len(cols) < 2:
                raise ValueError(f"{where}: expected a token and a tag (two columns or more), got {line.strip()!r}")
            if cur is None:
                cur = Sentence([], [], [], where)
            elif len(cols) != len(cur.extra[0]) + 2:
                raise ValueError(f"{where}: {len(cols)} columns, but the sentence starting at {cur.source} has "
                                 f"{len(cur.extra[0]) + 2}")
            tag = cols[-1]
            try:
                _split_tag(tag)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if allowed is not None and tag not in allowed:
                raise ValueError(f"{where}: tag {tag!r} is not in the tag set ({', '.join(tags)})")
            cur.words.append(cols[0])
            cur.tags.append(tag)
            cur.extra.append(cols[1:-1])
    if cur is not None:
        out.append(cur)
    return out


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character start in context)
    title: str = ""


def read_squad(path: str | os.PathLike) -> list[QAExample]:
    """Questions of a SQuAD v1.1 JSON file (data -> paragraphs -> context, qas -> id, question, answers). Each
    answer must be the context's text at answer_start; errors name the file and the question id (or the entry's
    place in the file)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read SQuAD JSON ({e})") from e

    def get(obj, key, kind, where):
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"{path}: {where}: missing {key!r}")
        if not isinstance(obj[key], kind):
            raise ValueError(f"{path}: {where}: {key!r} is {type(obj[key]).__name__}, expected {kind.__name__}")
        return obj[key]

    out, seen = [], set()
    for a, art in enumerate(get(doc, "data", list, "top level")):
        title = art.get("title", "") if isinstance(art, dict) else ""
        for p, para in enumerate(get(art, "paragraphs", list, f"data[{a}]")):
            ctx = get(para, "context", str, f"data[{a}].paragraphs[{p}]")
            for q, qa in enumerate(get(para, "qas", list, f"data[{a}].paragraphs[{p}]")):
                qid = get(qa, "id", str, f"data[{a}].paragraphs[{p}].qas[{q}]")
                where = f"question {qid!r}"
                if qid in seen:
                    raise ValueError(f"{path}: {where}: duplicate id")
                seen.add(qid)
                if qa.get("is_impossible"):
                    raise ValueError(f"{path}: {where}: unanswerable questions (SQuAD v2.0) are not supported")
                question = get(qa, "question", str, where)
                answers = []
                for ans in get(qa, "answers", list, where):
                    text = get(ans, "text", str, where)
                    start = get(ans, "answer_start", int, where)
                    if not text or ctx[start:start + len(text)] != text or start < 0:
                        raise ValueError(f"{path}: {where}: answer {text!r} at answer_start={start} does not match "
                                         f"the context there ({ctx[max(start, 0):max(start, 0) + len(text)]!r})")
                    answers.append((text, start))
                if not answers:
                    raise ValueError(f"{path}: {where}: no answers")
                out.append(QAExample(qid, question, ctx, answers, title))
    return out


# --------------------------------------------------------------------------------------------- features
@contextmanager
def _plain(tokenizer, truncation: dict | None = None):
    """The tokenizer without padding and with the given truncation (none by default); restored afterwards."""
    old_t, old_p = tokenizer.truncation, tokenizer.padding
    tokenizer.no_padding()
    if truncation is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(**truncation)
    try:
        yield tokenizer
    finally:
        tokenizer.no_truncation() if old_t is None else tokenizer.enable_truncation(**old_t)
        if old_p is not None:
            tokenizer.enable_padding(**old_p)


@dataclass
class TokenFeatures:
    input_ids: list[int]
    token_type_ids: list[int]
    labels: list[int]  # a word's tag id on its first subtoken, IGNORE_INDEX elsewhere
    first_token: list[int]  # the position of each word's first subtoken
    source: str = ""


def token_features(sentences: list[Sentence], tokenizer, tags: list[str], max_len: int = 512,
                   predicate_column: int | None = None) -> list[TokenFeatures]:
    """Tokenize pre-split sentences (the tokenizer's own truncation and padding are off meanwhile) and put each
    word's tag on its first subtoken. predicate_column (SRL): the index of the middle column marking the
    predicate (not "-" on exactly one token); the predicate word is then encoded as the second sequence of a pair
    (sentence, predicate), as in Shi & Lin (2019). A sentence longer than max_len tokens is an error naming it."""
    tag_id = {t: i for i, t in enumerate(tags)}
    out = []
    with _plain(tokenizer):
        for n, s in enumerate(sentences):
            name = s.source or f"sentence {n}"
            pair = None
            if predicate_column is not None:
                marked = [i for i, cols in enumerate(s.extra) if cols[predicate_column] != "-"]
                if len(marked) != 1:
                    raise ValueError(f"{name}: expected exactly one predicate (a non-'-' value in column "
                                     f"{predicate_column + 2}), found {len(marked)}")
                pair = [s.words[marked[0]]]
            enc = tokenizer.encode(s.words, pair, is_pretokenized=True)
            if len(enc.ids) > max_len:
                raise ValueError(f"{name}: the sentence of {len(s.words)} words is {len(enc.ids)} tokens long, "
                                 f"more than max_len={max_len}")
            labels, first, prev = [], {}, None
            for pos, (w, seq) in enumerate(zip(enc.word_ids, enc.sequence_ids)):
                if seq == 0 and w is not None and w != prev:
                    first[w] = pos
                    if s.tags[w] not in tag_id:
                        raise ValueError(f"{name}: tag {s.tags[w]!r} is not in the tag set")
                    labels.append(tag_id[s.tags[w]])
                else:
                    labels.append(IGNORE_INDEX)
                prev = w if seq == 0 else None
            missing = [w for w in range(len(s.words)) if w not in first]
            if missing:
                raise ValueError(f"{name}: word {s.words[missing[0]]!r} (word {missing[0]}) gives no tokens")
            out.append(TokenFeatures(list(enc.ids), list(enc.type_ids), labels,
                                     [first[w] for w in range(len(s.words))], name))
    return out


@dataclass
class QAFeature:
    example_id: str
    input_ids: list[int]
    token_type_ids: list[int]
    context_mask: list[bool]  # true on the context's tokens
    offsets: list[tuple[int, int]]  # character span in the context of each token ((0, 0) outside it)
    start: int  # the answer's first / last token, 0 when the window does not hold the whole answer
    end: int


def qa_features(examples: list[QAExample], tokenizer, max_len: int = 384, stride: int = 128) -> list[QAFeature]:
    """Windows of (question, context) pairs of at most max_len tokens: a context too long for one window is
    split with `stride` tokens of overlap between windows (the tokenizer's overflow, truncating the context
    only). The first answer is the training label: its character span mapped to tokens in each window that
    holds all of it, else start = end = 0."""
    out = []
    with _plain(tokenizer):
        for ex in examples:
            tokenizer.no_truncation()
            first = tokenizer.encode(ex.question, ex.context)
            if len(first.ids) > max_len:  # windows over the context
                q_len = len(tokenizer.encode(ex.question, "").ids)  # the question and the pair's special tokens
                if max_len - q_len <= stride:
                    raise ValueError(f"question {ex.id!r}: {len(first.ids)} tokens need windows, but the question "
                                     f"takes {q_len} of max_len={max_len} (with the special tokens), leaving "
                                     f"{max_len - q_len} for the context, which must be more than stride={stride}")
                tokenizer.enable_truncation(max_len, stride=stride, strategy="only_second")
                first = tokenizer.encode(ex.question, ex.context)
            text, a_start = ex.answers[0]
            a_end = a_start + len(text)  # exclusive
            touched = False
            for enc in [first, *first.overflowing]:
                ctx = [seq == 1 for seq in enc.sequence_ids]
                offsets = [o if c else (0, 0) for o, c in zip(enc.offsets, ctx)]
                toks = [i for i, c in enumerate(ctx) if c and offsets[i][1] > offsets[i][0]]
                if not toks:
                    raise ValueError(f"question {ex.id!r}: a window holds no context token (max_len={max_len})")
                inside = [i for i in toks if offsets[i][0] < a_end and offsets[i][1] > a_start]
                touched |= bool(inside)
                start = end = 0
                if inside and offsets[toks[0]][0] <= a_start and offsets[toks[-1]][1] >= a_end:
                    start, end = inside[0], inside[-1]
                out.append(QAFeature(ex.id, list(enc.ids), list(enc.type_ids), ctx, offsets, start, end))
            if not touched:
                raise ValueError(f"question {ex.id!r}: the answer {text!r} covers no token of the context")
    return out


def collate(features: list, pad_id: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, token_type_ids and, for TokenFeatures, labels (padded
    with IGNORE_INDEX), for QAFeature start_positions, end_positions and context_mask."""
    T = max(len(f.input_ids) for f in features)

    def pad(rows, value, dtype=torch.long):
        return torch.tensor([list(r) + [value] * (T - len(r)) for r in rows], dtype=dtype, device=device)

    batch = dict(input_ids=pad([f.input_ids for f in features], pad_id),
                 attention_mask=pad([[1] * len(f.input_ids) for f in features], 0),
                 token_type_ids=pad([f.token_type_ids for f in features], 0))
    if isinstance(features[0], TokenFeatures):
        batch["labels"] = pad([f.labels for f in features], IGNORE_INDEX)
    else:
        batch["start_positions"] = torch.tensor([f.start for f in features], device=device)
        batch["end_positions"] = torch.tensor([f.end for f in features], device=device)
        batch["context_mask"] = pad([f.context_mask for f in features], False, torch.bool)
    return batch


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@torch.no_grad()
def predict_tags(model: EncoderForTokenClassification, features: list[TokenFeatures], tags: list[str],
                 batch_size: int = 32) -> list[list[str]]:
    """The predicted tag of every word (the argmax on its first subtoken)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(features), batch_size):
        chunk = features[i:i + batch_size]
        b = collate(chunk, device=dev)
        pred = model(**{k: b[k] for k in _MODEL_INPUTS}).argmax(-1).tolist()
        out += [[tags[pred[r][p]] for p in f.first_token] for r, f in enumerate(chunk)]
    return out


@torch.no_grad()
def predict_answers(model: EncoderForQuestionAnswering, examples: list[QAExample], features: list[QAFeature],
                    max_answer_len: int = 30, batch_size: int = 32) -> dict[str, str]:
    """{question id: answer text}: over each question's windows, the best-scoring span (best_spans) mapped back to
    the context's characters."""
    dev = next(model.parameters()).device
    best: dict[str, tuple[float, int, int]] = {}
    for i in range(0, len(features), batch_size):
        chunk = features[i:i + batch_size]
        b = collate(chunk, device=dev)
        s, e = model(**{k: b[k] for k in _MODEL_INPUTS})
        starts, ends, scores = best_spans(s, e, b["context_mask"], max_answer_len)
        for f, st, en, sc in zip(chunk, starts.tolist(), ends.tolist(), scores.tolist()):
            if st >= 0 and (f.example_id not in best or sc > best[f.example_id][0]):
                best[f.example_id] = (sc, f.offsets[st][0], f.offsets[en][1])
    return {ex.id: ex.context[best[ex.id][1]:best[ex.id][2]] for ex in examples if ex.id in best}
