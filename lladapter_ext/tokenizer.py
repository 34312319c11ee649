"""Tokenizers for LLaMA-family checkpoints, behind one small interface.

Sources (load_tokenizer picks by path):
- SentencePiece `tokenizer.model` (Meta / Mistral style), via the sentencepiece library;
- Hugging Face `tokenizer.json` (+ tokenizer_config.json / chat_template.jinja), via the tokenizers library;
- the vocabulary embedded in a GGUF file: GPT-2-style byte-level BPE (tokens + merges, the pre-tokenizer named by
  tokenizer.ggml.pre) or SentencePiece-style BPE (tokens + scores, byte fallback), rebuilt as a tokenizers BPE.

Interface: encode(text, bos=True, eos=False) -> ids, decode(ids) -> str, bos_id, eos_id, pad_id, vocab_size,
chat_template (str or None), apply_chat_template(messages, add_generation_prompt=True) -> str.

BOS: `encode(text, bos=True)` adds the BOS token when the tokenizer's own convention adds one (`add_bos`: true
for SentencePiece / LLaMA tokenizers, read from the file otherwise, e.g. false for SmolLM2); bos=False never adds
it. eos=True always appends EOS.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Sequence

__all__ = ["Tokenizer", "load_tokenizer"]

PathLike = str | os.PathLike


class Tokenizer:
    """A tokenizer with BOS/EOS handling and an optional chat template; see the module docstring."""

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 add_bos: bool = True, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, special_ids: Sequence[int] = (), source: str = ""):
        self._backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_token = bos_token if bos_token is not None else self._piece(bos_id)
        self.eos_token = eos_token if eos_token is not None else self._piece(eos_id)
        self._special = {i for i in (bos_id, eos_id, pad_id, *special_ids) if i is not None}
        self.source = source

    # ---------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size()

    def _piece(self, i: int | None) -> str | None:
        return None if i is None else self._backend.id_to_piece(i)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        ids = list(self._backend.encode(text))
        if bos and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError("encode: eos=True but this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ids; skip_special drops BOS/EOS/pad and the file's control tokens."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special]
        return self._backend.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.piece_to_id(token)

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render the file's chat template (jinja2, sandboxed) with messages, bos_token, eos_token."""
        if self.chat_template is None:
            raise ValueError(f"apply_chat_template: this tokenizer ({self.source}) has no chat template")
        return _render_chat(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)

    def __repr__(self):
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


def _render_chat(template: str, **context) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters.setdefault("tojson", lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw))
    return env.from_string(template).render(**context)


# --------------------------------------------------------------------------------------------- backends
class _SentencePieceBackend:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot load SentencePiece model: {e}") from e

    def vocab_size(self):
        return self.sp.get_piece_size()

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(ids)

    def id_to_piece(self, i):
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece):
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


class _TokenizersBackend:
    def __init__(self, tok):
        self.tok = tok

    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i):
        return self.tok.id_to_token(i)

    def piece_to_id(self, piece):
        return self.tok.token_to_id(piece)


# --------------------------------------------------------------------------------------------- loading
def load_tokenizer(path: PathLike) -> Tokenizer:
    """Tokenizer from a tokenizer.model / tokenizer.json file, a checkpoint directory, or a .gguf file."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            return _load_hf_dir(p)
        if (p / "tokenizer.model").exists():
            return _load_sentencepiece(p / "tokenizer.model", p)
        raise FileNotFoundError(f"{p}: no tokenizer.json or tokenizer.model in this directory")
    if not p.exists():
        raise FileNotFoundError(f"load_tokenizer: {p} does not exist")
    if p.suffix.lower() == ".gguf":
        return _load_gguf(p)
    if p.name.endswith(".json"):
        return _load_hf_dir(p.parent, p)
    return _load_sentencepiece(p, p.parent)


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except Exception as e:
        raise ValueError(f"{path}: cannot parse JSON: {e}") from e


def _chat_template_of(d: Path, tcfg: dict) -> str | None:
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    ct = tcfg.get("chat_template")
    if isinstance(ct, list):  # named templates: use the default one
        named = {t.get("name"): t.get("template") for t in ct}
        ct = named.get("default") or next(iter(named.values()), None)
    if ct is None and (d / "chat_template.json").exists():
        ct = _read_json(d / "chat_template.json").get("chat_template")
    return ct


def _load_sentencepiece(model_file: Path, d: Path) -> Tokenizer:
    be = _SentencePieceBackend(model_file)
    tcfg = _read_json(d / "tokenizer_config.json")
    sp = be.sp
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    pad = sp.pad_id() if sp.pad_id() >= 0 else None
    return Tokenizer(be, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=bool(tcfg.get("add_bos_token", True)),
                     chat_template=_chat_template_of(d, tcfg), source=str(model_file))


def _load_hf_dir(d: Path, tok_file: Path | None = None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok_file = tok_file or d / "tokenizer.json"
    try:
        tok = HFTokenizer.from_file(str(tok_file))
    except Exception as e:
        raise ValueError(f"{tok_file}: cannot load tokenizer: {e}") from e
    tcfg = _read_json(d / "tokenizer_config.json")
    mcfg = _read_json(d / "config.json")
    be = _TokenizersBackend(tok)

    def tid(key_token, key_id):
        s = _token_str(tcfg.get(key_token))
        if s is not None:
            i = tok.token_to_id(s)
            if i is None:
                raise ValueError(f"{d / 'tokenizer_config.json'}: {key_token} {s!r} is not in {tok_file.name}")
            return i
        v = mcfg.get(key_id)
        if isinstance(v, list):
            v = v[0] if v else None
        return v

    bos, eos, pad = tid("bos_token", "bos_token_id"), tid("eos_token", "eos_token_id"), tid("pad_token",
                                                                                            "pad_token_id")
    if "add_bos_token" in tcfg:
        add_bos = bool(tcfg["add_bos_token"])
    else:  # does the tokenizer's own post-processor add BOS?
        probe = tok.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and bool(probe) and probe[0] == bos
    specials = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    return Tokenizer(be, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos,
                     chat_template=_chat_template_of(d, tcfg), special_ids=specials, source=str(tok_file))


# --------------------------------------------------------------------------------------------- GGUF vocab
# Pre-tokenizer splits named by tokenizer.ggml.pre (llama.cpp's names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"}

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


def gguf_field(reader, key: str, default=None):
    """The value of metadata field `key` of an open gguf.GGUFReader, or default when the file has none."""
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _load_gguf(path: Path) -> Tokenizer:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read GGUF file: {e}") from e
    return tokenizer_from_gguf_reader(reader, path)


def tokenizer_from_gguf_reader(reader, path: PathLike) -> Tokenizer:
    """Tokenizer from an open gguf.GGUFReader's metadata (path is for messages)."""
    kind = gguf_field(reader, "tokenizer.ggml.model")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError(f"{path}: no embedded vocabulary (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    pad = gguf_field(reader, "tokenizer.ggml.padding_token_id")
    template = gguf_field(reader, "tokenizer.chat_template")
    if kind == "gpt2":
        merges = gguf_field(reader, "tokenizer.ggml.merges")
        if merges is None:
            raise ValueError(f"{path}: GPT-2-style vocabulary without tokenizer.ggml.merges")
        tok = _byte_level_bpe(tokens, merges, types, gguf_field(reader, "tokenizer.ggml.pre", "default"))
        add_bos_default = False
    elif kind == "llama":
        scores = gguf_field(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise ValueError(f"{path}: SentencePiece-style vocabulary without tokenizer.ggml.scores")
        unk = gguf_field(reader, "tokenizer.ggml.unknown_token_id", 0)
        tok = _sentencepiece_bpe(tokens, scores, types, unk,
                                 bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True)))
        add_bos_default = True
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported ('gpt2', 'llama')")
    add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    control = [i for i, t in enumerate(types) if t == _GGUF_CONTROL]
    return Tokenizer(_TokenizersBackend(tok), bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos,
                     chat_template=template, special_ids=control, source=str(path))


def _byte_level_bpe(tokens, merges, types, pre: str):
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre in _LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:  # every digit on its own, then GPT-2's split (llama.cpp's rule for these)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    _add_gguf_specials(tok, tokens, types, AddedToken, add_control=True)
    return tok


def _sentencepiece_bpe(tokens, scores, types, unk_id: int, add_space_prefix: bool):
    """SentencePiece BPE rebuilt for the tokenizers library: merges ranked by the merged piece's score (how
    SentencePiece's BPE picks the next merge), the dummy-prefix "▁", and byte fallback through <0xNN> pieces."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, ty in zip(tokens, types) if ty in (1, _GGUF_USER_DEFINED)}
    ranked = []
    for piece, score in zip(tokens, scores):
        if piece not in normal or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(l, r) for _, _, _, l, r in ranked]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True,
                                 byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    # SentencePiece matches user-defined symbols in raw text, but not control symbols like <s>
    _add_gguf_specials(tok, tokens, types, AddedToken, add_control=False)
    return tok


def _add_gguf_specials(tok, tokens, types, AddedToken, add_control: bool):
    if add_control:
        control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                   if ty == _GGUF_CONTROL]
        if control:
            tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == _GGUF_USER_DEFINED]
    if user:
        tok.add_tokens(user)
