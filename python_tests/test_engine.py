import torch

from lusscore.engine import setup_runtime


def test_cpu_runtime_flushes_denormals():
    tiny = 1e-40  # a float32 denormal
    try:
        torch.set_flush_denormal(False)
        assert torch.tensor([tiny]).item() != 0.0
        rt = setup_runtime("cpu")
        assert rt.device.type == "cpu" and rt.world_size == 1
        assert torch.tensor([tiny]).item() == 0.0, "denormals must be flushed on the CPU"
    finally:
        torch.set_flush_denormal(False)
