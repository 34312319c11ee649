"""The CUDA kernels on the CPU: csrc/cuda compiled by the host compiler against the SIMT emulator (csrc/emu) and
registered as torch.ops.lladapter_emu.* on CPU tensors, with the same schemas as torch.ops.lladapter.

    from lladapter_ext import emulator, ops
    with emulator.kernels():                 # ops.* (and every model built on them) run the emulated CUDA kernels
        y = ops.rms_norm(x, w)               # x, w: CPU tensors
    emulator.configure(schedule="random", seed=3)     # the knobs: docs/emulator.md
    with emulator.device_profile("sm80", sm_count=7): ...
    with emulator.guarded_memory(): ...      # CPU tensors end against a guard page, fresh memory is NaN

The emulator checks what a GPU would not tell (barriers, warp masks, shared and global memory bounds, wmma
contracts, launch limits); a failed check raises RuntimeError naming the kernel, block and thread.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import ops

try:
    from . import _emu
except ImportError as _e:  # not built (no CUDA headers at build time, or LLADAPTER_BUILD_EMU=0)
    _emu = None
    _IMPORT_ERROR: ImportError | None = _e
else:
    _IMPORT_ERROR = None
    ops.register_implementations("lladapter_emu")

NAMESPACE = "lladapter_emu"


def available() -> bool:
    """True when the emulator extension (lladapter_ext._emu) was built."""
    return _emu is not None


def _module():
    if _emu is None:
        raise RuntimeError(
            "the CUDA emulator (lladapter_ext._emu) is not built: it needs the CUDA toolkit's headers at build time "
            f"(set CUDA_HOME) and LLADAPTER_BUILD_EMU not 0; import error: {_IMPORT_ERROR}")
    return _emu


@contextlib.contextmanager
def kernels() -> Iterator[None]:
    """Within the block, lladapter_ext.ops calls the emulated CUDA kernels (torch.ops.lladapter_emu) instead of the
    real ones; inputs are CPU tensors. backend="auto" chooses as it does on CUDA."""
    _module()
    previous = ops._lib
    ops._lib = getattr(torch.ops, NAMESPACE)
    try:
        yield
    finally:
        ops._lib = previous


def configure(**knobs) -> dict:
    """Sets emulator knobs (schedule, seed, layout, layout_seed, workers, stack_kib; docs/emulator.md) and returns
    the previous configuration."""
    m = _module()
    previous = dict(m.config())
    m.configure(**knobs)
    return previous


def config() -> dict:
    return dict(_module().config())


@contextlib.contextmanager
def configured(**knobs) -> Iterator[None]:
    """configure(**knobs) for the block, then the previous configuration again."""
    previous = configure(**knobs)
    try:
        yield
    finally:
        _module().configure(**previous)


@contextlib.contextmanager
def device_profile(name: str, sm_count: int | None = None) -> Iterator[dict]:
    """Emulates the device `name` ("sm80": A100-like, "sm90": H100/H200-like), optionally with another SM count,
    for the block (SM counts change split and chunking decisions)."""
    m = _module()
    previous = dict(m.device_profile())
    m.set_device_profile(name, sm_count)
    try:
        yield dict(m.device_profile())
    finally:
        m.set_device_profile(previous["name"], previous["sm_count"])


@contextlib.contextmanager
def guarded_memory() -> Iterator[None]:
    """CPU tensors allocated in the block end against a guard page (a kernel that reads or writes past the end of
    one raises), and fresh memory is filled with 0xFF (NaN) so that outputs a kernel never wrote show."""
    m = _module()
    m.guarded_allocator(True)
    try:
        yield
    finally:
        m.guarded_allocator(False)


def wmma_fragment_layouts() -> torch.Tensor:
    """[8, 32, 16]: the matrix element (code r * 16 + c) each lane holds in x[i] of each wmma fragment kind the
    tensor-core kernels use, under the current layout knob (csrc/cuda/wmma_layout_probe.cu; NaN past
    num_elements). scripts/gpu_check.sh compares it with the same probe on a GPU."""
    return _module().wmma_fragment_layouts()


def launched_kernels() -> dict:
    """Kernel name (as written at its launch) -> launch statistics, since the last reset_stats()."""
    return dict(_module().launched_kernels())


def stats() -> dict:
    return dict(_module().stats())


def reset_stats() -> None:
    _module().reset_stats()


__all__ = ["available", "kernels", "configure", "config", "configured", "device_profile", "guarded_memory",
           "wmma_fragment_layouts", "launched_kernels", "stats", "reset_stats", "NAMESPACE"]
