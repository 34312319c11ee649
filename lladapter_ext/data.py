"""Instruction-tuning data: reading, templating, tokenising with loss masks, batching, packing, scoring.

Formats (detected per record, so one file may mix them):
- Alpaca: ``{"instruction": str, "input": str (optional), "output": str}`` rendered with the official Alpaca
  templates (``ALPACA_PROMPT_WITH_INPUT`` / ``ALPACA_PROMPT_NO_INPUT``); the loss covers the output and the EOS
  token appended to it, never the prompt.
- Chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` rendered with the
  tokenizer's chat template when it has one (else the Alpaca layout, see ``chat_segments``); the loss covers the
  assistant turns only.
- Plain text: ``{"text": str}`` records, or a whole ``.txt`` file; the loss covers every token. Long documents are
  split into ``max_seq_len`` windows instead of being truncated.

Files: ``.jsonl`` (one record per line), ``.json`` (an array of records, or JSONL under a .json name) and
``.txt``. Extra keys in a record are ignored (the demo data carries a ``task`` key). A malformed record raises
``DataFormatError`` whose message starts with ``<file>:<line>:``.

Tokenisation: prompt and answer are encoded separately and concatenated, so the label mask is exact and the
answer tokens are exactly the ones generation will produce after the prompt. Labels use -100 (``IGNORE_INDEX``)
on prompt positions; models shift them (position t predicts labels[t + 1]), so labels[0] never counts.

Batching (``Batches``): one epoch is a deterministic function of (seed, epoch): a shuffle, then, when grouping
by length, a sort inside windows of ``group_window`` batches (so one batch holds similar lengths and little
compute goes to padding) and a shuffle of the batch order. The order is drawn over the rows of whole optimizer
steps (effective batch); each step is cut into accumulation micro-batches and per-process slices (what
DistributedSampler does), so 1 or N processes, with or without accumulation, see the same rows per step when
the effective batch is the same. The position (epoch, index) is saved in checkpoints; loading it resumes the
exact order.
"""
from __future__ import annotations

import array
import bisect
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Protocol
from collections.abc import Iterable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# The official Alpaca templates (exact strings; the answer follows "### Response:" directly).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")

_CHAT_ROLES = ("system", "user", "assistant")


class TokenizerLike(Protocol):
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


class DataFormatError(ValueError):
    """A malformed data file or record; the message starts with ``<file>:<line>:``."""


class DataChangedError(ValueError):
    """Resuming on training data whose content differs from the data the checkpoint was trained on."""


# ----------------------------------------------------------------------------------------------------------------
# Reading records


@dataclass(frozen=True)
class Record:
    """One parsed record: ``kind`` is "alpaca", "chat" or "text"; ``source`` is "<file>:<line>"."""
    kind: str
    data: dict
    source: str


def _record_kind(obj, source: str) -> str:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        kind = "chat"
    elif "instruction" in obj or "output" in obj:
        kind = "alpaca"
    elif "text" in obj:
        kind = "text"
    else:
        raise DataFormatError(
            f"{source}: record has keys {sorted(obj)}; expected Alpaca (instruction, input, output), "
            "chat (messages) or plain text (text)")
    _validate(kind, obj, source)
    return kind


def _validate(kind: str, obj: dict, source: str) -> None:
    def need_str(key: str, value, optional: bool = False):
        if value is None and optional:
            return
        if not isinstance(value, str):
            raise DataFormatError(f"{source}: field {key!r} must be a string, got "
                                  f"{'missing' if value is None else type(value).__name__}")

    if kind == "alpaca":
        need_str("instruction", obj.get("instruction"))
        need_str("input", obj.get("input"), optional=True)
        need_str("output", obj.get("output"))
        if not obj["instruction"].strip():
            raise DataFormatError(f"{source}: field 'instruction' is empty")
    elif kind == "text":
        need_str("text", obj.get("text"))
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataFormatError(f"{source}: field 'messages' must be a non-empty list of "
                                  "{role, content} objects, got " + repr(messages)[:80])
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _CHAT_ROLES:
                raise DataFormatError(f"{source}: messages[{i}] must be an object with role one of "
                                      f"{list(_CHAT_ROLES)}, got {repr(m)[:80]}")
            if not isinstance(m.get("content"), str):
                raise DataFormatError(f"{source}: messages[{i}].content must be a string, got "
                                      f"{type(m.get('content')).__name__}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFormatError(f"{source}: 'messages' has no assistant turn, so nothing to train on")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_json_array(path: str, text: str) -> list[tuple[object, int]]:
    """Elements of a top-level JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    out: list[tuple[object, int]] = []
    ws = " \t\n\r"
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == "]" and not out:
            pos += 1
            break
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        out.append((obj, _line_of(text, pos)))
        pos = end
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            pos += 1
            break
        raise DataFormatError(f"{path}:{_line_of(text, pos)}: invalid JSON (expected ',' or ']' in the "
                              "top-level array)")
    if text[pos:].strip():
        raise DataFormatError(f"{path}:{_line_of(text, pos)}: invalid JSON (extra data after the array)")
    return out


def check_data_file(path: str | os.PathLike, what: str = "data file") -> None:
    """Raise unless ``path`` is an existing, readable regular file: FileNotFoundError, IsADirectoryError (a
    directory is not searched for data files) or PermissionError, each naming the path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a directory; give the .jsonl, .json or .txt file(s) in it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what} {path} is not readable (permission denied)")


def read_records(path: str | os.PathLike) -> list[Record]:
    """Parse one data file (.jsonl, .json or .txt) into validated records, each tagged with file:line."""
    path = os.fspath(path)
    check_data_file(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".json", ".txt"):
        raise DataFormatError(f"{path}:1: unsupported file extension {ext!r}; expected .jsonl, .json or .txt")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}:{_line_of_bytes(path, e.start)}: not valid UTF-8 ({e.reason})") from None
    if ext == ".txt":
        if not text.strip():
            raise DataFormatError(f"{path}:1: file is empty")
        return [Record("text", {"text": text}, f"{path}:1")]
    items: list[tuple[object, int]] = []
    if text.lstrip().startswith("["):
        items = _read_json_array(path, text)
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((json.loads(line), lineno))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not items:
        raise DataFormatError(f"{path}:1: no records in file")
    records = []
    for obj, lineno in items:
        source = f"{path}:{lineno}"
        records.append(Record(_record_kind(obj, source), obj, source))
    return records


def _line_of_bytes(path: str, byte_pos: int) -> int:
    with open(path, "rb") as f:
        return f.read(byte_pos).count(b"\n") + 1


# ----------------------------------------------------------------------------------------------------------------
# Templating


def alpaca_prompt(instruction: str, input: str | None = "") -> str:
    """The official Alpaca prompt; the template without the Input block when ``input`` is empty or None."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_segments(messages: Sequence[dict], tokenizer) -> list[tuple[str, bool]]:
    """Render a conversation as (text, trained) segments; concatenated they are the whole rendered text.

    With a chat template: the text before assistant turn i is ``apply_chat_template(messages[:i],
    add_generation_prompt=True)`` and the assistant segment is what ``messages[:i+1]`` adds to it (content plus
    the template's end-of-turn marker). Messages after the last assistant turn carry no loss and are dropped.
    Without a template: the Alpaca layout, the system message (if any) replacing the Alpaca preamble; for one
    user/assistant pair without a system message this is exactly the Alpaca no-input prompt + answer.
    """
    segments: list[tuple[str, bool]] = []
    if has_chat_template(tokenizer):
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(list(messages[:i]), add_generation_prompt=True)
            full = tokenizer.apply_chat_template(list(messages[:i + 1]), add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the tokenizer's chat template is not prefix-stable (rendering more messages "
                                 "changes the text of earlier ones), so assistant turns cannot be masked")
            segments.append((prompt[len(done):], False))
            segments.append((full[len(prompt):], True))
            done = full
        return segments
    system = [m["content"] for m in messages if m["role"] == "system"]
    pending = system[-1] if system else ALPACA_PROMPT_NO_INPUT.split("\n\n", 1)[0]
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for m in messages[:last_assistant + 1]:
        if m["role"] == "user":
            pending += f"\n\n### Instruction:\n{m['content']}\n\n### Response:"
        elif m["role"] == "assistant":
            segments.append((pending, False))
            segments.append((m["content"], True))
            pending = ""
    return segments


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class Example:
    """One training row: token ids, labels (-100 = no loss), and where it came from.

    ``position_ids`` is set only for packed rows (positions restart at 0 for every packed example, which is how
    ``collate`` finds the example boundaries).
    """
    input_ids: list[int]
    labels: list[int]
    source: str
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        """Positions that contribute to the loss under the shift convention (labels[1:] != -100)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


@dataclass
class TokenizeReport:
    """What tokenisation did to the data; ``summary()`` is logged by ``load_dataset``."""
    n_records: int = 0
    n_examples: int = 0
    n_truncated: int = 0
    n_answer_tokens_cut: int = 0
    n_dropped: int = 0
    n_split_documents: int = 0
    truncated_sources: list[str] = field(default_factory=list)
    dropped_sources: list[str] = field(default_factory=list)

    def summary(self, max_seq_len: int) -> str:
        parts = [f"{self.n_records} records -> {self.n_examples} examples (max_seq_len={max_seq_len})"]
        if self.n_truncated:
            parts.append(f"{self.n_truncated} truncated at the end, cutting {self.n_answer_tokens_cut} trained "
                         f"answer tokens (first: {self.truncated_sources[0]})")
        if self.n_dropped:
            parts.append(f"{self.n_dropped} dropped because the prompt alone fills max_seq_len, leaving no "
                         f"answer token (first: {self.dropped_sources[0]})")
        if self.n_split_documents:
            parts.append(f"{self.n_split_documents} plain-text documents longer than max_seq_len split into "
                         "windows")
        return "; ".join(parts)


def _encode(tokenizer, text: str, bos: bool) -> list[int]:
    ids = list(tokenizer.encode(text, bos=bos, eos=False))
    # a template that writes the BOS text itself, plus bos=True, would give two BOS tokens
    if bos and len(ids) >= 2 and tokenizer.bos_id is not None and ids[0] == ids[1] == tokenizer.bos_id:
        ids = ids[1:]
    return ids


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_id; instruction data needs an EOS token after each answer")
    return int(eos)


def record_segments(record: Record, tokenizer) -> list[tuple[list[int], bool]]:
    """Token segments (ids, trained) of an Alpaca or chat record; the first starts with BOS."""
    if record.kind == "alpaca":
        d = record.data
        prompt = alpaca_prompt(d["instruction"], d.get("input"))
        return [(_encode(tokenizer, prompt, bos=True), False),
                (_encode(tokenizer, d["output"], bos=False) + [_eos_id(tokenizer)], True)]
    if record.kind == "chat":
        out = []
        try:
            segments = chat_segments(record.data["messages"], tokenizer)
        except ValueError as e:
            raise DataFormatError(f"{record.source}: {e}") from None
        for i, (text, trained) in enumerate(segments):
            ids = _encode(tokenizer, text, bos=(i == 0))
            if trained and not has_chat_template(tokenizer):
                ids.append(_eos_id(tokenizer))
            elif trained and tokenizer.eos_id is not None and tokenizer.eos_id not in ids:
                ids.append(int(tokenizer.eos_id))  # the template has no end-of-turn token that is EOS
            out.append((ids, trained))
        return out
    raise ValueError(f"{record.source}: record_segments handles alpaca and chat records, got {record.kind!r}")


def tokenize_record(record: Record, tokenizer, max_seq_len: int,
                    report: TokenizeReport | None = None) -> list[Example]:
    """Tokenise one record into training rows (one for instruction data, >= 1 for plain text).

    Instruction rows longer than ``max_seq_len`` keep their first ``max_seq_len`` tokens (the end of the answer
    is cut); a row whose prompt alone fills ``max_seq_len`` has nothing left to learn from and is dropped.
    Plain text is split into consecutive windows of ``max_seq_len`` tokens, every token trained.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    report = report if report is not None else TokenizeReport()
    report.n_records += 1
    if record.kind == "text":
        ids = _encode(tokenizer, record.data["text"], bos=True)
        if tokenizer.eos_id is not None:
            ids.append(int(tokenizer.eos_id))
        windows = [ids[i:i + max_seq_len] for i in range(0, len(ids), max_seq_len)]
        windows = [w for w in windows if len(w) >= 2]  # a 1-token tail has no next-token target
        if len(windows) > 1:
            report.n_split_documents += 1
        rows = [Example(w, list(w), record.source) for w in windows]
        report.n_examples += len(rows)
        return rows
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in record_segments(record, tokenizer):
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    if len(input_ids) > max_seq_len:
        cut = sum(1 for x in labels[max_seq_len:] if x != IGNORE_INDEX)
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        example = Example(input_ids, labels, record.source)
        if example.n_loss_tokens == 0:
            report.n_dropped += 1
            report.dropped_sources.append(record.source)
            return []
        report.n_truncated += 1
        report.n_answer_tokens_cut += cut
        report.truncated_sources.append(record.source)
    else:
        example = Example(input_ids, labels, record.source)
    report.n_examples += 1
    return [example]


# ----------------------------------------------------------------------------------------------------------------
# Packing


def pack_examples(examples: Sequence[Example], max_seq_len: int) -> list[Example]:
    """Pack examples into rows of at most ``max_seq_len`` tokens (best-fit decreasing, deterministic).

    Each packed example keeps its own labels and gets position ids from 0, and its first label is masked (it
    would be predicted from the previous example's last token). Packing is exact: ``collate`` turns the
    position ids into ``segment_ids``, with which the model attends block-diagonally (each example only to its
    own earlier tokens, and to the adapter prompt), so a packed example's logits and loss are those it gets
    alone (up to float summation order).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = len(examples[i])
        if n > max_seq_len:
            raise ValueError(f"{examples[i].source}: example of {n} tokens exceeds max_seq_len={max_seq_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            remaining, b = free.pop(k)
        else:
            remaining, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, b))
    rows = []
    for members in bins:
        members.sort()  # keep the data order inside a row
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in members:
            ex = examples[i]
            ids += ex.input_ids
            labels += [IGNORE_INDEX] + ex.labels[1:]
            pos += list(range(len(ex)))
        rows.append(Example(ids, labels, "+".join(examples[i].source for i in members), pos))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Data set


@dataclass
class TokenizedDataset:
    """Training rows plus what the collate function needs (pad id) and what tokenisation did (report)."""
    examples: list[Example]
    pad_id: int
    max_seq_len: int
    packed: bool = False
    report: TokenizeReport = field(default_factory=TokenizeReport)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)


def data_fingerprint(dataset) -> str:
    """SHA-256 (hex) of a data set's rows: every example's token ids, labels and position ids, in order. It
    changes when the data files, the tokenizer, max_seq_len or packing change what is trained on."""
    h = hashlib.sha256()
    for e in dataset.examples:
        h.update(array.array("q", [len(e.input_ids), -1 if e.position_ids is None else len(e.position_ids)]).tobytes())
        h.update(array.array("q", e.input_ids).tobytes())
        h.update(array.array("q", e.labels).tobytes())
        if e.position_ids is not None:
            h.update(array.array("q", e.position_ids).tobytes())
    return h.hexdigest()


def pad_id_of(tokenizer) -> int:
    """The id used for right padding: the tokenizer's pad id, else EOS, else 0 (padding is masked anyway)."""
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and value >= 0:
            return int(value)
    return 0


def load_dataset(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, max_seq_len: int, *,
                 packing: bool = False) -> TokenizedDataset:
    """Read, render and tokenise data files into a ``TokenizedDataset`` (optionally packed).

    Logs a one-line summary of truncation/dropping at WARNING level when anything was cut, else at INFO.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = TokenizeReport()
    examples: list[Example] = []
    for path in paths:
        for record in read_records(path):
            examples += tokenize_record(record, tokenizer, max_seq_len, report)
    if not examples:
        raise ValueError(f"no trainable examples in {[os.fspath(p) for p in paths]}: "
                         + report.summary(max_seq_len))
    level = logging.WARNING if (report.n_truncated or report.n_dropped) else logging.INFO
    log.log(level, "data: %s", report.summary(max_seq_len))
    if packing:
        examples = pack_examples(examples, max_seq_len)
    return TokenizedDataset(examples, pad_id_of(tokenizer), max_seq_len, packing, report)


# ----------------------------------------------------------------------------------------------------------------
# Collate and batches


def collate(rows: Sequence[Example], pad_id: int, *, pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch: input_ids, labels (-100 on padding), attention_mask (1 = real token), and,
    when the rows are packed, position_ids (padding positions continue counting; they are masked anyway) and
    segment_ids (the index of each token's example in its row, padding one more segment; the model keeps the
    examples of a row from attending to each other)."""
    if not rows:
        raise ValueError("collate: rows is empty")
    width = max(len(r) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    packed = any(r.position_ids is not None for r in rows)
    position_ids = torch.arange(width).repeat(n, 1) if packed else None
    segment_ids = torch.zeros((n, width), dtype=torch.long) if packed else None
    for i, r in enumerate(rows):
        t = len(r)
        input_ids[i, :t] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, :t] = torch.tensor(r.labels, dtype=torch.long)
        attention_mask[i, :t] = 1
        if packed and r.position_ids is not None:
            position_ids[i, :t] = torch.tensor(r.position_ids, dtype=torch.long)
            position_ids[i, t:] = torch.arange(r.position_ids[-1] + 1, r.position_ids[-1] + 1 + width - t)
            segment_ids[i, :t] = torch.cumsum(position_ids[i, :t] == 0, 0) - 1  # a new example at each position 0
        if packed:
            segment_ids[i, t:] = int(segment_ids[i, t - 1]) + 1 if t else 0
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        batch["position_ids"] = position_ids
        batch["segment_ids"] = segment_ids
    return batch


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *,
                group_by_length: bool = True, group_window: int = 16) -> list[list[int]]:
    """The batches of one epoch: lists of ``batch_size`` row indices (an incomplete last batch is dropped).
    A pure function of its arguments, so any process and any resumed run computes the same order.

    With ``group_by_length``: shuffle, sort by length (longest first) inside windows of ``group_window``
    batches, cut into batches, shuffle the batch order. Rows of one batch then have similar lengths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    rng = random.Random(int(seed) * 1_000_003 + int(epoch))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * max(1, group_window)
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


@dataclass
class StepBatch:
    """The data of one optimizer step on this process: ``grad_accum_steps`` local micro-batches, and the number
    of loss tokens in the whole step (all micro-batches, all processes), which normalises the loss."""
    epoch: int
    index: int  # optimizer steps of this epoch done before this one
    micro_batches: list[dict[str, torch.Tensor]]
    n_loss_tokens_global: int
    n_tokens_local: int  # real (non-padding) tokens this process runs, for tokens/s


class Batches:
    """Deterministic, resumable, sharded iteration over optimizer steps.

    The order is drawn over *step batches* of ``effective_batch = micro_batch_size * world_size *
    grad_accum_steps`` rows (``epoch_order``); a step batch is cut into ``grad_accum_steps`` micro-batches of
    ``micro_batch_size * world_size`` rows, and process ``rank`` takes its slice of each. So the rows of every
    optimizer step depend only on (seed, epoch, effective_batch): 1 process x 4 rows, 1 x 2 rows x 2
    accumulation steps and 2 processes x 2 rows train on the same data. Every epoch has the same number of
    steps (``steps_per_epoch``); the rows that do not fill a step are dropped (different rows each epoch).
    """

    def __init__(self, dataset: TokenizedDataset, micro_batch_size: int, *, grad_accum_steps: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0, group_by_length: bool = True,
                 group_window: int = 16, pad_to_multiple_of: int | None = None):
        for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps),
                            ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_window = group_window
        self.pad_to_multiple_of = pad_to_multiple_of
        self.effective_batch = micro_batch_size * world_size * grad_accum_steps
        self._lengths = dataset.lengths
        self._loss_tokens = [e.n_loss_tokens for e in dataset.examples]
        self.steps_per_epoch = len(dataset) // self.effective_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data set has {len(dataset)} rows, fewer than one optimizer step needs "
                f"(micro_batch_size {micro_batch_size} x world_size {world_size} x grad_accum_steps "
                f"{grad_accum_steps} = {self.effective_batch})")
        self.epoch = 0
        self.index = 0
        self._order_cache: tuple[int, list[list[int]]] | None = None
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """``data_fingerprint`` of the data set (computed once), saved in the state so a resume can tell when the
        data changed."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.dataset)
        return self._fingerprint

    def _order(self, epoch: int) -> list[list[int]]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self._lengths, self.effective_batch, self.seed, epoch,
                                                    group_by_length=self.group_by_length,
                                                    group_window=self.group_window))
        return self._order_cache[1]

    def step_rows(self, epoch: int, index: int) -> list[list[int]]:
        """This process's rows of each micro-batch of step ``index`` of ``epoch``."""
        rows = self._order(epoch)[index]
        micro = self.micro_batch_size * self.world_size
        b = self.micro_batch_size
        return [rows[m * micro + self.rank * b: m * micro + (self.rank + 1) * b]
                for m in range(self.grad_accum_steps)]

    def next_step(self) -> StepBatch:
        """The next optimizer step's data; advances the position."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        n_global = sum(self._loss_tokens[i] for i in self._order(self.epoch)[self.index])
        micro, n_local = [], 0
        collate_rows = getattr(self.dataset, "collate", collate)  # a data set may add tensors (e.g. image features)
        for local in self.step_rows(self.epoch, self.index):
            n_local += sum(self._lengths[i] for i in local)
            micro.append(collate_rows([self.dataset[i] for i in local], self.dataset.pad_id,
                                 pad_to_multiple_of=self.pad_to_multiple_of))
        step = StepBatch(self.epoch, self.index, micro, n_global, n_local)
        self.index += 1
        return step

    def __iter__(self) -> Iterator[StepBatch]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "effective_batch": self.effective_batch, "group_by_length": self.group_by_length,
                "group_window": self.group_window, "n_rows": len(self.dataset), "data_sha256": self.fingerprint}

    def load_state_dict(self, state: dict, *, allow_data_change: bool = False) -> None:
        """Resume at a saved position; the order's inputs must match, else the order would differ silently. The
        rows' content must match too (DataChangedError) unless ``allow_data_change``; a state saved before the
        content hash was recorded is not checked."""
        mine = self.state_dict()
        for key in ("seed", "effective_batch", "group_by_length", "group_window", "n_rows"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"cannot resume the data order: {key} was {state[key]} in the checkpoint, "
                                 f"is {mine[key]} now")
        saved = state.get("data_sha256")
        if saved is not None and saved != mine["data_sha256"] and not allow_data_change:
            raise DataChangedError(
                f"the training data changed since the checkpoint was written: the same {mine['n_rows']} rows, but "
                f"their content hash is {mine['data_sha256'][:16]} now, {saved[:16]} in the checkpoint")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation helpers


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
