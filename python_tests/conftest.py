"""Shared fixtures: `device` runs a test on the CPU and, when a GPU is usable, on CUDA; the
`cuda` marker; `crash_after_first_checkpoint`; LUSSCORE_REQUIRE_CUDA and LUSSCORE_MIN_TESTS (see
the hooks below)."""
import contextlib
import os

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


@pytest.fixture(autouse=True)
def fused_ops_around_each_test():
    """Every test starts with the fused kernels, and none may leave the reference mode on."""
    import lusscore.ops as ops
    ops.set_ops_mode("fused")
    yield
    mode = ops.ops_mode()
    ops.set_ops_mode("fused")
    assert mode == "fused", "a test left the reference mode on"


@contextlib.contextmanager
def crash_after_first_checkpoint(monkeypatch):
    """Inside the block, a training stage crashes (KeyboardInterrupt) right after its first
    checkpoint is written: what a killed run leaves behind."""
    from lusscore.engine import StageCheckpoint
    original = StageCheckpoint.save

    def save_then_crash(self, state, done=False):
        original(self, state, done)
        raise KeyboardInterrupt("simulated crash after an epoch")

    monkeypatch.setattr(StageCheckpoint, "save", save_then_crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(StageCheckpoint, "save", original)


requires_cuda = pytest.mark.skipif(not cuda_usable(),
                                   reason="needs a CUDA GPU and lusscore built with CUDA kernels")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs CUDA kernels (selected by bench/gpu_check.sh --quick)")
    # On a GPU machine a CUDA test that skips hides a broken build: make that an error.
    if os.environ.get("LUSSCORE_REQUIRE_CUDA") == "1" and not cuda_usable():
        import lusscore
        raise pytest.UsageError(
            "LUSSCORE_REQUIRE_CUDA=1 but the CUDA tests would skip: torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}, lusscore.build_info() is {lusscore.build_info()}")


def _runs_cuda(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(str(v) == "cuda" for v in callspec.params.values()):
        return True
    return any("CUDA" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _runs_cuda(item):
            item.add_marker(pytest.mark.cuda)


def pytest_collection_finish(session):
    # CI sets the least number of tests a full collection holds: fewer means tests were lost.
    least = int(os.environ.get("LUSSCORE_MIN_TESTS", "0"))
    if least and len(session.items) < least and not session.config.option.keyword \
            and not session.config.option.markexpr:
        raise pytest.UsageError(f"collected {len(session.items)} tests, fewer than "
                                f"LUSSCORE_MIN_TESTS={least}: were test files lost or skipped?")
