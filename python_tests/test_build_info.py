import subprocess
import sys

import torch

import lusscore


def test_build_info_fields():
    info = lusscore.build_info()
    assert info["version"] == lusscore.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    assert isinstance(info["cuda_archs"], list)
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and all("." in a for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []
    assert info["gpu_available"] == (info["cuda_kernels"] and torch.cuda.is_available())
    for kernel in ("kmeans_cpu_kernel", "attention_pool_cpu_kernel"):
        assert info[kernel] in ("generic", "avx2", "avx512")


def test_ops_registered():
    import lusscore.ops  # noqa: F401
    assert hasattr(torch.ops.lusscore, "rgb_to_label")


def test_cli_info_and_help():
    out = subprocess.run([sys.executable, "-m", "lusscore", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert '"cuda_kernels"' in out
    helptext = subprocess.run([sys.executable, "-m", "lusscore", "--help"], capture_output=True,
                              text=True, check=True).stdout
    for cmd in ("synth", "demo", "info"):
        assert cmd in helptext
