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
