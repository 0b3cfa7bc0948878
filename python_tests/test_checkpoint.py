import random

import numpy as np
import pytest
import torch

from lusscore.checkpoint import load_checkpoint, save_checkpoint
from lusscore.utils import LusscoreError


def test_round_trip_and_rng_resume(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    save_checkpoint(tmp_path / "ck.pt", {"model": model.state_dict(), "epoch": 3})
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(99)
    state = load_checkpoint(tmp_path / "ck.pt", restore_rng=True)
    assert state["epoch"] == 3
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_atomic_and_errors(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"epoch": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"epoch": 2, "bad": Boom()})
    assert load_checkpoint(path)["epoch"] == 1, "a failed save must keep the old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "torn.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(LusscoreError, match="torn.pt: cannot read checkpoint"):
        load_checkpoint(tmp_path / "torn.pt")


def test_atomic_write_keeps_the_usual_file_mode(tmp_path):
    import stat

    from lusscore.utils import atomic_write_text

    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode), oct(mode)


def test_atomic_writes_keep_links_modes_and_special_files(tmp_path):
    import os
    import stat
    from lusscore.utils import atomic_write_text
    target = tmp_path / "real.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"  # the link still points there
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # and the file kept its mode
    atomic_write_text(os.devnull, "through")  # a device: written through, never replaced
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    atomic_write_text(fifo, "to a pipe")
    assert os.read(reader, 100) == b"to a pipe" and stat.S_ISFIFO(fifo.stat().st_mode)
    os.close(reader)
    assert not list(tmp_path.glob(".*.tmp*"))
