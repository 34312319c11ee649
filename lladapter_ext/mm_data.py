"""Image + text data for the multi-modal LLaMA-Adapter: image loading and preprocessing, the ScienceQA format,
"The answer is (X)" scoring, and image+text batching.

Images: ``load_image`` opens a file (or takes a PIL image / HxWxC uint8 array) and returns an 8-bit RGB PIL image;
a missing file, a file Pillow cannot decode and a mode that has no faithful 8-bit RGB form (16-bit, 32-bit
integer or float images) raise ``ImageError`` naming the file and what was expected. ``ImagePreprocess`` resizes
the shorter side to ``size / crop_pct`` (bicubic), centre-crops ``size`` and normalises with the encoder's mean
and std, giving a float32 [3, H, W] tensor (what timm's and CLIP's eval transforms do).

ScienceQA (Lu et al., 2022): ``problems.json`` maps a problem id to ``{question, choices, answer (index), hint
(the context), image (file name or null), split, ...}``; images live in ``images/<split>/<pid>/<image>``. The same
records may also come as a JSON list or JSONL (each with a ``pid``). ``format_question`` renders the
question-context-options prompt and ``format_answer`` the target "The answer is (B)."; ``parse_answer`` reads a
choice letter back from generated text and ``score_answers`` gives exact-choice accuracy (overall and per
``skill``/``subject`` when the records have one).

Batching: ``tokenize_questions`` makes an ``ImageTextDataset``: the rows of a ``TokenizedDataset`` (loss on the
answer only) plus, per row, the index of its image. Its image features are computed once by the frozen encoder
(``ImageTextDataset.set_features``) and its ``collate`` adds ``image_features`` [B, F] and ``image_mask`` [B]
(False for questions without an image) to the usual text batch, so the text Trainer runs it unchanged.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from collections.abc import Sequence

import numpy as np
import torch

from ._optional import require
from .batching import collate
from .data import IGNORE_INDEX, DataFormatError, Example, TokenizedDataset, TokenizeReport, pad_id_of

__all__ = ["ImageError", "load_image", "ImagePreprocess", "MCQuestion", "load_scienceqa", "format_question",
           "format_answer", "parse_answer", "score_answers", "MultiModalExample", "ImageTextDataset",
           "tokenize_questions", "choice_letter"]

# 8-bit modes with a faithful RGB conversion; the rest (I;16, I, F, ...) would need a choice of scaling
_CONVERTIBLE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ImageError(ValueError):
    """An image that cannot be used: missing, undecodable, or of an unsupported mode/shape."""


def load_image(source: str | os.PathLike | Image.Image | np.ndarray):  # noqa: F821 (PIL is optional: imported where used)
    """An 8-bit RGB PIL image from a path, a PIL image, or an HxW / HxWx{1,3,4} uint8 array.

    Transparent images are composited on white (what a viewer shows). Raises ImageError naming the file for a
    missing or corrupt file and for modes without a faithful 8-bit RGB form (16/32-bit integer, float)."""
    Image = require("PIL.Image", "loading images")
    UnidentifiedImageError = Image.UnidentifiedImageError

    name = "<image>"
    if isinstance(source, np.ndarray):
        a = source
        if a.dtype != np.uint8:
            raise ImageError(f"image array must have dtype uint8, got {a.dtype}")
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise ImageError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {list(a.shape)}")
        img = Image.fromarray(a)
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise ImageError(f"image file not found: {name}")
        try:
            img = Image.open(name)
            img.load()  # decode now, so a truncated file fails here and not later
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    elif isinstance(source, Image.Image):
        img = source
    else:
        raise ImageError(f"image must be a path, a PIL image or a uint8 array, got {type(source).__name__}")
    if img.mode not in _CONVERTIBLE_MODES:
        raise ImageError(f"{name}: image mode {img.mode!r} is not supported (16/32-bit or float pixels have no "
                         f"single 8-bit RGB rendering); expected one of {list(_CONVERTIBLE_MODES)}, e.g. RGB or L")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.size[0] < 1 or img.size[1] < 1:
        raise ImageError(f"{name}: image has size {img.size}, expected at least 1x1")
    return img.convert("RGB")


@dataclass
class ImagePreprocess:
    """Resize the shorter side to round(size / crop_pct) (bicubic), centre-crop size x size, scale to [0, 1],
    normalise per channel: the eval transform of timm and CLIP. Call on a path / PIL image / array -> [3, S, S]."""
    size: int = 224
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    crop_pct: float = 1.0

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"ImagePreprocess: size must be >= 1, got {self.size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"ImagePreprocess: crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"ImagePreprocess: mean and std need 3 values (std > 0), got {self.mean}, {self.std}")

    def __call__(self, source) -> torch.Tensor:
        Image = require("PIL.Image", "image preprocessing")

        img = load_image(source)
        w, h = img.size
        short = max(self.size, round(self.size / self.crop_pct))
        if (w, h) != (short, short) or w != h:
            scale = short / min(w, h)
            img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def batch(self, sources: Sequence) -> torch.Tensor:
        return torch.stack([self(s) for s in sources])


# ----------------------------------------------------------------------------------------------------------------
# ScienceQA


@dataclass
class MCQuestion:
    """One multiple-choice question; ``image`` is a resolved file path or None; ``meta`` keeps the other fields."""
    pid: str
    question: str
    choices: list[str]
    answer: int
    context: str = ""
    image: str | None = None
    split: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def choice_letter(i: int) -> str:
    return LETTERS[i]


def _resolve_image(name: str, pid: str, split: str | None, images_dir: str, where: str) -> str:
    cands = ([os.path.join(images_dir, split, pid, name)] if split else []) + [
        os.path.join(images_dir, pid, name), os.path.join(images_dir, name)]
    for c in cands:
        if os.path.isfile(c):
            return c
    raise DataFormatError(f"{where}: image {name!r} not found; looked in "
                          + ", ".join(cands))


def load_scienceqa(path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                   split: str | None = None) -> list[MCQuestion]:
    """Read ScienceQA-format problems: ``problems.json`` ({pid: problem}), a JSON list or JSONL of problems
    (each with ``pid`` or ``id``). ``split`` keeps one split, taken from each problem's ``split`` field or from a
    ``pid_splits.json`` next to the file. ``images_dir`` (default: ``images`` next to the file) is where image
    files are looked up: ``<images_dir>/<split>/<pid>/<image>``, then ``<images_dir>/<pid>/<image>``, then
    ``<images_dir>/<image>``. Malformed problems raise DataFormatError naming the file and the problem id."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ScienceQA problems file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(raw, dict):
        items = [(str(pid), p) for pid, p in raw.items()]
    elif isinstance(raw, list):
        items = []
        for i, p in enumerate(raw):
            if not isinstance(p, dict) or not any(k in p for k in ("pid", "id")):
                raise DataFormatError(f"{path}: item {i} must be an object with a 'pid' (or 'id') field")
            items.append((str(p.get("pid", p.get("id"))), p))
    else:
        raise DataFormatError(f"{path}: expected an object {{pid: problem}} or a list of problems, got "
                              f"{type(raw).__name__}")
    pid_split: dict[str, str] = {}
    splits_file = os.path.join(os.path.dirname(path), "pid_splits.json")
    if os.path.isfile(splits_file):
        with open(splits_file, encoding="utf-8") as f:
            for name, pids in json.load(f).items():
                for pid in pids:
                    pid_split[str(pid)] = name
    images_dir = os.fspath(images_dir) if images_dir is not None else os.path.join(os.path.dirname(path), "images")
    out = []
    for pid, p in items:
        where = f"{path}: problem {pid}"
        if not isinstance(p, dict):
            raise DataFormatError(f"{where}: expected an object, got {type(p).__name__}")
        q, choices, answer = p.get("question"), p.get("choices"), p.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise DataFormatError(f"{where}: 'question' must be a non-empty string, got {q!r}"[:200])
        if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
                or not all(isinstance(c, str) for c in choices)):
            raise DataFormatError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} strings, got "
                                  f"{choices!r}"[:200])
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataFormatError(f"{where}: 'answer' must be a choice index in [0, {len(choices)}), got {answer!r}")
        context = p.get("hint", p.get("context", "")) or ""
        if not isinstance(context, str):
            raise DataFormatError(f"{where}: 'hint' must be a string, got {type(context).__name__}")
        psplit = p.get("split", pid_split.get(pid))
        if split is not None and psplit != split:
            continue
        image = p.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise DataFormatError(f"{where}: 'image' must be a file name or null, got {image!r}")
            image = _resolve_image(image, pid, psplit, images_dir, where)
        meta = {k: v for k, v in p.items()
                if k not in ("question", "choices", "answer", "hint", "context", "image", "split", "pid", "id")}
        out.append(MCQuestion(pid, q, list(choices), int(answer), context, image, psplit, meta))
    if not out:
        raise DataFormatError(f"{path}: no problems" + (f" in split {split!r}" if split else ""))
    return out


def format_question(q: MCQuestion) -> str:
    """The prompt: context (when there is one), question, lettered options, then "Answer:"."""
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(q.choices))
    context = f"Context: {q.context}\n" if q.context.strip() else ""
    return f"{context}Question: {q.question}\nOptions: {options}\nAnswer:"


def format_answer(q: MCQuestion) -> str:
    """The target completion: " The answer is (B)." (leading space: it follows "Answer:")."""
    return f" The answer is ({q.answer_letter})."


_ANSWER_RE = re.compile(r"answer is\s*\(?([A-Z])\)?", re.IGNORECASE)
_LEAD_RE = re.compile(r"^\s*\(?([A-Z])\)(?:\s|$|\.)|^\s*([A-Z])(?:\s*$|[.):,])")


def parse_answer(text: str, n_choices: int) -> int | None:
    """The chosen option's index from generated text: "The answer is (X)" first, else a leading "(X)" / "X." /
    lone "X"; None when there is none or the letter is past the last option."""
    m = _ANSWER_RE.search(text)
    letter = m.group(1).upper() if m else None
    if letter is None:
        m = _LEAD_RE.match(text)
        if m:
            letter = (m.group(1) or m.group(2)).upper()
    if letter is None:
        return None
    i = LETTERS.index(letter)
    return i if i < n_choices else None


def score_answers(predictions: Sequence[str], questions: Sequence[MCQuestion], group_by: str = "skill") -> dict:
    """Exact-choice accuracy: {"accuracy", "correct", "n", "unparsed", "groups": {name: [correct, n]}}; the
    groups come from ``meta[group_by]`` (e.g. ScienceQA's ``subject`` or the demo's ``skill``) when present."""
    if len(predictions) != len(questions):
        raise ValueError(f"score_answers: {len(predictions)} predictions for {len(questions)} questions")
    correct = unparsed = 0
    groups: dict[str, list[int]] = {}
    for text, q in zip(predictions, questions):
        choice = parse_answer(text, len(q.choices))
        ok = choice == q.answer
        correct += ok
        unparsed += choice is None
        g = q.meta.get(group_by)
        if g is not None:
            cell = groups.setdefault(str(g), [0, 0])
            cell[0] += ok
            cell[1] += 1
    n = len(questions)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n, "unparsed": unparsed,
            "groups": dict(sorted(groups.items()))}


# ----------------------------------------------------------------------------------------------------------------
# Tokenised image + text rows


@dataclass
class MultiModalExample(Example):
    """A training row plus the index of its image in the dataset's image list (-1: no image)."""
    image_index: int = -1


@dataclass
class ImageTextDataset(TokenizedDataset):
    """Rows with an image each (or none); ``image_paths`` lists the distinct images, ``features`` [N, F] their
    encoder features (set once with ``set_features``: the encoder is frozen, so they never change)."""
    image_paths: list[str] = field(default_factory=list)
    questions: list[MCQuestion] = field(default_factory=list)
    features: torch.Tensor | None = None

    def set_features(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[0] != len(self.image_paths):
            raise ValueError(f"features must be [n_images, F] = [{len(self.image_paths)}, F], got "
                             f"{list(features.shape)}")
        self.features = features.detach().to("cpu", torch.float32)

    def text_only(self) -> TokenizedDataset:
        """The same rows as a plain TokenizedDataset (no image tensors in the batches): the text-only baseline."""
        return TokenizedDataset(self.examples, self.pad_id, self.max_seq_len, False, self.report)

    def collate(self, rows: Sequence[MultiModalExample], pad_id: int, *, pad_to_multiple_of: int | None = None
                ) -> dict[str, torch.Tensor]:
        """The text batch of ``batching.collate`` plus image_features [B, F] (zeros where a row has no image) and
        image_mask [B] (True where it has one)."""
        if self.features is None:
            raise ValueError("ImageTextDataset.collate: image features are not computed; call "
                             "set_features(encoder features of image_paths) first (MultiModalLlama.encode_paths)")
        batch = collate(rows, pad_id, pad_to_multiple_of=pad_to_multiple_of)
        idx = torch.tensor([r.image_index for r in rows], dtype=torch.long)
        mask = idx >= 0
        feats = torch.zeros(len(rows), self.features.shape[1], dtype=self.features.dtype)
        if bool(mask.any()):
            feats[mask] = self.features[idx[mask]]
        batch["image_features"] = feats
        batch["image_mask"] = mask
        return batch


def tokenize_questions(questions: Sequence[MCQuestion], tokenizer, max_seq_len: int = 512) -> ImageTextDataset:
    """Rows of prompt (``format_question``, no loss) + answer (``format_answer`` + EOS, with loss), each pointing
    at its image. Rows longer than max_seq_len raise (a cut answer would teach a wrong format)."""
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_id; the answers need an EOS token")
    image_index: dict[str, int] = {}
    examples = []
    for q in questions:
        prompt = list(tokenizer.encode(format_question(q), bos=True, eos=False))
        answer = list(tokenizer.encode(format_answer(q), bos=False, eos=False)) + [int(eos)]
        ids = prompt + answer
        if len(ids) > max_seq_len:
            raise ValueError(f"problem {q.pid}: {len(ids)} tokens exceed max_seq_len={max_seq_len}")
        img = -1
        if q.image is not None:
            img = image_index.setdefault(q.image, len(image_index))
        examples.append(MultiModalExample(ids, [IGNORE_INDEX] * len(prompt) + answer, f"problem {q.pid}",
                                          image_index=img))
    report = TokenizeReport(n_records=len(questions), n_examples=len(examples))
    return ImageTextDataset(examples, pad_id_of(tokenizer), max_seq_len, False, report,
                            image_paths=list(image_index), questions=list(questions))


def answer_questions(model: torch.nn.Module, tokenizer, questions, image_features: torch.Tensor | None = None,
                     image_mask: torch.Tensor | None = None, batch_size: int = 20, max_new_tokens: int = 6,
                     progress: bool = False) -> list[str]:
    """Greedy completions of ``format_question`` prompts (score them with ``mm_data.score_answers``).

    ``model``: a MultiModalLlama with ``image_features`` [N, F] (and ``image_mask`` [N]) one row per question, or
    any text model (a LlamaForCausalLM: the text-only baseline) without them."""
    from .generation import generate
    from .mm_data import format_question

    if image_features is not None and image_features.shape[0] != len(questions):
        raise ValueError(f"image_features has {image_features.shape[0]} rows for {len(questions)} questions")
    prompts = [format_question(q) for q in questions]
    out: list[str] = []
    it = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="answering", unit="batch")
    for s in it:
        kw = None
        if image_features is not None:
            kw = {"image_features": image_features[s:s + batch_size]}
            if image_mask is not None:
                kw["image_mask"] = image_mask[s:s + batch_size]
        out += generate(model, tokenizer, prompts[s:s + batch_size], max_new_tokens=max_new_tokens,
                        model_kwargs=kw)
    return out


def question_features(dataset, questions=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-question image features [N, F] and mask [N] of an ``ImageTextDataset`` (features already set)."""
    if dataset.features is None:
        raise ValueError("question_features: the data set's image features are not computed")
    rows = dataset.examples
    idx = torch.tensor([r.image_index for r in rows], dtype=torch.long)
    mask = idx >= 0
    feats = torch.zeros(len(rows), dataset.features.shape[1])
    feats[mask] = dataset.features[idx[mask]]
    return feats, mask
