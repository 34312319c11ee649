import pytest
import torch

import lladapter_ext

HAS_CUDA_GPU = torch.cuda.is_available() and lladapter_ext.cuda_kernels_available()
CUDA_SKIP_REASON = (
    "no CUDA GPU visible (CUDA kernels compiled in: %s); run `make gpu-check` on a GPU machine"
    % lladapter_ext.cuda_kernels_available())

# Every kernel test runs on each device; the CUDA variant is skipped, with the reason, when no GPU is visible.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA_GPU, reason=CUDA_SKIP_REASON))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
