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

A trained model on disk (`lladapter encoder-finetune` / `encoder-eval`): `save_encoder_run(model, out_dir, config)`
writes the trained parameters (gated / joint / linear: the adapter file, which holds the prompts, gates and head, or
just the head; full: every parameter) and RUN_CONFIG (task, method, encoder path and config, tags, adapter shape,
max_len); `load_encoder_run(out_dir)` rebuilds the model from them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .encoder_tasks import (IGNORE_INDEX, EncoderForQuestionAnswering, EncoderForTokenClassification, QAExample,
                            QAFeature, TokenFeatures, collate, predict_answers, predict_tags, span_loss,
                            span_scores, squad_scores, token_classification_loss)
from .host_heap import keep_freed_heap
from .schedule import lr_at

__all__ = ["METHODS", "MethodSpec", "TrainResult", "method_parameters", "setup_method", "count_method_parameters",
           "train_encoder_task", "evaluate_encoder_task", "TASKS", "RUN_CONFIG", "build_task_model",
           "run_weights_file", "saved_parameters", "save_encoder_run", "read_run_config", "load_encoder_run"]

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
                       progress: bool = False,
                       on_step: Callable[[int, int, float, float], None] | None = None) -> TrainResult:
    """Train `model` (EncoderForTokenClassification on TokenFeatures, EncoderForQuestionAnswering on QAFeature)
    with `method` for max_steps optimizer steps, or `epochs` passes over the features (whole batches per epoch).

    AdamW (betas 0.9 / 0.999) over exactly the method's parameters at peak lr `lr` (default METHODS[method].lr);
    the head peaks at `head_lr` (default: METHODS[method].head_lr when lr is not given, else lr). Linear warmup
    over the first `warmup` share of the steps, then half-cycle cosine to min_lr (schedule.lr_at); gradients
    clipped to clip_grad_norm when given. fp32 throughout; deterministic for a given seed (data order). Raises
    FloatingPointError on a non-finite loss, before that step's update. The model is left in eval mode.
    on_step(step, steps, loss, lr), when given, is called after each optimizer step (step counts from 1; lr is the
    peak-scaled rate the step ran at): the command line prints its progress lines with it."""
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
    if dev.type == "cpu":
        keep_freed_heap()  # (as Trainer.train: the steps reuse the freed heap instead of faulting in fresh pages)
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
            if on_step is not None:
                on_step(step + 1, steps, value, cur)
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
                          max_answer_len: int = 30, return_predictions: bool = False):
    """Scores on held-out features. Token classification (give `tags`): {"precision", "recall", "f1", "correct",
    "predicted", "gold", "per_type"} by span_scores, gold tags read from the features' labels. QA (give the
    `examples` the features came from): {"exact_match", "f1"} in percent by squad_scores. With
    return_predictions: (scores, predictions), the predictions being predict_tags' (one tag list per feature) or
    predict_answers' ({question id: answer text})."""
    _check_model(model)
    if not features:
        raise ValueError("no evaluation features")
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, EncoderForQuestionAnswering):
            if examples is None:
                raise ValueError("evaluating a QA model needs the examples (gold answers)")
            pred = predict_answers(model, examples, features, max_answer_len, batch_size)
            scores = squad_scores(examples, pred)
            return (scores, pred) if return_predictions else scores
        if tags is None:
            raise ValueError("evaluating a token-classification model needs the tag list")
        gold = []
        for f in features:
            ids = [f.labels[p] for p in f.first_token]
            if any(i == IGNORE_INDEX for i in ids):
                raise ValueError(f"{f.source or 'a feature'}: a word's first subtoken has no label")
            gold.append([tags[i] for i in ids])
        pred = predict_tags(model, features, tags, batch_size)
        scores = span_scores(gold, pred)
        return (scores, pred) if return_predictions else scores
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------- saved runs
# A trained task model on disk (what `lladapter encoder-finetune` writes and `lladapter encoder-eval` reads): the
# trained parameters and RUN_CONFIG, a JSON file with what rebuilding the model needs.
RUN_CONFIG = "encoder_task.json"
RUN_FORMAT = "lladapter-encoder-task"
ADAPTER_FILE = "adapter.safetensors"  # gated / joint: prompts, gates and head; linear: the head
FULL_FILE = "model.safetensors"  # full: every parameter (encoder and head)
TASKS = ("ner", "srl", "qa")


def run_weights_file(method: str) -> str:
    """The file a run of `method` keeps its trained parameters in."""
    _spec(method)
    return FULL_FILE if method == "full" else ADAPTER_FILE


def saved_parameters(method: str) -> str:
    """What a run of `method` saves, in words."""
    _spec(method)
    return {"gated": "prompts, gates and head (the adapter file)", "joint": "prompts and head (the adapter file)",
            "linear": "the head (the adapter file)",
            "full": "every parameter, encoder and head (a full state dict)"}[method]


def build_task_model(encoder, task: str, num_labels: int | None = None):
    """The head model of `task` ("ner", "srl": EncoderForTokenClassification with num_labels; "qa":
    EncoderForQuestionAnswering) around `encoder`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "qa":
        return EncoderForQuestionAnswering(encoder)
    return EncoderForTokenClassification(encoder, num_labels)


def save_encoder_run(model, out_dir: str, config: dict) -> list[str]:
    """Write a trained task model to out_dir: its trained parameters (run_weights_file(config["method"]): the
    adapter file of gated / joint / linear, which holds the head too; every parameter for full) and
    out_dir/RUN_CONFIG (config plus "format" and "weights"; written last, so a directory that has it is complete).
    config needs "task" and "method", and whatever load_encoder_run needs: "model", "tags" (ner, srl),
    "adapter" (gated, joint: num_layers, prompt_len, mode, gate_act), "max_len". Returns the paths written."""
    from .checkpoint import atomic_write_bytes, save_adapter_atomic, writing

    _check_model(model)
    method = config["method"]
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, run_weights_file(method))
    if method == "full":
        from safetensors.torch import save_file
        tmp = f"{weights}.tmp-{os.getpid()}.safetensors"
        with writing("the model", weights, cleanup=(tmp,)):
            save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, tmp,
                      metadata={"format": RUN_FORMAT, "family": model.ADAPTER_FAMILY, "task": config["task"],
                                "method": method})
            os.replace(tmp, weights)
    else:
        save_adapter_atomic(model, weights)
    cfg_path = os.path.join(out_dir, RUN_CONFIG)
    doc = {"format": RUN_FORMAT, "version": 1, **config, "weights": os.path.basename(weights),
           "saved": saved_parameters(method)}
    atomic_write_bytes(cfg_path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"), "the run config")
    return [weights, cfg_path]


def _not_a_run(path: str) -> str:
    """Why `path` (a directory or file without RUN_CONFIG next to it) is not an encoder run, for the message."""
    from .adapter import read_adapter_metadata

    adapter = path if os.path.isfile(path) else os.path.join(path, ADAPTER_FILE)
    if os.path.isfile(adapter) and adapter.endswith(".safetensors"):
        try:
            meta = read_adapter_metadata(adapter)
        except ValueError:
            meta = {}
        family = meta.get("family") or ("llama" if "adapter_len" in meta else None)
        if family and family != "encoder":
            return (f"holds a {family!r} adapter ({os.path.basename(adapter)}), from `lladapter finetune` or another "
                    f"model family, not an encoder-finetune run (no {RUN_CONFIG})")
    return f"not an encoder-finetune output directory (no {RUN_CONFIG})"


def read_run_config(path: str) -> tuple[dict, str]:
    """(config, run directory) of a saved run: `path` is the directory (or a file in it). Errors (ValueError,
    FileNotFoundError) name the path and the field."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    run_dir = path if os.path.isdir(path) else os.path.dirname(path) or "."
    cfg_path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: {_not_a_run(path)}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: cannot read the run config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != RUN_FORMAT:
        raise ValueError(f"{cfg_path}: field 'format' is {cfg.get('format') if isinstance(cfg, dict) else None!r}, "
                         f"expected {RUN_FORMAT!r}")

    def need(key, ok, what):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing field {key!r}")
        if not ok(cfg[key]):
            raise ValueError(f"{cfg_path}: field {key!r} is {cfg[key]!r}, expected {what}")
        return cfg[key]

    task = need("task", lambda v: v in TASKS, " or ".join(TASKS))
    method = need("method", lambda v: v in METHODS, " or ".join(METHODS))
    need("model", lambda v: isinstance(v, str) and v, "the encoder's path")
    need("max_len", lambda v: isinstance(v, int) and v > 1, "an integer > 1")
    if task != "qa":
        need("tags", lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v), "a list of tags")
    if METHODS[method].adapter is not None:
        need("adapter", lambda v: isinstance(v, dict) and isinstance(v.get("num_layers"), int)
             and isinstance(v.get("prompt_len"), int) and v.get("mode") == METHODS[method].adapter,
             f"num_layers, prompt_len and mode {METHODS[method].adapter!r}")
    return cfg, run_dir


def load_encoder_run(path: str, model_path: str | None = None, device: str | torch.device = "cpu"):
    """(model, config) of a run saved by save_encoder_run: the encoder from model_path (default: the one the
    config records; its config must be the one trained with), the head, the adapter (gated / joint) and the trained
    parameters, in eval mode."""
    from .encoder import load_encoder

    cfg, run_dir = read_run_config(path)
    method = cfg["method"]
    weights = os.path.join(run_dir, run_weights_file(method))
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{run_dir}: no {os.path.basename(weights)} (the {method} run's trained parameters)")
    encoder = load_encoder(model_path or cfg["model"], device=device)
    recorded = cfg.get("encoder_config")
    if isinstance(recorded, dict):
        have = dataclasses.asdict(encoder.config)
        diff = [k for k in sorted(set(have) | set(recorded)) if have.get(k) != recorded.get(k)]
        if diff:
            k = diff[0]
            raise ValueError(f"{model_path or cfg['model']}: not the encoder {run_dir} was trained with ({k} "
                             f"{have.get(k)!r}, the run's {recorded.get(k)!r})")
    model = build_task_model(encoder, cfg["task"], len(cfg.get("tags") or []) or None)
    if METHODS[method].adapter is not None:
        a = cfg["adapter"]
        model.add_adapter(a["num_layers"], a["prompt_len"], mode=a["mode"], gate_act=a.get("gate_act", "tanh"))
    if method == "full":
        from .adapter import check_tensors, read_adapter_tensors
        tensors, _, source = read_adapter_tensors(weights)
        own = model.state_dict()
        check_tensors(own, tensors, source, context="does not fit this model")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    else:
        model.load_adapter(weights)
    return model.eval(), cfg
