import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lusscore.losses.swav import Prototypes, sinkhorn, swapped_prediction_loss


def test_sinkhorn_is_doubly_stochastic():
    torch.manual_seed(0)
    b, k = 64, 16
    scores = F.normalize(torch.randn(b, 8), dim=1) @ F.normalize(torch.randn(k, 8), dim=1).t()
    q = sinkhorn(scores, epsilon=0.05, iterations=200)
    assert q.shape == (b, k) and q.dtype == torch.float32
    assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)  # each sample's code sums to 1
    assert torch.allclose(q.sum(0), torch.full((k,), b / k), rtol=1e-3)  # equipartition
    q3 = sinkhorn(scores.to(torch.bfloat16), iterations=3)
    assert q3.dtype == torch.float32 and torch.allclose(q3.sum(1), torch.ones(b), atol=1e-5)


def _sinkhorn_worker(rank, world, init_file, scores, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shard = scores.chunk(world)[rank]
    out[rank] = sinkhorn(shard, epsilon=0.05, iterations=3)
    dist.destroy_process_group()


def test_sinkhorn_distributed_equals_single_batch():
    torch.manual_seed(1)
    scores = torch.randn(32, 10).tanh()
    expected = sinkhorn(scores, epsilon=0.05, iterations=3)
    with tempfile.TemporaryDirectory() as d:
        manager = mp.Manager()
        out = manager.dict()
        mp.spawn(_sinkhorn_worker, args=(2, os.path.join(d, "init"), scores, out), nprocs=2)
        got = torch.cat([out[0], out[1]])
    assert torch.allclose(got, expected, atol=1e-6)


def test_swapped_prediction_loss_hand_case():
    k = 4
    q = torch.eye(k)[[0, 1]]  # two samples with hard codes
    s_match = torch.eye(k)[[0, 1]] * 100.0  # crop 2 scores agreeing with crop 1's codes
    s_uniform = torch.zeros(2, k)
    # codes from crop 0 only; crop 1 predicts them
    perfect = swapped_prediction_loss([s_uniform, s_match], [q, None], temperature=0.1)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    uniform = swapped_prediction_loss([s_match, s_uniform], [q, None], temperature=0.1)
    assert uniform.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-6)
    both = swapped_prediction_loss([s_match, s_uniform], [q, q], temperature=0.1)
    assert both.item() == pytest.approx(0.5 * torch.log(torch.tensor(4.0)).item(), rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        swapped_prediction_loss([s_match], [None])


def test_prototypes_stay_normalised():
    proto = Prototypes(8, 5)
    assert torch.allclose(proto.weight.norm(dim=1), torch.ones(5), atol=1e-6)
    with torch.no_grad():
        proto.weight.mul_(3)
    proto.normalize_()
    assert torch.allclose(proto.weight.norm(dim=1), torch.ones(5), atol=1e-6)
    assert proto(torch.randn(2, 8)).shape == (2, 5)
