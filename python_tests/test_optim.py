import math

import pytest
import torch

from lusscore.optim import LARS, cosine_schedule


def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    lr, mom, wd, trust, eps = 0.3, 0.9, 1e-2, 1e-3, 1e-8
    opt = LARS([p], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=trust, eps=eps)
    p0, buf = p.detach().clone(), None
    for step in range(3):
        g = torch.randn_like(p)
        p.grad = g.clone()
        ratio = trust * p0.norm() / (g.norm() + wd * p0.norm() + eps)
        d = (g + wd * p0) * ratio
        buf = d if buf is None else mom * buf + d
        expected = p0 - lr * buf
        opt.step()
        assert torch.allclose(p, expected, rtol=1e-12, atol=1e-14), step
        p0 = expected


def test_lars_zero_parameter_takes_plain_gradient():
    z = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = LARS([z], lr=0.3, weight_decay=0.1)
    z.grad = torch.ones(4, dtype=torch.float64)
    opt.step()  # apex LARC: zero norm -> no trust ratio, no decay
    assert torch.allclose(z, torch.full((4,), -0.3, dtype=torch.float64))


def test_lars_exclude_1d_is_plain_sgd():
    b = torch.nn.Parameter(torch.ones(3))
    opt = LARS([b], lr=0.1, momentum=0.0, weight_decay=0.5, exclude_1d=True)
    b.grad = torch.full((3,), 2.0)
    opt.step()
    assert torch.allclose(b, torch.full((3,), 0.8))


def test_cosine_schedule_values():
    lrs = cosine_schedule(0.6, 0.0006, total_iters=10, warmup_iters=2, start_warmup_lr=0.0)
    assert len(lrs) == 10
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.3)
    assert lrs[2] == pytest.approx(0.6)
    assert lrs[2 + 4] == pytest.approx(0.0006 + 0.5 * (0.6 - 0.0006) * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] > 0.0006
    assert cosine_schedule(1.0, 0.0, 0) == []
