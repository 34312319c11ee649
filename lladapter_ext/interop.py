"""LLaMA adapters in other tools' formats: read and write PEFT's AdaptionPrompt, LitGPT's adapter and the official
LLaMA-Adapter V1 files, exactly or not at all (docs/interop.md has the table and what each conversion refuses).

Every format holds the same thing: for each of the top L of n layers, K prompt vectors of the model width D, and
a gate. They differ in names and layout, in the gate's activation (tanh or none) and granularity (per head or one
per layer), and, for LitGPT, in how a prompt becomes keys and values (LlamaConfig.prompt_projection):

    lladapter  .safetensors, metadata    layers.{i}.attention.adapter_prompt [K, D], adapter_gate [H]     tanh|identity
    peft       dir: adapter_config.json  base_model.model.model.layers.{i}.self_attn.adaption_prompt [1, K, D],
               + adapter_model.*         adaption_gate [1] (one per layer)                               identity
    litgpt     lit_model.pth.adapter     transformer.h.{i}.attn.adapter_wte.weight [K, D],
               (torch, {"model": ...})   gating_factor [1, 1, H, 1] (older files [1, H, 1, 1])           identity
    official   .pth (V1)                 adapter_query.weight [L*K, D] (top layers in order),
                                         layers.{i}.attention.gate [1, H, 1, 1] for every layer i        tanh

`read_adapter` gives an `Adapter` (the common form), `write_adapter` writes one in any format, refusing what the
target cannot hold exactly, and `convert` does both. LlamaForCausalLM.load_adapter and loaders.load_model accept
every format directly.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

FORMATS = ("lladapter", "peft", "litgpt", "official")

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LITGPT_FILE = "lit_model.pth.adapter"
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)$")
_LITGPT_KEY = re.compile(r"^transformer\.h\.(\d+)\.attn\.(adapter_wte\.weight|gating_factor)$")
_OFFICIAL_GATE = re.compile(r"^layers\.(\d+)\.attention\.gate$")
_OURS_KEY = re.compile(r"^layers\.(\d+)\.attention\.(adapter_prompt|adapter_gate)$")


class AdapterFormatError(ValueError):
    """A file or directory that is no adapter of a known format, or one that does not fit what it is used for."""


@dataclass
class Adapter:
    """One LLaMA adapter, whatever the format it came from: per adapted layer (the top ones) its prompt [K, D] and
    its gate, [H] per head or [1] for one gate per layer (PEFT), as stored (`gate_act` applies on use)."""

    n_layers: int
    prompts: dict[int, torch.Tensor]
    gates: dict[int, torch.Tensor]
    gate_act: str  # "tanh" or "identity"
    prompt_projection: str = "wk_wv"  # "litgpt": LitGPT's slices of its stacked qkv (LlamaConfig.prompt_projection)
    n_heads: int | None = None  # known when the gates are per head, or the source recorded it
    n_kv_heads: int | None = None  # known only when the source recorded it (our files)
    source: str = ""
    format: str = ""
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        layers = sorted(self.prompts)
        where = self.source or "adapter"
        if not layers:
            raise AdapterFormatError(f"{where}: no adapted layer")
        if sorted(self.gates) != layers:
            raise AdapterFormatError(f"{where}: layers with a prompt {layers} and with a gate {sorted(self.gates)} "
                                     "differ")
        if layers != list(range(self.n_layers - len(layers), self.n_layers)):
            raise AdapterFormatError(f"{where}: the adapted layers {layers} are not the top {len(layers)} of "
                                     f"{self.n_layers}")
        shapes = {tuple(p.shape) for p in self.prompts.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise AdapterFormatError(f"{where}: prompts of different or non-[K, D] shapes {sorted(shapes)}")
        sizes = {g.numel() for g in self.gates.values()}
        if len(sizes) != 1:
            raise AdapterFormatError(f"{where}: gates of different sizes {sorted(sizes)}")
        size = sizes.pop()
        if size > 1:
            if self.n_heads is not None and self.n_heads != size:
                raise AdapterFormatError(f"{where}: gates have {size} values, the model has {self.n_heads} heads")
            self.n_heads = size
        for t in (*self.prompts.values(), *self.gates.values()):
            if not t.is_floating_point():
                raise AdapterFormatError(f"{where}: adapter tensors must be floating point, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{where}: the adapter holds NaN or inf (was its training run diverging?)")
        self.prompts = {i: p.detach().float().contiguous() for i, p in self.prompts.items()}
        self.gates = {i: g.detach().float().reshape(-1) for i, g in self.gates.items()}

    @property
    def adapter_len(self) -> int:
        return next(iter(self.prompts.values())).shape[0]

    @property
    def adapter_layer(self) -> int:
        return len(self.prompts)

    @property
    def dim(self) -> int:
        return next(iter(self.prompts.values())).shape[1]

    @property
    def layers(self) -> list[int]:
        return sorted(self.prompts)

    def effective_gates(self) -> dict[int, torch.Tensor]:
        """phi(gate) per layer: the factor that multiplies the prompt branch."""
        return {i: torch.tanh(g) if self.gate_act == "tanh" else g for i, g in self.gates.items()}

    def metadata(self) -> dict[str, str]:
        """Our adapter-file metadata for this adapter (what LlamaForCausalLM.adapter_metadata writes)."""
        meta = {"format": "lladapter-adapter", "family": "llama", "adapter_len": str(self.adapter_len),
                "adapter_layer": str(self.adapter_layer), "gate_act": self.gate_act,
                "prompt_projection": self.prompt_projection, "n_layers": str(self.n_layers), "dim": str(self.dim)}
        if self.n_heads is not None:
            meta["n_heads"] = str(self.n_heads)
        if self.n_kv_heads is not None:
            meta["n_kv_heads"] = str(self.n_kv_heads)
        if self.format and self.format != "lladapter":
            meta["converted_from"] = self.format
        return {**self.extra_metadata, **meta}

    def state_dict(self, n_heads: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors under our parameter names; one gate per layer is repeated over `n_heads` heads (the model's:
        required then)."""
        heads = n_heads or self.n_heads
        out = {}
        for i in self.layers:
            g = self.gates[i]
            if g.numel() == 1:
                if heads is None:
                    raise AdapterFormatError(f"{self.source}: one gate per layer ({self.format}): the number of "
                                             "attention heads is needed to make per-head gates (give --n-heads, or "
                                             "load it into a model)")
                g = g.expand(heads).clone()
            out[f"layers.{i}.attention.adapter_prompt"] = self.prompts[i]
            out[f"layers.{i}.attention.adapter_gate"] = g
        return out


# ----------------------------------------------------------------------------------------------- reading
# Inside reading_once(), reads of small adapter files are kept while the file is unchanged: loading a foreign
# adapter detects its format, reads its hyper-parameters, then loads its tensors, and each step would otherwise read
# (for torch files: unpickle) and convert it again. Outside, nothing is kept (a server loads adapters for days).
_READ_CACHE: dict[tuple, object] = {}
_READ_CACHE_MAX_BYTES = 16 << 20
_read_once_depth = 0


@contextlib.contextmanager
def reading_once():
    """Within the block, each unchanged adapter file (up to 16 MiB) is read and converted once."""
    global _read_once_depth
    _read_once_depth += 1
    try:
        yield
    finally:
        _read_once_depth -= 1
        if _read_once_depth == 0:
            _READ_CACHE.clear()


def _file_key(path: str) -> tuple | None:
    """What identifies this version of a file or directory (its files' sizes and times); None when too large to
    keep (a model checkpoint given by mistake is not held in memory)."""
    try:
        if os.path.isdir(path):
            entries = sorted((e.name, e.stat().st_ino, e.stat().st_mtime_ns, e.stat().st_size)
                             for e in os.scandir(path) if e.is_file())
            size = sum(e[3] for e in entries)
            key = (os.path.realpath(path), tuple(entries))
        else:
            st = os.stat(path)
            size, key = st.st_size, (os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return None
    return key if size <= _READ_CACHE_MAX_BYTES else None


def _cached(kind: str, path: str, read, *args):
    key = _file_key(path) if _read_once_depth else None
    if key is None:
        return read(path, *args)
    key = (kind, key, args)
    if key not in _READ_CACHE:
        if len(_READ_CACHE) >= 4:
            _READ_CACHE.pop(next(iter(_READ_CACHE)))
        _READ_CACHE[key] = read(path, *args)
    return _READ_CACHE[key]


def _torch_load(path: str) -> dict:
    """A torch file's tensors, as data only (weights.load_tensor_file; LitGPT's {"model": ...} unwrapped). The
    dict is shared by the callers of one unchanged file: read it, never change it."""
    return dict(_cached("torch", path, _torch_load_uncached))


def _torch_load_uncached(path: str) -> dict:
    from .weights import CheckpointError, load_tensor_file

    try:
        return load_tensor_file(path)
    except CheckpointError as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise AdapterFormatError(f"{path}: not a readable adapter file (safetensors or torch): {reason}") from e


def _safetensors_load(path: str) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - reported with the file's name
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({e})") from e


def _peft_dir(path: str) -> str | None:
    """The PEFT save_pretrained directory holding `path` (the directory or its weights file), or None."""
    d = path if os.path.isdir(path) else os.path.dirname(path)
    return d if os.path.isfile(os.path.join(d, PEFT_CONFIG)) else None


def detect_format(path: str | os.PathLike) -> str:
    """Which of FORMATS the file or directory at `path` is; AdapterFormatError when none."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if _peft_dir(path):
            return "peft"
        if os.path.isfile(os.path.join(path, LITGPT_FILE)):
            return "litgpt"
        from .checkpoint import find_adapter_file
        try:
            return detect_format(find_adapter_file(path))
        except FileNotFoundError:
            raise AdapterFormatError(f"{path}: no adapter of a known format there ({', '.join(FORMATS)}: an "
                                     f"adapter .safetensors file or a run directory, a PEFT directory with "
                                     f"{PEFT_CONFIG}, a LitGPT {LITGPT_FILE} or an official .pth)") from None
    names, meta = _tensor_names(path)
    if meta.get("format") == "lladapter-adapter" or any(_OURS_KEY.match(n) for n in names):
        return "lladapter"
    if any(_PEFT_KEY.match(n) for n in names):
        return "peft"
    if any(_LITGPT_KEY.match(n) for n in names):
        return "litgpt"
    if "adapter_query.weight" in names:
        return "official"
    raise AdapterFormatError(f"{path}: holds no adapter tensors of a known format ({', '.join(FORMATS)}); first "
                             f"names: {sorted(names)[:4]}")


def _tensor_names(path: str) -> tuple[list[str], dict[str, str]]:
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 8 and int.from_bytes(head, "little") < (100 << 20):
        try:
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                return list(f.keys()), dict(f.metadata() or {})
        except Exception:  # noqa: BLE001 - not safetensors: try torch below
            pass
    return list(_torch_load(path)), {}


def read_adapter(path: str | os.PathLike, format: str | None = None, *, adapter_len: int | None = None) -> Adapter:
    """The adapter at `path` in `format` (detected when None). adapter_len: the official format's K (its file holds
    L*K prompt rows; without it, L is the number of top layers whose gates are not all zero)."""
    path = os.fspath(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    adapter = _cached("adapter", path, _read_adapter_uncached, fmt, adapter_len)
    # each caller gets its own Adapter (the tensors are shared: converting and loading only read them)
    return Adapter(adapter.n_layers, dict(adapter.prompts), dict(adapter.gates), adapter.gate_act,
                   adapter.prompt_projection, adapter.n_heads, adapter.n_kv_heads, path, fmt,
                   dict(adapter.extra_metadata))


def _read_adapter_uncached(path: str, fmt: str, adapter_len: int | None) -> Adapter:
    reader = {"lladapter": _read_ours, "peft": _read_peft, "litgpt": _read_litgpt, "official": _read_official}[fmt]
    return reader(path, adapter_len) if fmt == "official" else reader(path)


def _layer_tensors(sd: dict, pattern: re.Pattern, path: str, kinds: tuple[str, str]) -> tuple[dict, dict]:
    prompts, gates = {}, {}
    for name, t in sd.items():
        m = pattern.match(name)
        if not m:
            raise AdapterFormatError(f"{path}: unexpected tensor {name!r}")
        (prompts if m.group(2) == kinds[0] else gates)[int(m.group(1))] = t
    if not prompts:
        raise AdapterFormatError(f"{path}: no prompt tensors")
    return prompts, gates


def _read_ours(path: str) -> Adapter:
    from .checkpoint import find_adapter_file
    from .model import LlamaForCausalLM

    path = find_adapter_file(path)
    sd, meta = _safetensors_load(path)
    if meta.get("multimodal") == "1" or meta.get("family", "llama") != "llama":
        kind = "multi-modal" if meta.get("multimodal") == "1" else f"{meta['family']!r}"
        raise AdapterFormatError(f"{path}: an adapter of family {kind}: only LLaMA text adapters convert to other "
                                 "formats")
    hp = LlamaForCausalLM.adapter_hparams(meta, path)
    prompts, gates = _layer_tensors(sd, _OURS_KEY, path, ("adapter_prompt", "adapter_gate"))
    n_layers = int(meta["n_layers"]) if meta.get("n_layers", "").isdigit() else max(prompts) + 1
    kv = meta.get("n_kv_heads", "")
    known = {"format", "family", "adapter_len", "adapter_layer", "gate_act", "prompt_projection", "n_layers", "dim",
             "n_heads", "n_kv_heads", "converted_from"}
    return Adapter(n_layers, prompts, gates, hp["gate_act"] or "tanh", hp["prompt_projection"] or "wk_wv",
                   n_kv_heads=int(kv) if kv.isdigit() else None,
                   extra_metadata={k: v for k, v in meta.items() if k not in known})


def _read_peft(path: str) -> Adapter:
    d = _peft_dir(path)
    if d is None:
        raise AdapterFormatError(f"{path}: a PEFT adapter needs its {PEFT_CONFIG} next to the weights")
    cfg_path = os.path.join(d, PEFT_CONFIG)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"{cfg_path}: unreadable ({e})") from e
    if cfg.get("peft_type") != "ADAPTION_PROMPT":
        raise AdapterFormatError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}, not ADAPTION_PROMPT (only "
                                 "adaption prompts convert)")
    weights = next((os.path.join(d, w) for w in PEFT_WEIGHTS if os.path.isfile(os.path.join(d, w))), None)
    if weights is None:
        raise AdapterFormatError(f"{d}: no {' or '.join(PEFT_WEIGHTS)}")
    sd = _safetensors_load(weights)[0] if weights.endswith(".safetensors") else _torch_load(weights)
    prompts, gates = _layer_tensors(sd, _PEFT_KEY, weights, ("adaption_prompt", "adaption_gate"))
    for i, p in prompts.items():
        if p.dim() != 3 or p.shape[0] != 1:
            raise AdapterFormatError(f"{weights}: layer {i}'s adaption_prompt has shape {list(p.shape)}, "
                                     "expected [1, K, D]")
        prompts[i] = p[0]
    for i, g in gates.items():
        if g.numel() != 1:
            raise AdapterFormatError(f"{weights}: layer {i}'s adaption_gate has {g.numel()} values, expected 1")
    n_layers = max(prompts) + 1  # PEFT adapts the top adapter_layers layers
    K, L = cfg.get("adapter_len"), cfg.get("adapter_layers")
    adapter = Adapter(n_layers, prompts, gates, "identity", source=weights, format="peft")
    if (K, L) != (adapter.adapter_len, adapter.adapter_layer):
        raise AdapterFormatError(f"{cfg_path}: adapter_len={K}, adapter_layers={L}, but the weights hold "
                                 f"{adapter.adapter_len} prompt tokens in {adapter.adapter_layer} layers")
    return adapter


def _read_litgpt(path: str) -> Adapter:
    if os.path.isdir(path):
        path = os.path.join(path, LITGPT_FILE)
    sd = _torch_load(path)
    prompts, gates = _layer_tensors(sd, _LITGPT_KEY, path, ("adapter_wte.weight", "gating_factor"))
    for i, g in gates.items():
        if g.dim() != 4 or g.shape[0] != 1 or sorted(g.shape[1:3])[0] != 1 or g.shape[3] != 1:
            raise AdapterFormatError(f"{path}: layer {i}'s gating_factor has shape {list(g.shape)}, expected "
                                     "[1, 1, H, 1]")
    return Adapter(max(prompts) + 1, prompts, gates, "identity", "litgpt", source=path, format="litgpt")


def _read_official(path: str, adapter_len: int | None) -> Adapter:
    sd = _torch_load(path)
    query = sd.get("adapter_query.weight")
    if query is None or query.dim() != 2:
        raise AdapterFormatError(f"{path}: no adapter_query.weight [L*K, D]")
    gates = {}
    for name, t in sd.items():
        m = _OFFICIAL_GATE.match(name)
        if m:
            gates[int(m.group(1))] = t
        elif name != "adapter_query.weight":
            raise AdapterFormatError(f"{path}: unexpected tensor {name!r}")
    n = len(gates)
    if sorted(gates) != list(range(n)):
        raise AdapterFormatError(f"{path}: gates for layers {sorted(gates)[:8]}..., expected layers 0..{n - 1}")
    rows = query.shape[0]
    nonzero = [i for i in range(n) if bool(gates[i].ne(0).any())]
    if adapter_len is None:
        if not nonzero:
            raise AdapterFormatError(f"{path}: every gate is zero, so the adapted layers cannot be told from the "
                                     f"{rows} prompt rows: give the adapter length K (--adapter-len)")
        L = n - nonzero[0]
        if rows % L:
            raise AdapterFormatError(f"{path}: gates are non-zero in the top {L} layers, but the {rows} prompt rows "
                                     f"do not divide into {L} layers: give the adapter length K (--adapter-len)")
    else:
        if adapter_len <= 0 or rows % adapter_len or rows // adapter_len > n:
            raise AdapterFormatError(f"{path}: {rows} prompt rows are not K={adapter_len} rows for at most {n} "
                                     "layers")
        L = rows // adapter_len
        if nonzero and nonzero[0] < n - L:
            raise AdapterFormatError(f"{path}: layer {nonzero[0]}'s gate is non-zero, but with K={adapter_len} only "
                                     f"the top {L} layers are adapted")
    per_layer = query.reshape(L, rows // L, query.shape[1])
    return Adapter(n, {n - L + j: per_layer[j] for j in range(L)}, {i: gates[i] for i in range(n - L, n)}, "tanh",
                   source=path, format="official")


# ----------------------------------------------------------------------------------------------- writing
def _refuse(adapter: Adapter, target: str, why: str):
    raise AdapterFormatError(f"{adapter.source or 'adapter'}: cannot write it as {target} exactly: {why}")


def to_tensors(adapter: Adapter, target: str, *, n_heads: int | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors as `target` stores them; AdapterFormatError when `target` cannot hold it exactly."""
    if target not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {target!r}")
    if target == "lladapter":
        return adapter.state_dict(n_heads)
    if target in ("peft", "official") and adapter.prompt_projection != "wk_wv":
        _refuse(adapter, target, "its prompt is projected the LitGPT way (prompt_projection=litgpt); "
                f"{target} projects it with the layer's k and v projections, which gives other keys and values "
                "unless the model has one kv head")
    out: dict[str, torch.Tensor] = {}
    if target == "peft":
        for i, g in adapter.effective_gates().items():
            if not bool((g == g[0]).all()):
                _refuse(adapter, "peft", f"layer {i} has different gates per head ({g.tolist()[:4]}...); PEFT has "
                        "one gate per layer")
            out[f"base_model.model.model.layers.{i}.self_attn.adaption_prompt"] = adapter.prompts[i].unsqueeze(0)
            out[f"base_model.model.model.layers.{i}.self_attn.adaption_gate"] = g[:1].clone()
        return out
    heads = n_heads or adapter.n_heads
    if target == "litgpt":
        if adapter.prompt_projection != "litgpt" and adapter.n_kv_heads != 1:
            _refuse(adapter, "litgpt", "LitGPT 0.5 reads the prompt's keys and values from interleaved slices of "
                    "its stacked [q; k; v] projection, which differ from the k and v projections unless the model "
                    "has a single kv head" + (" (this adapter does not record its kv heads)"
                                              if adapter.n_kv_heads is None else
                                              f" (this one has {adapter.n_kv_heads})"))
        for i, g in adapter.effective_gates().items():
            if g.numel() == 1:
                if heads is None:
                    _refuse(adapter, "litgpt", "one gate per layer; give --n-heads for LitGPT's per-head gates")
                g = g.expand(heads)
            out[f"transformer.h.{i}.attn.adapter_wte.weight"] = adapter.prompts[i]
            out[f"transformer.h.{i}.attn.gating_factor"] = g.reshape(1, 1, -1, 1).clone()
        return out
    # official: tanh gates per head, every layer, prompts stacked top layers first to last
    gates = {}
    for i in adapter.layers:
        g = adapter.gates[i]
        if adapter.gate_act == "identity":
            if not bool((g.abs() < 1).all()):
                _refuse(adapter, "official", f"layer {i} has a gate of magnitude >= 1, which no tanh gate reaches")
            raw = torch.atanh(g.double()).float()
            if not torch.allclose(torch.tanh(raw), g, rtol=2e-6, atol=0):
                _refuse(adapter, "official", f"layer {i}'s gate is too close to +-1 to be a tanh gate in fp32")
            g = raw
        if g.numel() == 1:
            if heads is None:
                _refuse(adapter, "official", "one gate per layer; give --n-heads for the official per-head gates")
            g = g.expand(heads)
        gates[i] = g.reshape(1, -1, 1, 1).clone()
    H = next(iter(gates.values())).shape[1]
    for i in range(adapter.n_layers):
        out[f"layers.{i}.attention.gate"] = gates.get(i, torch.zeros(1, H, 1, 1))
    out["adapter_query.weight"] = torch.cat([adapter.prompts[i] for i in adapter.layers])
    return out


def write_adapter(adapter: Adapter, out: str | os.PathLike, target: str, *, n_heads: int | None = None,
                  overwrite: bool = False) -> str:
    """Write `adapter` at `out` in `target` format (PEFT: a directory; the others: one file) and return the path.
    Everything is written next to `out` first and moved into place at the end: a failure leaves nothing."""
    out = os.fspath(out)
    tensors = to_tensors(adapter, target, n_heads=n_heads)  # refusals come before anything is written
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out}: exists (overwrite=True / --force replaces it)")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lladapter-convert-", dir=parent)
    try:
        if target == "peft":
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, PEFT_WEIGHTS[0]))
            cfg = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": adapter.adapter_len,
                   "adapter_layers": adapter.adapter_layer, "target_modules": "self_attn",
                   "base_model_name_or_path": None, "revision": None, "inference_mode": True, "auto_mapping": None}
            with open(os.path.join(tmp, PEFT_CONFIG), "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2)
            staged = tmp
        else:
            staged = os.path.join(tmp, "adapter")
            if target == "lladapter":
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in tensors.items()}, staged, metadata=adapter.metadata())
            else:
                torch.save({"model": tensors} if target == "litgpt" else tensors, staged)
        if os.path.isdir(out) and not os.path.islink(out):
            shutil.rmtree(out)
        elif os.path.lexists(out):
            os.remove(out)
        os.replace(staged, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert(src: str | os.PathLike, out: str | os.PathLike, target: str, *, source_format: str | None = None,
            adapter_len: int | None = None, n_heads: int | None = None, overwrite: bool = False) -> Adapter:
    """read_adapter(src) written as `target` at `out` (see write_adapter); returns the adapter read."""
    adapter = read_adapter(src, source_format, adapter_len=adapter_len)
    if n_heads is not None and adapter.n_heads is not None and n_heads != adapter.n_heads:
        raise AdapterFormatError(f"{adapter.source}: --n-heads {n_heads}, but its gates have {adapter.n_heads}")
    write_adapter(adapter, out, target, n_heads=n_heads, overwrite=overwrite)
    return adapter


def resolve_adapter(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(what to pass to load_adapter, our metadata) for an adapter in any format: our file (a run directory resolves
    to its adapter file) with its metadata, or a foreign one as given with the metadata of its conversion."""
    from .adapter import read_adapter_metadata
    from .checkpoint import find_adapter_file

    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "lladapter":
        path = find_adapter_file(path)
        return path, read_adapter_metadata(path)
    return path, read_adapter(path, fmt).metadata()


def describe(adapter: Adapter) -> str:
    heads = f"{adapter.n_heads} heads" if adapter.n_heads else "one gate per layer"
    return (f"{adapter.format} adapter: K={adapter.adapter_len} prompt tokens in the top {adapter.adapter_layer} of "
            f"{adapter.n_layers} layers, width {adapter.dim}, {heads}, {adapter.gate_act} gate, prompt projection "
            f"{adapter.prompt_projection}; max |phi(gate)| "
            f"{max(float(g.abs().max()) for g in adapter.effective_gates().values()):.4g}")


__all__ = ["FORMATS", "Adapter", "AdapterFormatError", "detect_format", "read_adapter", "to_tensors",
           "write_adapter", "convert", "describe", "resolve_adapter"]
