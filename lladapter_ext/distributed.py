"""Distributed fine-tuning set-up (torchrun): joining and leaving the process group, FSDP2 sharding, and the
collectives of a step (the adapter broadcast at start, the gradient all-reduce). The loop is lladapter_ext.training.

Data parallel: only the adapter is trainable, so only its gradients are reduced, in one flattened all-reduce (SUM)
per optimizer step after the accumulation (the frozen weights are never broadcast or reduced: every process loads
them from the same checkpoint). FSDP2: every block of ``model.layers`` and the root are sharded; gradients are
reduce-scattered with SUM, the trainer normalising by the token count of the whole step itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .adapter import is_dtensor

__all__ = ["DistInfo", "init_distributed", "finish_distributed", "dist_info", "apply_fsdp", "broadcast_adapter",
           "all_reduce_step", "scalar"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL when CUDA is
    available, else gloo; each process uses cuda:LOCAL_RANK. A single process (no WORLD_SIZE) does nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return dist_info()


def finish_distributed() -> None:
    """Leave the process group init_distributed joined, after a barrier: a process that tears its group down while
    a peer still finishes its last collective can make gloo abort that peer ("terminate called without an active
    exception"). No-op for a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def apply_fsdp(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2: ``fully_shard`` every block of ``model.layers``, then the root (embeddings, final norm, head), over
    all processes of the default group on ``device``'s type. Gradients are reduce-scattered with SUM (no division
    by the world size): the trainer normalises the loss by the token count of the whole step itself."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = getattr(model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"fsdp=True needs a model with a `layers` ModuleList of blocks to shard; "
                         f"{type(model).__name__} has none")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def scalar(x) -> float:
    """A Python float of a 0-d tensor, gathered first when it is sharded (a DTensor)."""
    return float(x.full_tensor()) if is_dtensor(x) else float(x)


def broadcast_adapter(model: torch.nn.Module, device: torch.device) -> None:
    """Copy rank 0's adapter parameters to every process (before FSDP sharding: each rank still holds full tensors;
    `device`: where the collective runs, cuda for NCCL, cpu for gloo)."""
    with torch.no_grad():
        for p in model.adapter_parameters():
            buf = p.detach().to(device)
            dist.broadcast(buf, src=0)
            p.copy_(buf)


def all_reduce_step(params: list[torch.nn.Parameter], loss_sum: torch.Tensor, n_tokens: int, *,
                    sharded: bool) -> tuple[float, int]:
    """Sum the adapter gradients, the loss sum and the token count of one optimizer step over all processes, in one
    collective (a flat buffer); under FSDP (sharded) the gradients were reduce-scattered in backward already and
    only the two numbers are summed. Single process: nothing to do."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(loss_sum), n_tokens
    device = loss_sum.device
    if sharded:
        flat = torch.stack([loss_sum.float(), torch.tensor(float(n_tokens), device=device)])
        dist.all_reduce(flat)
        return float(flat[0]), int(flat[1].item())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]
                     + [torch.stack([loss_sum.float(), torch.tensor(float(n_tokens), device=device)])])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()
    return float(flat[-2]), int(flat[-1].item())

