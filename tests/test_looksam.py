"""LookSAM: SAM's two passes every k-th step, the orthogonal part reused between."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import deepopt
from deepopt.experimental import TwoPassSAM
from deepopt.mechanisms.looksam import orthogonal_part, reuse_


def _flat(ts):
    return torch.cat([t.flatten() for t in ts])


def test_orthogonal_part_is_orthogonal_and_completes_the_sam_gradient():
    torch.manual_seed(0)
    g = [torch.randn(3, 2), torch.randn(4)]
    gs = [torch.randn(3, 2), torch.randn(4)]
    v = orthogonal_part(gs, g)
    assert abs(float(_flat(v) @ _flat(g))) < 1e-5
    proj = _flat(gs) - _flat(v)  # what was removed lies along g
    cos = proj @ _flat(g) / (proj.norm() * _flat(g).norm())
    assert abs(abs(float(cos)) - 1.0) < 1e-5


def test_reuse_adds_alpha_times_grad_norm_along_unit_orthogonal():
    g, v = [torch.tensor([3.0, 4.0])], [torch.tensor([0.0, 0.5])]
    reuse_(g, v, alpha=0.2)
    torch.testing.assert_close(g[0], torch.tensor([3.0, 4.0 + 0.2 * 5.0]))
    z = [torch.tensor([1.0])]
    reuse_(z, [torch.zeros(1)], alpha=1.0)
    assert torch.equal(z[0], torch.tensor([1.0]))


def _activated(settings: dict, momentum: float = 0.9):
    """A small activated model, its data and a closure that counts its calls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    # deepopt.experimental.TwoPassSAM's knobs (every, reuse, lr_range) on thorough's radius, no ramp
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
                                  recipe="thorough", guard=False, mechanisms=[TwoPassSAM(0.05, **settings)])
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return model, opt, closure, calls, (x, y)


def _train(settings: dict, steps: int):
    model, opt, closure, calls, (x, y) = _activated(settings)
    grads = []
    for _ in range(steps):
        opt.step(closure)
        grads.append([p.grad.clone() for p in model.parameters()])
    return model, opt, grads, len(calls), (x, y)


def test_sam_every_k_costs_one_plus_one_over_k_passes():
    assert _train({}, 6)[3] == 12
    assert _train({"every": 3}, 6)[3] == 6 + 2


def test_first_step_is_exact_sam_and_between_steps_reuse_the_orthogonal_part():
    _, _, exact, _, _ = _train({}, 1)
    _, _, grads, _, (x, y) = _train({"every": 3, "reuse": 0.5}, 2)
    for a, b in zip(grads[0], exact[0]):
        torch.testing.assert_close(a, b)
    # step 2 by hand: the plain gradient at the weights after step 1, plus
    # 0.5 ||g|| g_v / ||g_v|| with g_v stored by step 1
    model, opt, _, _, _ = _train({"every": 3, "reuse": 0.5}, 1)
    ortho = opt.mechanism("sam").look.ortho
    assert abs(float(_flat(ortho) @ _flat(exact[0]))) > 1e-6  # not parallel to g_s
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    scale = 0.5 * _flat(g).norm() / _flat(ortho).norm()
    for a, gi, vi in zip(grads[1], g, ortho):
        torch.testing.assert_close(a, gi + scale * vi)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_sam_every_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=f"every={bad!r} is invalid"):
        TwoPassSAM(0.05, every=bad)
    model = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="sam_every moved to deepopt.experimental"):
        deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), sam_every=bad)


def test_reuse_zero_is_periodic_sam_with_plain_gradients_between():
    _, opt, grads, calls, (x, y) = _train({"every": 3, "reuse": 0.0}, 4)
    assert calls == 4 + 2  # steps 1 and 4 run two passes
    assert opt.mechanism("sam").look.ortho is None  # nothing kept for reuse
    exact = _train({}, 1)[2]
    for a, b in zip(grads[0], exact[0]):
        torch.testing.assert_close(a, b)
    # step 2 is a plain gradient at the weights after step 1
    model, _, _, _, _ = _train({"every": 3, "reuse": 0.0}, 1)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for a, p in zip(grads[1], model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_sam_lr_fraction_runs_sam_until_the_lr_drops_then_one_plain_pass():
    # Two steps at lr 0.1 (SAM: 2 passes each), then the LR drops to 0.01: 1 pass per step,
    # and that step's update is the plain gradient's (the same step taken by the base SGD).
    model, opt, closure, calls, _ = _activated({"lr_range": (1.0, 1.0)}, momentum=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    passes = []
    for _ in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        n = len(calls)
        opt.step(closure)
        sched.step()
        passes.append(len(calls) - n)
    assert passes == [2, 2, 1, 1]
    # the last step: w_new = w_old - 0.01 * (plain gradient at w_old, still in .grad)
    for p, w in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), w - 0.01 * p.grad)


def test_sam_lr_ceiling_runs_one_plain_pass_until_the_lr_drops_then_sam():
    # The mirror: lr 0.1 is the largest so far, above the ceiling 0.5 x 0.1 -> one plain pass
    # per step; after the drop to 0.01 SAM's two passes.
    model, opt, closure, calls, _ = _activated({"lr_range": (0.0, 0.5)}, momentum=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    passes = []
    for _ in range(4):
        n = len(calls)
        opt.step(closure)
        sched.step()
        passes.append(len(calls) - n)
    assert passes == [1, 1, 2, 2]


def test_an_empty_sam_lr_range_is_refused_naming_it():
    for bad in [(1.0, 0.5), (0.0, 0.0), (-0.1, 1.0), (0.5, 1.5)]:
        with pytest.raises(ValueError, match=re.escape(f"lr_range={bad!r} is invalid")):
            TwoPassSAM(0.05, lr_range=bad)
