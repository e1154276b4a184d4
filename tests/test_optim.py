import math

import pytest
import torch
from torch import nn

from relicv2_cli.errors import RelicError
from relicv2_cli.optim import LARS, build_optimizer, lr_at, param_groups, scaled_lr


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_param_groups_split():
    model = _model()
    decay, excluded = param_groups(model, 1e-5)
    assert decay["weight_decay"] == 1e-5 and decay["lars_exclude"] is False
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in excluded["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
    }


def _lars_reference(w, g, steps, lr, wd, eta, momentum):
    """Plain-Python BYOL LARS on a flat vector with a constant gradient."""
    m = [0.0] * len(w)
    for _ in range(steps):
        u = [gi + wd * wi for gi, wi in zip(g, w, strict=True)]
        wn, un = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in u))
        ratio = eta * wn / un if wn > 0 and un > 0 else 1.0
        m = [momentum * mi + ratio * ui for mi, ui in zip(m, u, strict=True)]
        w = [wi - lr * mi for wi, mi in zip(w, m, strict=True)]
    return w


def test_lars_step_matches_hand_computation():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = LARS(
        [
            {"params": [w], "weight_decay": 0.1, "lars_exclude": False},
            {"params": [bias], "weight_decay": 0.0, "lars_exclude": True},
        ],
        lr=0.5,
        momentum=0.9,
        eta=1e-3,
    )
    for _ in range(2):
        w.grad = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        bias.grad = torch.tensor([0.5, -0.5], dtype=torch.float64)
        opt.step()
    expected = _lars_reference([3.0, 4.0], [1.0, 0.0], 2, lr=0.5, wd=0.1, eta=1e-3, momentum=0.9)
    torch.testing.assert_close(w.detach().flatten(), torch.tensor(expected, dtype=torch.float64))
    # step 1 by hand: u = (1.3, 0.4), ratio = 1e-3 * 5 / |u|, w1 = w - lr * ratio * u
    ratio = 1e-3 * 5 / math.sqrt(1.3**2 + 0.4**2)
    w1 = [3.0 - 0.5 * ratio * 1.3, 4.0 - 0.5 * ratio * 0.4]
    assert _lars_reference([3.0, 4.0], [1.0, 0.0], 1, 0.5, 0.1, 1e-3, 0.9) == pytest.approx(w1)
    # excluded: plain heavy-ball SGD, no decay, no adaptation: m1 = g, m2 = 1.9 g -> b - lr * 2.9 g
    torch.testing.assert_close(
        bias.detach(), torch.tensor([1.0 - 0.5 * 2.9 * 0.5, 2.0 + 0.5 * 2.9 * 0.5], dtype=torch.float64)
    )


def test_lars_excluded_ignores_group_weight_decay_and_zero_norm_ratio():
    b = nn.Parameter(torch.tensor([2.0]))
    z = nn.Parameter(torch.zeros(2, 2))  # ||w|| = 0 -> trust ratio 1
    opt = LARS(
        [{"params": [b], "weight_decay": 5.0, "lars_exclude": True}, {"params": [z], "weight_decay": 0.0}],
        lr=0.1,
    )
    b.grad = torch.tensor([1.0])
    z.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([1.9]))
    torch.testing.assert_close(z.detach(), torch.full((2, 2), -0.1))


def test_build_optimizer_variants():
    model = _model()
    opt = build_optimizer("lars", model, lr=1.0, weight_decay=1e-5)
    assert isinstance(opt, LARS)
    assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-5, 0.0]
    sgd = build_optimizer("sgd", model, lr=0.1, weight_decay=1e-4, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    adamw = build_optimizer("adamw", list(model.parameters()), lr=1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    with pytest.raises(RelicError, match="lars"):
        build_optimizer("adam", model, lr=1.0, weight_decay=0.0)


def test_lars_trains_a_tiny_model():
    torch.manual_seed(0)
    model = _model()
    opt = build_optimizer("lars", model, lr=2.0, weight_decay=1e-5)
    x, y = torch.randn(16, 3, 3, 3), torch.randint(0, 2, (16,))
    first = None
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_lr_schedule_endpoints():
    assert lr_at(0, 100, 1.0, 10) == 0.0
    assert lr_at(5, 100, 1.0, 10) == pytest.approx(0.5)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(150, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 100, 0.3, 0) == pytest.approx(0.3)
    values = [lr_at(k, 100, 1.0, 10) for k in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_scaled_lr():
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    assert scaled_lr(1.0, 256) == 1.0
