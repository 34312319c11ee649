"""torch.nn modules over the lladapter ops."""
from __future__ import annotations

import torch

from . import ops


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension with a learnable per-feature weight (initialised to ones).

    Same semantics as HF's LlamaRMSNorm and Meta's RMSNorm (see ops.rms_norm), computed by the fused kernel.
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm: dim must be positive, got {dim}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
