"""lladapter_ext: LLaMA-Adapter for PyTorch with fused C++/CUDA kernels.

Importing the package loads the compiled extension (lladapter_ext._C), which registers the ops under
torch.ops.lladapter. `build_info()` says what was compiled in.
"""
from __future__ import annotations

import torch

__version__ = "0.1.0"


def _load_extension():
    try:
        from . import _build_info as info
    except ImportError as e:  # not built at all
        raise ImportError(
            "lladapter_ext is not built: run `make setup` (or `pip install --no-build-isolation -e .`) "
            "from the source tree") from e
    built = info.TORCH_VERSION.split("+")[0]
    running = torch.__version__.split("+")[0]
    if built != running or (info.TORCH_CUDA or None) != (torch.version.cuda or None):
        raise ImportError(
            f"lladapter_ext was built against torch {info.TORCH_VERSION} (CUDA {info.TORCH_CUDA}) but torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) is installed; rebuild it: "
            "`pip install --no-build-isolation -e .` (or `make setup`)")
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(f"lladapter_ext._C failed to load ({e}); rebuild with "
                          "`pip install --no-build-isolation -e .`") from e
    return _C


_C = _load_extension()

from . import ops  # noqa: E402  (registers autograd and fake implementations)
from . import nn  # noqa: E402


def build_info() -> dict:
    """What the extension was compiled with: with_cuda, cuda_archs, cpu_isa, torch_version, debug."""
    return dict(_C.build_info())


def cuda_kernels_available() -> bool:
    """True when CUDA kernels are compiled in (a GPU may still be absent at run time)."""
    return bool(_C.build_info()["with_cuda"])


__all__ = ["ops", "nn", "build_info", "cuda_kernels_available", "__version__"]
