"""The host heap's policy for this process: hand freed memory back to the OS after a load (release_freed_heap), or keep
it for the next training step, each freed block reusable by the next request of its size (keep_freed_heap: glibc's
mallopt and the exact-fit CPU allocator of csrc/host_heap.h). Both are no-ops where the C library is not glibc."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

KEEP_FREED_HEAP_ENV = "LLADAPTER_KEEP_FREED_HEAP"
# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt's value is a C int

_kept = False


def _glibc():
    """The C library as ctypes sees it, or None where it is not glibc (musl's mallopt does nothing). Told by a
    glibc-only symbol, not platform.libc_ver(), which reads the interpreter's binary and can miss it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def release_freed_heap() -> None:
    """Hand the float temporaries of a quantized load back to the OS: glibc keeps freed blocks below its (adaptive,
    up to 32 MiB) mmap threshold in the heap, which left a quantized SmolLM2 resident at twice the fp32 model's
    size. Works after keep_freed_heap() too (malloc_trim ignores the trim threshold)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_heap() -> bool:
    """Keep the memory a CPU training step frees for the next step instead of handing it back to the OS and
    faulting it in again, and let each freed block serve the next request of its size. By default glibc trims the
    heap's free top and serves blocks it cannot fit in the heap above its mmap threshold (adaptive, at most 32 MiB;
    a 49152-word head's logits on 256 rows are 50 MB) with a fresh mmap, so a step touches tens of MB of new pages.
    On the 2-core AMD EPYC VM that was 12-21k page faults per SmolLM2 training step (B 4 x T 128), most of them
    taken inside the GEMMs that first write their outputs; with this policy none, and the step 1.06x faster (median
    of 6 alternated process pairs, 1.00-1.09x; docs/benchmarks.md). Sets mallopt(M_MMAP_MAX, 0) (every block from
    the heap) and mallopt(M_TRIM_THRESHOLD, INT_MAX) (no trimming), and makes the exact-fit allocator torch's CPU
    allocator (_C.install_exact_fit_allocator, csrc/host_heap.h): torch's own asks posix_memalign for 64-byte
    alignment, and glibc's padding for it leaves a freed block too small for the next request of the same size, so
    the temporaries a step frees between the activations it keeps were holes the heap grew around (a TinyLlama-shape
    step's heap 5742 MiB for 5234 MiB in use at its peak; with the exact-fit allocator 5243 MiB). The cost: the
    process stays at its high-water mark, which a training loop reaches every step anyway. Process-wide and not
    undone; called by the CPU training loops (Trainer.train, train_encoder_task). LLADAPTER_KEEP_FREED_HEAP=0 leaves
    glibc's defaults and torch's allocator; with THP_MEM_ALLOC_ENABLE=1 (torch's huge-page allocation) torch's
    allocator stays too. Returns whether the policy is in force."""
    global _kept
    if _kept:
        return True
    value = os.environ.get(KEEP_FREED_HEAP_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{KEEP_FREED_HEAP_ENV} must be 0 or 1, got {value!r}")
    if value == "0":
        return False
    libc = _glibc()
    if libc is None or not _keep_heap_blocks(libc):
        return False
    if os.environ.get("THP_MEM_ALLOC_ENABLE", "").strip() != "1":
        from . import _C

        _C.install_exact_fit_allocator()
    _kept = True
    return True


def _keep_heap_blocks(libc) -> bool:
    """glibc's half of keep_freed_heap: every block from the heap, and the heap never trimmed."""
    if libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX):
        return True
    log.warning("keep_freed_heap: glibc refused mallopt; training keeps the default heap policy")
    return False
