"""Switch EMA: training continues from the average at the steps the period says, nowhere else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepopt
from deepopt.experimental import SwitchAverage
from deepopt.mechanisms.switch import lag


def test_lag_is_the_mean_age_of_the_averaged_iterates():
    # power-function EMA: weights tau**gamma on [0, t], mean age t / (gamma + 2)
    taus = torch.arange(1, 10001, dtype=torch.float64)
    w = taus**7.0
    assert lag("power", 10000, gamma=7.0) == pytest.approx(float(((10000 - taus) * w).sum() / w.sum()), rel=1e-3)
    assert lag("ema", 10, decay=0.99) == pytest.approx(100.0)
    assert lag("phase", 10) == 5.0


def run(steps: int, **switch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    m = SwitchAverage(**switch)
    model, opt = deepopt.activate(model, opt, recipe="safe", mechanisms=[m])
    g = torch.Generator().manual_seed(1)
    seen = []  # (step, training weights before the forward, the average then)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        before = [p.detach().clone() for p in model.parameters()]
        avg = None if m.tensors is None else [t.clone() for t in m.tensors]
        due = m.due(opt.steps)
        loss = nn.functional.cross_entropy(model(x), y)
        after_forward = [p.detach().clone() for p in model.parameters()]
        seen.append((due, before, avg, after_forward))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return m, seen


def test_training_weights_become_the_average_exactly_when_due():
    m, seen = run(40, period=1.0, min_steps=5, every=1, follows_lr=False)
    switched = [i for i, (due, *_rest) in enumerate(seen) if due]
    assert m.switches == len(switched) >= 3
    assert all(b - a >= 5 for a, b in zip(switched, switched[1:]))  # never more often than min_steps
    for due, before, avg, after in seen:
        if due:  # the forward ran at the average (parameters first in the average's tensors)
            assert all(torch.equal(p, a) for p, a in zip(after, avg))
            assert not all(torch.equal(p, b) for p, b in zip(after, before))
        else:  # and nowhere else did anything touch the training weights
            assert all(torch.equal(p, b) for p, b in zip(after, before))


def test_a_long_period_never_switches_and_trains_as_the_default_average_does():
    m, seen = run(30, period=1e9)
    assert m.switches == 0 and not any(due for due, *_ in seen)


@pytest.mark.parametrize("bad", [{"period": 0}, {"period": True}, {"min_steps": 0}])
def test_bad_arguments_name_themselves(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SwitchAverage(**bad)
