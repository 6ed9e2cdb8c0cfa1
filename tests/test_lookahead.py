"""Lookahead slow/fast weights: hand-computed sync, composition with the optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepopt
from deepopt.mechanisms.lookahead import Lookahead, sync_


def test_sync_matches_hand_computation():
    slow, fast = [torch.tensor([2.0, 0.0])], [torch.tensor([4.0, -2.0])]
    sync_(slow, fast, 0.5)
    assert torch.equal(slow[0], torch.tensor([3.0, -1.0])) and torch.equal(fast[0], slow[0])


def test_lookahead_with_sgd_matches_manual_schedule():
    """k=2, alpha=0.5 on plain SGD of f(w) = w^2/2 (grad = w): manual recurrence."""
    w = nn.Parameter(torch.tensor([1.0]))
    model = nn.Module()
    model.w = w
    model.forward = lambda: None  # unused
    opt = torch.optim.SGD([w], lr=0.1)
    _, opt = deepopt.activate(model, opt, mechanisms=[Lookahead(k=2, alpha=0.5)])
    expected, slow = 1.0, None
    for step in range(1, 7):
        opt.zero_grad()
        (w.pow(2) / 2).sum().backward()
        opt.step()
        expected = expected - 0.1 * expected
        if slow is None:
            slow = expected  # slow weights start at the first step's result
        if step % 2 == 0:
            slow = slow + 0.5 * (expected - slow)
            expected = slow
        assert w.item() == pytest.approx(expected, rel=1e-6), step


def test_bad_lookahead_settings():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="alpha=0 is invalid"):
        Lookahead(k=5, alpha=0)
    with pytest.raises(ValueError, match="k=0 is invalid"):
        Lookahead(k=0)
    with pytest.raises(ValueError, match="lookahead_k moved to deepopt.experimental"):
        deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), lookahead_k=5)
