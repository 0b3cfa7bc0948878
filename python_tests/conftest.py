"""Shared fixtures: `device` runs a test on the CPU and, when a GPU is usable, on CUDA."""
import pytest
import torch


def cuda_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    import lusscore
    return lusscore.build_info()["cuda_kernels"]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not cuda_usable(), reason="needs a CUDA GPU and lusscore built with CUDA kernels"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


requires_cuda = pytest.mark.skipif(not cuda_usable(),
                                   reason="needs a CUDA GPU and lusscore built with CUDA kernels")
