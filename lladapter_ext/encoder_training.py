"""Training and evaluation of the encoder task models (issue 19; the paper's Table 5 settings).

Four methods (`METHODS`), each a set of trainable parameters and a default peak learning rate:

- "gated":  LLaMA-Adapter zero-init gated prompts (`add_adapter(mode="gated")`): prompts, gates and the head
  train, the encoder is frozen.
- "joint":  P-tuning v2 (`add_adapter(mode="joint")`: deep prompts in the tokens' softmax, no gate): prompts and
  the head train, the encoder is frozen.
- "linear": linear probe: only the head trains (no adapter).
- "full":   full fine-tuning: every parameter trains (no adapter), at a much lower learning rate.

`setup_method(model, method, num_layers=, prompt_len=, seed=)` adds the adapter a method needs (prompts drawn
from `seed`) and sets requires_grad; `train_encoder_task(model, features, method=...)` checks that the model is
set up for the method, sets requires_grad again (so only the method's parameters train, whatever came before),
and runs AdamW over exactly those parameters with linear warmup + half-cycle cosine (`schedule.lr_at`), in
fp32, with a seeded shuffle (same seed, same model: identical results). A non-finite loss stops the run with an
error naming the step and learning rate, before the optimizer touches the parameters.
`evaluate_encoder_task` scores held-out features: span precision / recall / F1 (NER, SRL; `span_scores`) or
SQuAD exact match / F1 (QA; `squad_scores`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .encoder_tasks import (IGNORE_INDEX, EncoderForQuestionAnswering, EncoderForTokenClassification, QAExample,
                            QAFeature, TokenFeatures, collate, predict_answers, predict_tags, span_loss,
                            span_scores, squad_scores, token_classification_loss)
from .schedule import lr_at

__all__ = ["METHODS", "MethodSpec", "TrainResult", "method_parameters", "setup_method", "count_method_parameters",
           "train_encoder_task", "evaluate_encoder_task"]

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class MethodSpec:
    lr: float  # default peak learning rate
    adapter: str | None  # the add_adapter mode the method needs, None: no adapter
    trains: str  # what trains, in words
    head_lr: float | None = None  # peak learning rate of the (new, zero-init) head when it differs from lr


# Default peak learning rates for short runs (tens to hundreds of steps of batch 16, all-MiniLM-L6-v2 on the
# generated data): at 60 steps on QA the gated adapter reached F1 32 at 1e-2 and 74 at 3e-2, P-tuning v2 26 at
# 5e-3 and 34 at 3e-2; full fine-tuning at 1e-4 with the new head at 1e-2 reached 99 (the head at 1e-4 too barely
# moved in 20 steps: NER F1 0). Longer runs on real data usually want lower rates (P-tuning v2: 5e-3 to 1e-2).
METHODS: dict[str, MethodSpec] = {
    "gated": MethodSpec(3e-2, "gated", "zero-init gated prompts + gates + head (encoder frozen)"),
    "joint": MethodSpec(3e-2, "joint", "P-tuning v2 deep prompts + head (encoder frozen)"),
    "linear": MethodSpec(3e-2, None, "head only (linear probe, encoder frozen)"),
    "full": MethodSpec(1e-4, None, "every parameter (full fine-tuning); the new head at 1e-2", head_lr=1e-2),
}


def _spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return METHODS[method]


def _check_model(model) -> None:
    if not isinstance(model, (EncoderForTokenClassification, EncoderForQuestionAnswering)):
        raise TypeError(f"expected an EncoderForTokenClassification or EncoderForQuestionAnswering, got "
                        f"{type(model).__name__}")


def _adapter_mode(model) -> str | None:
    cfg = model.encoder.adapter_config
    return None if cfg is None else cfg["mode"]


def method_parameters(model, method: str) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what `method` trains in `model` (which must be set up for it: `setup_method`)."""
    _check_model(model)
    spec = _spec(method)
    mode = _adapter_mode(model)
    if mode != spec.adapter:
        have = "no adapter" if mode is None else f"a {mode!r} adapter"
        need = "no adapter" if spec.adapter is None else f"a {spec.adapter!r} adapter"
        raise ValueError(f"method {method!r} needs {need}, the model has {have} (use setup_method)")
    for name, p in model.named_parameters():
        if method == "full" or (method == "linear" and model.is_head_param(name)) or (
                spec.adapter is not None and model.is_adapter_param(name)):
            yield name, p


def _set_trainable(model, method: str) -> list[tuple[str, torch.nn.Parameter]]:
    params = list(method_parameters(model, method))
    names = {n for n, _ in params}
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return params


def setup_method(model, method: str, *, num_layers: int | None = None, prompt_len: int = 10,
                 gate_act: str = "tanh", seed: int = 0) -> list[str]:
    """Add the adapter `method` needs (gated / joint: in the top num_layers layers, all by default, prompts drawn
    with `seed`) and make exactly its parameters trainable; returns their names. The model must have no adapter."""
    _check_model(model)
    spec = _spec(method)
    if model.encoder.adapter_config is not None:
        raise ValueError("setup_method: the model already has an adapter (remove_adapter() first)")
    if spec.adapter is not None:
        layers = model.encoder.config.depth if num_layers is None else num_layers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.add_adapter(layers, prompt_len, mode=spec.adapter, gate_act=gate_act)
    return [n for n, _ in _set_trainable(model, method)]


def count_method_parameters(model, method: str) -> int:
    """Parameters `method` trains in `model` (set up for it)."""
    return sum(p.numel() for _, p in method_parameters(model, method))


@dataclass
class TrainResult:
    method: str
    steps: int
    lr: float  # peak
    head_lr: float  # the head's peak
    trainable: list[str]
    num_trainable: int
    losses: list[float] = field(default_factory=list)  # one per step
    lrs: list[float] = field(default_factory=list)  # the learning rate each step ran at (the head's: x head_lr / lr)
    seconds: float = 0.0


def _loss(model, batch: dict) -> torch.Tensor:
    out = model(**{k: batch[k] for k in _MODEL_INPUTS})
    if isinstance(model, EncoderForQuestionAnswering):
        return span_loss(out[0], out[1], batch["start_positions"], batch["end_positions"])
    return token_classification_loss(out, batch["labels"])


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    """`steps` batches of row indices: a fresh seeded permutation each epoch, the last partial batch of an epoch
    dropped (unless the data is smaller than one batch: then every batch is the whole set, reshuffled)."""
    per_epoch = max(1, n // batch_size)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen).tolist()
        for b in range(per_epoch):
            if done == steps:
                return
            yield perm[b * batch_size:(b + 1) * batch_size]
            done += 1


def train_encoder_task(model, features: list, *, method: str, epochs: float | None = None,
                       max_steps: int | None = None, batch_size: int = 16, lr: float | None = None,
                       head_lr: float | None = None, warmup: float = 0.1, min_lr: float = 0.0,
                       weight_decay: float = 0.0, clip_grad_norm: float | None = None, seed: int = 0,
                       progress: bool = False) -> TrainResult:
    """Train `model` (EncoderForTokenClassification on TokenFeatures, EncoderForQuestionAnswering on QAFeature)
    with `method` for max_steps optimizer steps, or `epochs` passes over the features (whole batches per epoch).

    AdamW (betas 0.9 / 0.999) over exactly the method's parameters at peak lr `lr` (default METHODS[method].lr);
    the head peaks at `head_lr` (default: METHODS[method].head_lr when lr is not given, else lr). Linear warmup
    over the first `warmup` share of the steps, then half-cycle cosine to min_lr (schedule.lr_at); gradients
    clipped to clip_grad_norm when given. fp32 throughout; deterministic for a given seed (data order). Raises
    FloatingPointError on a non-finite loss, before that step's update. The model is left in eval mode."""
    _check_model(model)
    spec = _spec(method)
    if not features:
        raise ValueError("no training features")
    kind = QAFeature if isinstance(model, EncoderForQuestionAnswering) else TokenFeatures
    if not all(isinstance(f, kind) for f in features):
        raise TypeError(f"{type(model).__name__} trains on {kind.__name__} lists")
    if (epochs is None) == (max_steps is None):
        raise ValueError("give exactly one of epochs and max_steps")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup is a share of the steps in [0, 1], got {warmup}")
    steps = max_steps if max_steps is not None else max(1, round(epochs * max(1, len(features) // batch_size)))
    if steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {steps}")
    peak = spec.lr if lr is None else float(lr)
    head_peak = head_lr if head_lr is not None else (spec.head_lr if spec.head_lr is not None and lr is None
                                                     else peak)
    for name, v in (("lr", peak), ("head_lr", head_peak)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be > 0 and finite, got {v}")
    params = _set_trainable(model, method)
    bad = [n for n, p in params if p.dtype != torch.float32]
    if bad:
        raise ValueError(f"training runs in fp32, but {bad[0]} is {dict(params)[bad[0]].dtype} (model.float())")
    warmup_steps = min(steps, round(warmup * steps))
    groups = [dict(params=[p for n, p in params if model.is_head_param(n) == head], scale=s)
              for head, s in ((False, 1.0), (True, head_peak / peak))]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=peak, betas=(0.9, 0.999),
                            weight_decay=weight_decay)
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult(method, steps, peak, head_peak, [n for n, _ in params], sum(p.numel() for _, p in params))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"train {method}", unit="step")
    t0 = time.perf_counter()
    model.train()
    try:
        for step, rows in enumerate(_batches(len(features), batch_size, steps, gen)):
            cur = lr_at(step, base_lr=peak, total_steps=steps, warmup_steps=warmup_steps, min_lr=min_lr)
            for g in opt.param_groups:
                g["lr"] = cur * g["scale"]
            loss = _loss(model, collate([features[i] for i in rows], device=dev))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"train_encoder_task ({method}): the loss is {value} at step {step} "
                                         f"(lr {cur:.3g}); the parameters are as before that step. Lower the "
                                         "learning rate or clip gradients (clip_grad_norm)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], clip_grad_norm)
            opt.step()
            result.losses.append(value)
            result.lrs.append(cur)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{cur:.2e}")
    finally:
        model.eval()
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def evaluate_encoder_task(model, features: list, *, tags: list[str] | None = None,
                          examples: list[QAExample] | None = None, batch_size: int = 32,
                          max_answer_len: int = 30) -> dict:
    """Scores on held-out features. Token classification (give `tags`): {"precision", "recall", "f1", "correct",
    "predicted", "gold", "per_type"} by span_scores, gold tags read from the features' labels. QA (give the
    `examples` the features came from): {"exact_match", "f1"} in percent by squad_scores."""
    _check_model(model)
    if not features:
        raise ValueError("no evaluation features")
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, EncoderForQuestionAnswering):
            if examples is None:
                raise ValueError("evaluating a QA model needs the examples (gold answers)")
            return squad_scores(examples, predict_answers(model, examples, features, max_answer_len, batch_size))
        if tags is None:
            raise ValueError("evaluating a token-classification model needs the tag list")
        gold = []
        for f in features:
            ids = [f.labels[p] for p in f.first_token]
            if any(i == IGNORE_INDEX for i in ids):
                raise ValueError(f"{f.source or 'a feature'}: a word's first subtoken has no label")
            gold.append([tags[i] for i in ids])
        return span_scores(gold, predict_tags(model, features, tags, batch_size))
    finally:
        model.train(was_training)
