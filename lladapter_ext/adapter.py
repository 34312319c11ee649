"""The adapter of every model family: which parameters belong to it, freezing the rest, and its file.

Each family (LlamaForCausalLM, MultiModalLlama, VisionTransformer, CLIP) mixes in `AdapterMixin` and says three
things: which parameter names are the adapter's (`is_adapter_param`), what describes the adapter
(`adapter_metadata`), and whether a file's metadata fits the model (`check_adapter_metadata`). The mixin gives
every family the same methods: `named_adapter_parameters`, `adapter_parameters`, `freeze_base`,
`count_trainable`, `adapter_state_dict`, `save_adapter`, `load_adapter`.

The adapter file is safetensors: the adapter tensors by parameter name, and string metadata (safetensors metadata
maps str to str) with `"format": "lladapter-adapter"`, `"family"` and the family's hyper-parameters as strings.
Files written before this format keep loading: LLaMA files carry the same keys without "format" and "family";
ViT/CLIP files carry their config as JSON under "lladapter_adapter" (LEGACY_CONFIG_KEY).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from collections.abc import Callable

import torch

ADAPTER_FORMAT = "lladapter-adapter"
LEGACY_CONFIG_KEY = "lladapter_adapter"

PathOrStateDict = str | os.PathLike | dict


def is_dtensor(t: torch.Tensor) -> bool:
    """A torch.distributed.tensor.DTensor (an FSDP2-sharded parameter or its gradient)."""
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def first_non_finite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor (in the dict's order) that holds a NaN or an inf, else None.
    Sharded tensors (FSDP DTensors) are checked on this process's shard."""
    for name, t in tensors.items():
        if not torch.is_tensor(t) or not (t.is_floating_point() or t.is_complex()):
            continue
        local = t.to_local() if is_dtensor(t) else t
        if not bool(torch.isfinite(local.detach()).all()):
            return name
    return None


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of an adapter file ({} when it has none). Raises ValueError naming the file when it is
    not a readable safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - reported with the file's name
        raise ValueError(f"{os.fspath(path)}: not a readable safetensors adapter file ({e})") from e


def read_adapter_tensors(path_or_state_dict: PathOrStateDict) -> tuple[dict, dict[str, str] | None, str]:
    """(tensors, metadata, a name for error messages) of an adapter given as a safetensors file (read once) or a
    state dict (metadata None). A tensor holding NaN or inf is refused (a diverged run's adapter would make the
    model emit nothing useful)."""
    if isinstance(path_or_state_dict, dict):
        sd, meta, source = path_or_state_dict, None, "state dict"
    else:
        from safetensors import safe_open

        source = os.fspath(path_or_state_dict)
        try:
            with safe_open(source, framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"load_adapter: cannot read {source}: {e}") from e
    name = first_non_finite(sd)
    if name is not None:
        t = sd[name].detach()
        raise ValueError(f"load_adapter: tensor {name} in {source} is not finite ({int(t.isnan().sum())} NaN, "
                         f"{int(t.isinf().sum())} inf of {t.numel()} values): the adapter is unusable (was its "
                         "training run diverging?)")
    return sd, meta, source


def check_tensors(own: dict[str, torch.Tensor], tensors: dict, source: str,
                  display: Callable[[str], str] = lambda name: name, context: str = "") -> None:
    """Raise ValueError unless `tensors` holds exactly the names of `own`, each a floating tensor of the same shape.
    Messages name the tensor as the file does (`display` maps our name to it) and say what was expected; context
    (e.g. "does not fit this model's adapter (adapter_len=10, ...)") comes after the source."""
    where = f"{source}: " + (f"{context}: " if context else "")
    unexpected = [n for n in tensors if n not in own]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{where}unexpected tensor {display(unexpected[0])!r}{more}")
    missing = sorted(n for n in own if n not in tensors)
    if missing:
        more = f" (and {len(missing) - 1} more: {[display(n) for n in missing[1:4]]})" if len(missing) > 1 else ""
        raise ValueError(f"{where}missing tensor {display(missing[0])!r}{more}")
    for name, dst in own.items():
        src = tensors[name]
        if not isinstance(src, torch.Tensor):
            raise ValueError(f"{where}entry {display(name)!r} is {type(src).__name__}, not a tensor")
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{where}tensor {display(name)!r} has shape {list(src.shape)}, expected "
                             f"{list(dst.shape)}")
        if not src.is_floating_point():
            raise ValueError(f"{where}tensor {display(name)!r} has dtype {src.dtype}, expected a floating dtype")


class AdapterMixin:
    """The adapter methods every model family shares; see the module docstring for what a family provides."""

    ADAPTER_FAMILY: str = ""

    # ---------------------------------------------------------------- what a family provides
    def is_adapter_param(self, name: str) -> bool:
        raise NotImplementedError

    def is_head_param(self, name: str) -> bool:
        """A task-head parameter that trains with the adapter (ViT's classifier); freeze_base(train_head=False)
        freezes it."""
        return False

    def adapter_metadata(self) -> dict[str, str]:
        raise NotImplementedError

    def adapter_description(self) -> str:
        """The adapter's shape-determining hyper-parameters, for error messages ("adapter_len=10, ...")."""
        return ", ".join(f"{k}={v}" for k, v in self.adapter_metadata().items())

    def check_adapter_metadata(self, meta: dict[str, str] | None, tensors: dict, source: str) -> None:
        """Raise ValueError when an adapter file (its metadata and tensor names) does not fit this model, before
        the tensors are compared one by one. `meta` is None for a state dict."""

    def read_adapter(self, path_or_state_dict: PathOrStateDict) -> tuple[dict, dict[str, str] | None, str]:
        """(tensors under our names, metadata, a name for messages) for load_adapter: read_adapter_tensors; a
        family that reads other tools' formats too (LLaMA: lladapter_ext.interop) converts them here."""
        return read_adapter_tensors(path_or_state_dict)

    # ---------------------------------------------------------------- shared
    def named_adapter_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, p in self.named_parameters():
            if self.is_adapter_param(name):
                yield name, p

    def adapter_parameters(self) -> Iterator[torch.nn.Parameter]:
        for _, p in self.named_adapter_parameters():
            yield p

    def freeze_base(self, train_head: bool = True) -> list[str]:
        """Only the adapter's parameters (and the task head when train_head) require grad; returns their names."""
        trainable = []
        for name, p in self.named_parameters():
            keep = self.is_adapter_param(name) and (train_head or not self.is_head_param(name))
            p.requires_grad_(keep)
            if keep:
                trainable.append(name)
        return trainable

    def count_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors, detached, by their parameter names. Parameters sharded by FSDP are gathered to full
        tensors (a collective: every process must call it)."""
        return {name: (p.full_tensor() if is_dtensor(p) else p).detach()
                for name, p in self.named_adapter_parameters()}

    def save_adapter(self, path: str | os.PathLike,
                     state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter tensors and metadata to a safetensors file. state_dict: tensors from
        adapter_state_dict() to write instead of calling it (FSDP: gathered on every process, written by one)."""
        from safetensors.torch import save_file

        meta = {"format": ADAPTER_FORMAT, "family": self.ADAPTER_FAMILY, **self.adapter_metadata()}
        state_dict = self.adapter_state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, os.fspath(path), metadata=meta)

    def load_adapter(self, path_or_state_dict: PathOrStateDict):
        """Load an adapter from a safetensors file or a state dict. Every adapter tensor must be present with the
        model's shape and nothing else may be; errors name the tensor and the file."""
        tensors, meta, source = self.read_adapter(path_or_state_dict)
        self.check_adapter_metadata(meta, tensors, source)
        own = dict(self.named_adapter_parameters())
        check_tensors(own, tensors, f"load_adapter: {source}",
                      context=f"does not fit this model's adapter ({self.adapter_description()})")
        with torch.no_grad():
            for name, p in own.items():
                t = tensors[name]
                if p.is_meta:
                    set_parameter(self, name, t.to(dtype=p.dtype), requires_grad=True)
                elif is_dtensor(p):  # sharded (FSDP): keep this process's shard of the full tensor
                    from torch.distributed.tensor import distribute_tensor
                    p.copy_(distribute_tensor(t.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements))
                else:
                    p.copy_(t)
        return self


def config_metadata(config: dict) -> dict[str, str]:
    """A family's adapter config (a flat dict of numbers and strings) as adapter-file metadata."""
    return {k: str(v) for k, v in config.items()}


def saved_config(meta: dict[str, str]) -> dict[str, str] | None:
    """The adapter config an adapter file's metadata records, as strings (the legacy JSON form converted), or None
    when the file has no lladapter metadata."""
    if LEGACY_CONFIG_KEY in meta:
        return config_metadata(json.loads(meta[LEGACY_CONFIG_KEY]))
    if meta.get("format") == ADAPTER_FORMAT:
        return {k: v for k, v in meta.items() if k not in ("format", "family")}
    return None


def set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    """Replace parameter `name` (dotted) of model by a new Parameter holding value."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    setattr(mod, attr, torch.nn.Parameter(value, requires_grad=requires_grad))
