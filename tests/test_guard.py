"""Divergence guard: non-finite steps skipped, counted, and a clear error after N in a row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepopt
from conftest import data, mlp
from deepopt.mechanisms.guard import DivergenceGuard, all_finite


def test_all_finite():
    assert all_finite([torch.ones(2), torch.zeros(1)])
    assert not all_finite([torch.tensor([1.0, float("inf")])])
    assert not all_finite([torch.tensor([float("nan")], dtype=torch.bfloat16)])


def test_guard_counts_and_raises_after_max_consecutive():
    g = DivergenceGuard(max_consecutive=3)
    g.record(False); g.record(False); g.record(True); g.record(False); g.record(False)
    assert g.skipped == 4 and g.consecutive == 2
    with pytest.raises(deepopt.DivergenceError, match="skipped 3 optimizer steps in a row"):
        g.record(False)


@pytest.mark.parametrize("overrides", [{}, {"rho": 0.2}, {"average": "ema"}])
def test_nan_steps_are_skipped_and_equal_to_skipping_them(overrides):
    """Inject NaN/inf losses at some steps: the result equals a run that skips those batches."""
    x, y = data()
    bad = {2, 5, 6}

    def run(inject: bool):
        torch.manual_seed(0)
        model = mlp()
        model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                      **overrides)
        for i in range(10):
            if i in bad and not inject:
                continue
            xb, yb = x[i * 6:(i + 1) * 6], y[i * 6:(i + 1) * 6]
            loss = nn.functional.cross_entropy(model(xb), yb)
            if inject and i in bad:
                loss = loss * (float("nan") if i == 2 else float("inf"))
            opt.zero_grad(); loss.backward(); opt.step()
        return model, opt

    m1, o1 = run(True)
    m2, _ = run(False)
    assert o1.mechanism("guard").skipped == 3
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


def test_guard_off_lets_nan_through():
    model = nn.Linear(2, 1)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), guard=False)
    (model(torch.ones(1, 2)) * float("nan")).sum().backward()
    opt.step()
    assert not torch.isfinite(model.weight).all()


@pytest.mark.parametrize("extra, skipped", [(float("inf"), 1), (float("nan"), 1), (0.0, 0)])
def test_closure_loss_is_checked_even_where_the_gradients_are_finite(extra, skipped):
    """A non-finite loss whose gradients are finite (a constant term) is skipped; the loss is left as it was."""
    model = nn.Linear(2, 1)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe="safe")
    before = model.weight.detach().clone()
    expected = (before.sum() + model.bias).item()
    losses = []

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).sum() + extra
        loss.backward()
        losses.append(loss)
        return loss

    returned = opt.step(closure)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert opt.mechanism("guard").skipped == skipped
    assert torch.equal(model.weight, before) == bool(skipped)
    assert returned is losses[-1] and returned._version == 0  # the user's loss, not written to
    if not skipped:
        assert returned.item() == pytest.approx(expected)  # its value at the weights before the step


def test_integer_closure_loss_counts_as_finite():
    model = nn.Linear(2, 1)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe="safe")

    def closure():
        opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        return torch.tensor(3)

    opt.step(closure)
    assert opt.mechanism("guard").skipped == 0
