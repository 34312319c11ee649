"""Instruction-tuning data: reading, templating, tokenising with loss masks, packing. (Batches for training:
lladapter_ext.batching; exact-match scoring: lladapter_ext.evaluation.)

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
"""
from __future__ import annotations

import array
import bisect
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Protocol
from collections.abc import Sequence


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
