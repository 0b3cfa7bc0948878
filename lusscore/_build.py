"""build_info(): how lusscore._C was built and whether a GPU is usable now."""
from __future__ import annotations

import torch

import lusscore


def load_extension():
    """Import lusscore._C (registers every op), with a clear error when it is not built."""
    try:
        from lusscore import _C
    except ImportError as e:
        raise ImportError(
            "lusscore._C is not built or does not match this torch "
            f"({torch.__version__}): run `pip install --no-build-isolation -e .` in the "
            f"lusscore checkout ({e})") from e
    return _C


def build_info() -> dict:
    _C = load_extension()
    archs = [] if _C.cuda_archs == "none" else _C.cuda_archs.split("_")
    gpu = bool(_C.with_cuda and torch.cuda.is_available())
    return {
        "version": lusscore.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": bool(_C.with_cuda),
        "cuda_archs": archs,
        "gpu_available": gpu,
        "gpu_name": torch.cuda.get_device_name() if gpu else None,
        "kmeans_cpu_kernel": _C.kmeans_cpu_kernel(),
        "attention_pool_cpu_kernel": _C.attention_pool_cpu_kernel(),
    }
