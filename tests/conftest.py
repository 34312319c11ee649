import pytest
import torch

import lladapter_ext
from lladapter_ext import emulator, ops

HAS_CUDA_GPU = torch.cuda.is_available() and lladapter_ext.cuda_kernels_available()
CUDA_SKIP_REASON = (
    f"no CUDA GPU visible (CUDA kernels compiled in: {lladapter_ext.cuda_kernels_available()}); run `make gpu-check` "
    "on a GPU machine")
EMU_SKIP_REASON = "the CUDA emulator (lladapter_ext._emu) is not built: it needs the CUDA toolkit's headers"


class KernelDevice(str):
    """A kernel test's device: "cpu" (the CPU kernels), "cuda" (the CUDA kernels on a GPU) or "emu" (the same CUDA
    kernels on CPU tensors, run by the emulator: lladapter_ext.emulator, docs/emulator.md).

    As a str it is the torch device its tensors live on ("cpu" for "emu"), so `torch.randn(..., device=device)`
    works unchanged; `device.cuda_kernels` says whether the CUDA kernels run, and with them the CUDA rules (head
    dims, no float64). For "emu", an autouse fixture routes lladapter_ext.ops to torch.ops.lladapter_emu and
    allocates the test's tensors against guard pages."""

    def __new__(cls, name: str, torch_device: str, cuda_kernels: bool):
        obj = super().__new__(cls, torch_device)
        obj.name = name
        obj.cuda_kernels = cuda_kernels
        return obj

    def __repr__(self):
        return self.name


CPU = KernelDevice("cpu", "cpu", False)
CUDA = KernelDevice("cuda", "cuda", True)
EMU = KernelDevice("emu", "cpu", True)

_CUDA_PARAM = pytest.param(CUDA, id="cuda", marks=pytest.mark.skipif(not HAS_CUDA_GPU, reason=CUDA_SKIP_REASON))
_EMU_PARAM = pytest.param(EMU, id="emu", marks=[pytest.mark.emu,
                                                 pytest.mark.skipif(not emulator.available(), reason=EMU_SKIP_REASON)])
# Every kernel test runs on each device; the CUDA variant is skipped, with the reason, when no GPU is visible.
DEVICES = [pytest.param(CPU, id="cpu"), _CUDA_PARAM, _EMU_PARAM]
# Tests of the CUDA kernels alone (tensor-core and decode paths, their environment switches).
CUDA_DEVICES = [_CUDA_PARAM, _EMU_PARAM]


def kernel_ops():
    """The op namespace the kernels are registered in for the running test: torch.ops.lladapter, or
    torch.ops.lladapter_emu under the emulator."""
    return getattr(torch.ops, ops.kernel_namespace())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a whole module (modules of tiny models: `pytestmark =
    pytest.mark.usefixtures("one_torch_thread")`): with small matrices one thread is fastest, and on a busy 2-core
    machine extra threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _emulated_cuda(request):
    """For device "emu": the CUDA kernels run by the emulator, tensors against guard pages."""
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device") if callspec is not None else None
    if isinstance(device, KernelDevice) and device.name == "emu":
        with emulator.kernels(), emulator.guarded_memory():
            yield
    else:
        yield
