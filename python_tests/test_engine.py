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


def test_keep_freed_host_memory_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from lusscore.engine import KEEP_HOST_MEMORY_ENV, keep_freed_host_memory
    monkeypatch.setenv(KEEP_HOST_MEMORY_ENV, "0")
    assert keep_freed_host_memory() is False
    monkeypatch.delenv(KEEP_HOST_MEMORY_ENV)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_host_memory() is True


def test_prepare_model_makes_training_convolutions_channels_last_on_the_cpu(monkeypatch):
    import lusscore.engine as engine
    from lusscore.models.resnet import build_trunk
    cfg = {"arch": "resnet18", "width": 8, "output_stride": 16}

    def conv_weights(model):
        return [p for p in model.parameters() if p.dim() == 4]

    plain = engine.prepare_model(build_trunk(cfg), setup_runtime("cpu"))
    assert all(p.is_contiguous() for p in conv_weights(plain))
    model = engine.prepare_model(build_trunk(cfg), setup_runtime("cpu"), channels_last_on_cpu=True)
    weights = conv_weights(model)
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert any(not p.is_contiguous() for p in weights)  # some kernels are wider than 1x1
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out = model.eval()(x)["stage4"]
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, plain.eval()(x)["stage4"], atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(engine, "CPU_CHANNELS_LAST", False)  # the benchmarks' switch
    off = engine.prepare_model(build_trunk(cfg), setup_runtime("cpu"), channels_last_on_cpu=True)
    assert all(p.is_contiguous() for p in conv_weights(off))


# ------------------------------------------------------------------ the one training loop
import json  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from lusscore.engine import (Runtime, Trainer, make_loader, prepare_model, train_epochs,  # noqa: E402
                             train_step)
from lusscore.optim import cosine_schedule  # noqa: E402
from lusscore.stages.layout import RunDir  # noqa: E402

CPU = Runtime(torch.device("cpu"))


class ToyTrainer(Trainer):
    """Least squares on fixed data, recording the hooks the loop calls."""

    name = "pretrain"

    def __init__(self, epochs: int = 3):
        torch.manual_seed(0)
        x = torch.randn(24, 4)
        self.loader = make_loader(TensorDataset(x, x @ torch.arange(4.0)), 8, CPU, seed=0)
        self.model = nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.epochs = epochs
        self.lrs = cosine_schedule(0.3, 0.03, epochs * len(self.loader))
        self.events, self.extra = [], 0

    def loss(self, batch):
        x, y = batch
        loss = ((self.model(x)[:, 0] - y) ** 2).mean()
        return loss, {"mse": loss}, x.shape[0]

    def start_epoch(self, epoch):
        self.events.append(("epoch", epoch))

    def before_step(self, step):
        self.events.append(("step", step))
        assert all(p.grad is not None for p in self.model.parameters())  # after backward

    def state(self):
        return {"extra": self.extra + 1}

    def load(self, state):
        self.extra = state["extra"]


def test_train_epochs_logs_checkpoints_and_calls_the_hooks(tmp_path):
    trainer = ToyTrainer()
    first = train_step(ToyTrainer(), next(iter(ToyTrainer().loader)), 0)[0].item()
    model = train_epochs(trainer, RunDir(tmp_path), CPU, {"seed": 0})
    assert model is trainer.model
    assert trainer.events[:2] == [("epoch", 0), ("step", 0)]
    assert [e for e in trainer.events if e[0] == "epoch"] == [("epoch", e) for e in range(3)]
    assert [e[1] for e in trainer.events if e[0] == "step"] == list(range(9))
    log = [json.loads(line) for line in (tmp_path / "pretrain.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == list(range(9)) and log[0]["lr"] == pytest.approx(0.3)
    assert {"loss", "loss_mse", "img_s", "epoch", "stage"} <= set(log[0])
    assert log[-1]["loss"] < first / 10  # it trained
    state = torch.load(tmp_path / "pretrain.pt", weights_only=False)
    assert state["done"] and state["epoch"] == 3 and state["extra"] == 1


class Crash(Exception):
    pass


def test_train_epochs_resumes_to_the_uninterrupted_result(tmp_path):
    full = train_epochs(ToyTrainer(), RunDir(tmp_path / "a"), CPU, {}).state_dict()
    crashing = ToyTrainer()

    def crash(step):  # killed in the second epoch, after the first one's checkpoint
        if step == 4:
            raise Crash

    crashing.before_step = crash
    with pytest.raises(Crash):
        train_epochs(crashing, RunDir(tmp_path / "b"), CPU, {})
    saved = torch.load(tmp_path / "b" / "pretrain.pt", weights_only=False)
    assert saved["epoch"] == 1 and not saved["done"]
    resumed = ToyTrainer()
    model = train_epochs(resumed, RunDir(tmp_path / "b"), CPU, {})
    assert [e for e in resumed.events if e[0] == "epoch"] == [("epoch", 1), ("epoch", 2)]
    assert resumed.extra == 1  # load() got what state() saved
    for k, v in full.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_progress_bars_write_plain_lines_to_a_redirected_stderr(capsys):
    from lusscore import utils
    for _ in utils.progress_bar(range(3), desc="work", mininterval=0):  # every update a line
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert lines[-1].startswith("work: 100%") and "3/3" in lines[-1]


def test_a_redirected_training_log_has_few_lines_and_tqdm_disable_silences_it(tmp_path, capsys, monkeypatch):
    """Per-iteration postfix updates do not bypass the interval; TQDM_DISABLE=1 is honoured."""
    trainer = ToyTrainer(epochs=3)
    trainer.loader = make_loader(trainer.loader.dataset, 1, CPU, seed=0)  # 24 iterations an epoch
    trainer.lrs = cosine_schedule(0.01, 0.001, 3 * len(trainer.loader))
    train_epochs(trainer, RunDir(tmp_path / "a"), CPU, {})
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) <= 3 * 2  # at most a start and an end line per epoch
    monkeypatch.setenv("TQDM_DISABLE", "1")
    train_epochs(ToyTrainer(epochs=1), RunDir(tmp_path / "b"), CPU, {})
    assert capsys.readouterr().err == ""


def test_a_batch_larger_than_the_data_is_an_error_not_zero_steps(tmp_path):
    from lusscore.utils import LusscoreError
    trainer = ToyTrainer()
    trainer.loader = make_loader(trainer.loader.dataset, 32, CPU, seed=0)  # 24 images, drop_last
    with pytest.raises(LusscoreError, match="pretrain: 24 training image.*pretrain.batch_size to at most 24"):
        train_epochs(trainer, RunDir(tmp_path), CPU, {})
    assert not (tmp_path / "pretrain.pt").exists()  # never marked done


# ------------------------------------------------------------------ DDP against one process
class LinearTrainer(Trainer):
    """Least squares on fixed data, in order: under DDP with W ranks of batch b each, a step
    sees the same 2b samples as one process with batch W*b (no BN, no random numbers)."""

    name = "pretrain"

    def __init__(self, rt: Runtime, batch: int):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 5, generator=g)
        y = x @ torch.randn(5, generator=g) + 0.1 * torch.randn(32, generator=g)
        self.loader = make_loader(TensorDataset(x, y), batch, rt, seed=0, shuffle=False)
        torch.manual_seed(1)
        self.model = prepare_model(nn.Linear(5, 1), rt)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.epochs = 3
        self.lrs = cosine_schedule(0.2, 0.02, self.epochs * len(self.loader))

    def loss(self, batch):
        x, y = batch
        loss = ((self.model(x)[:, 0] - y) ** 2).mean()
        return loss, {}, x.shape[0]


def _ddp_worker(rank, world, port, run, out):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rt = setup_runtime("cpu")
    model = train_epochs(LinearTrainer(rt, 4), RunDir(run), rt, {"seed": 0})
    out[rank] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.distributed.destroy_process_group()


def test_two_ddp_ranks_train_what_one_process_trains_with_the_global_batch(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, tmp_path / "ddp", out), nprocs=2)
    single = train_epochs(LinearTrainer(CPU, 8), RunDir(tmp_path / "one"), CPU, {"seed": 0})
    torch.manual_seed(1)
    init = nn.Linear(5, 1).state_dict()
    for k, want in single.state_dict().items():
        assert not torch.allclose(want, init[k], atol=1e-3), k  # it trained
        for rank in range(2):
            torch.testing.assert_close(out[rank][k], want, atol=1e-6, rtol=1e-5)
    ddp_ck = torch.load(tmp_path / "ddp" / "pretrain.pt", weights_only=False)
    assert ddp_ck["done"] and ddp_ck["epoch"] == 3
