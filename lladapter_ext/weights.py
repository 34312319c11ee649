"""Base-model weights into LlamaForCausalLM, whatever the checkpoint format (lladapter_ext.loaders reads the
formats): the model is built on the meta device and filled one tensor at a time, each checked against the shape the
config implies and converted to the target dtype and device; torch files are read as data only. Errors are
CheckpointError naming the file and the tensor.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .adapter import set_parameter
from .host_heap import release_freed_heap
from .model import LlamaConfig, LlamaForCausalLM

if TYPE_CHECKING:
    from .quantize import Quantization

PathLike = str | os.PathLike
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing/extra/mis-shaped tensor, corrupt or unsafe file."""


class _Source:
    """Where each of our parameter names comes from: fetch(name) -> tensor, file_of(name) -> file name."""

    def __init__(self, entries: dict[str, tuple[str, str, Callable[[], torch.Tensor]]], all_files: list[str],
                 extra: dict[str, str]):
        self.entries = entries  # our name -> (checkpoint tensor name, file, fetch)
        self.all_files = all_files
        self.extra = extra  # checkpoint tensor name -> file, for tensors we have no use for


def _fill_model(config: LlamaConfig, source: _Source, dtype, device, what: str,
                quantization: Quantization | None = None) -> LlamaForCausalLM:
    """The model from `source`, base frozen, fresh adapter. quantization (lladapter_ext.quantize.Quantization; None:
    a float base): each base projection is stored in its format as it is read (a source with a
    `quantized(name, fmt)` method, GGUF, hands over blocks that map exactly; the rest is quantized from fp32), so no
    full-precision copy of it stays alive; with its `head`, an untied LM head too (a tied one stays with the float
    embeddings; logged). The model's `quantization` attribute records the format, how many layers were mapped /
    requantised, and whether the head is quantized."""
    from .quantize import QuantizedLinear, head_is_quantized, limit_head_scratch, set_quantized
    fmt = quantization.format if quantization is not None else None
    if source.extra:
        name, file = next(iter(source.extra.items()))
        raise CheckpointError(f"{file}: unexpected tensor {name!r} for a {what} LLaMA model with "
                              f"{config.n_layers} layers ({len(source.extra)} unexpected in all)")
    with torch.device("meta"):
        model = LlamaForCausalLM(config, device="meta", dtype=dtype)
    counts = {"exact": 0, "requantized": 0}
    for name, param in list(model.named_parameters()):
        if LlamaForCausalLM.is_adapter_param(name):
            continue
        if quantization is not None and quantization.quantizes(name) and name in source.entries:
            exact = getattr(source, "quantized", None)
            ck_name, file = source.entries[name][:2]
            try:
                blocks = exact(name, fmt) if exact else None
            except Exception as e:  # a truncated or inconsistent block array
                raise CheckpointError(f"{file}: cannot read tensor {ck_name!r}'s quantized blocks: "
                                      f"{type(e).__name__}: {e}") from e
            if blocks is not None:
                codes, scales = blocks
                if (codes.shape[0], codes.shape[1]) != tuple(param.shape):
                    raise CheckpointError(f"{file}: tensor {ck_name!r} has shape {list(codes.shape)}, expected "
                                          f"{list(param.shape)} for {name}")
                set_quantized(model, name, QuantizedLinear.from_codes(fmt, codes, scales, dtype, device,
                                                                      name=f"{file}: {ck_name}"))
                counts["exact"] += 1
                continue
        if name not in source.entries:
            files = ", ".join(source.all_files)
            raise CheckpointError(f"{files}: missing tensor for {name} (checkpoint has no "
                                  f"{_expected_ckpt_name(source, name)})")
        ck_name, file, fetch = source.entries[name]
        try:
            t = fetch()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {ck_name!r}: {type(e).__name__}: {e}") from e
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"{file}: tensor {ck_name!r} has shape {list(t.shape)}, expected "
                                  f"{list(param.shape)} for {name} (config: dim={config.dim}, "
                                  f"vocab_size={config.vocab_size}, n_heads={config.n_heads}, "
                                  f"n_kv_heads={config.n_kv_heads}, ffn_dim={config.ffn_dim})")
        if not (t.is_floating_point()):
            raise CheckpointError(f"{file}: tensor {ck_name!r} has dtype {t.dtype}, expected a floating type")
        if quantization is not None and quantization.quantizes(name):  # where the float tensor is (no device copy)
            set_quantized(model, name, QuantizedLinear.from_float(t, fmt, dtype, device,
                                                                  name=f"{file}: {ck_name}"))
            counts["requantized"] += 1
            del t
            # after every tensor, not only at the end: without it, 5 of 12 int8 SmolLM2 loads peaked at ~800 MiB
            # (more than the whole fp32 model) instead of ~230, the freed float temporaries kept in the heap
            # (timing-dependent; 0 of 12 with it, and no slower)
            release_freed_heap()
            continue
        value = t.to(device=device, dtype=dtype)
        if value.data_ptr() == t.data_ptr() and not getattr(source, "fresh_tensors", False):
            # never alias a memory-mapped file (a source of fresh tensors, e.g. a random init, needs no copy)
            value = value.clone()
        set_parameter(model, name, value, requires_grad=False)
        del t
    # the adapter is not part of a base checkpoint: fresh prompts, zero gates
    for name, param in list(model.named_parameters()):
        if LlamaForCausalLM.is_adapter_param(name):
            set_parameter(model, name, torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=True)
    model.reset_parameters(base=False, adapter=True)
    model.freeze_base()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{', '.join(source.all_files)}: parameters left uninitialised: {left[:5]}")
    model.quantization = dict(format=fmt, **counts, head=head_is_quantized(model)) if fmt else None
    limit_head_scratch(model)
    if quantization is not None and quantization.head and config.tie_embeddings:
        log.warning("quantize_head: the LM head is tied to the embeddings, which stay in %s; the head is not "
                    "quantized", str(dtype).replace("torch.", ""))
    if fmt:
        release_freed_heap()
    return model


def _expected_ckpt_name(source: _Source, name: str) -> str:
    return getattr(source, "ckpt_name_of", lambda n: n)(name)


def load_tensor_file(file: PathLike) -> dict:
    """torch.load a .pth/.bin as data only (weights_only=True), memory-mapped when the format allows; a dict of
    tensors (under "model" in training checkpoints), else CheckpointError naming the file."""
    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as e:
        if not re.search(r"GLOBAL|Unsupported global", str(e)):  # no pickled class or function: not a checkpoint
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", str(e), re.S)
            raise CheckpointError(f"{file}: cannot read checkpoint (corrupt, truncated or not a torch file): "
                                  f"{(detail.group(1) if detail else str(e))[:200]}") from e
        raise CheckpointError(
            f"{file}: refused: this file needs pickled Python code to load, and checkpoints are loaded as data "
            f"only (torch.load weights_only=True). Convert it to safetensors with code you trust. ({e})".replace(
                "\n", " ")[:800]) from e
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read checkpoint (corrupt or truncated?): {type(e).__name__}: {e}") \
            from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
    for k, v in sd.items():
        if not torch.is_tensor(v):
            raise CheckpointError(f"{file}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    return sd


def _config(kw: dict, where) -> LlamaConfig:
    """LlamaConfig(**kw); an invalid value (a zero or negative size, heads that do not divide) raises
    CheckpointError naming the file the values came from."""
    try:
        return LlamaConfig(**kw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid model config: {e}") from e


def _check_vocab(tok, config: LlamaConfig, where) -> None:
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model's embedding has "
                              f"{config.vocab_size} rows (tensor tok_embeddings / embed_tokens / token_embd)")
