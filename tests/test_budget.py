"""``budget``: where its two-pass SAM steps go, and that the cost never passes the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepopt
from deepopt.experimental import TwoPassSAM
from deepopt.horizon import schedule_length
from deepopt.mechanisms.budget import BudgetSAM

lrs = torch.optim.lr_scheduler


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    return model, x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def two_pass_trace(steps: int, schedule=None, before: bool = False, total_steps=None, mechanisms=(), **settings):
    """Which steps took two passes (a plain ``criterion(model(x), y)`` loop, no closure)."""
    model, x, y = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = schedule(opt) if schedule is not None and before else None
    model, opt = deepopt.activate(model, opt, mechanisms=list(mechanisms), **settings)
    if schedule is not None and not before:
        sched = schedule(opt)
    opt.total_steps = total_steps
    criterion, trace = nn.CrossEntropyLoss(), []
    sam = opt.mechanism("sam")
    for i in range(steps):
        xb, yb = x[i % 4 * 16:(i % 4 + 1) * 16], y[i % 4 * 16:(i % 4 + 1) * 16]
        done = sam.two_pass_steps
        criterion(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        if isinstance(sched, lrs.ReduceLROnPlateau):
            sched.step(1.0)  # a loss that never improves: the LR drops, but no end is announced
        elif sched is not None:
            sched.step()
        trace.append(sam.two_pass_steps - done)
    return trace, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("schedule", [
    lambda opt: lrs.OneCycleLR(opt, max_lr=0.1, total_steps=20),
    lambda opt: lrs.CosineAnnealingLR(opt, T_max=20),
    lambda opt: lrs.PolynomialLR(opt, total_iters=20),
    lambda opt: lrs.LinearLR(opt, start_factor=1.0, end_factor=0.01, total_iters=20),
    lambda opt: lrs.SequentialLR(opt, [lrs.LinearLR(opt, 0.1, 1.0, 4), lrs.CosineAnnealingLR(opt, 16)], [4]),
], ids=["onecycle", "cosine", "polynomial", "linear", "warmup+cosine"])
@pytest.mark.parametrize("before", [False, True], ids=["scheduler-after", "scheduler-before"])
def test_a_run_that_announces_its_length_gets_sam_on_its_last_share(schedule, before):
    trace, _ = two_pass_trace(20, schedule, before=before, budget=1.5)  # a share of 0.4
    assert trace == [0] * 12 + [1] * 8
    trace, _ = two_pass_trace(20, schedule, before=before, budget=1.25)  # 0.2
    assert trace == [0] * 16 + [1] * 4


def test_total_steps_on_the_optimizer_places_the_sam_steps_without_a_scheduler():
    trace, _ = two_pass_trace(20, total_steps=20, budget=1.25)
    assert trace == [0] * 16 + [1] * 4


def test_without_an_announced_end_sam_starts_when_the_lr_drops_and_stays_within_the_budget():
    drops = lambda opt: lrs.MultiStepLR(opt, milestones=[6, 12, 16], gamma=0.1)  # noqa: E731 - the seed's shape
    trace, _ = two_pass_trace(20, drops, budget=1.5)
    assert trace[:6] == [0] * 6 and trace[6] == 1  # the first step at a tenth of the peak LR
    assert all(sum(trace[:i + 1]) <= 0.4 * (i + 1) for i in range(20))  # the cost, at every point
    assert sum(trace) == 8  # the whole budget spent
    # With room to spare (a share of 0.8), it is the former thorough: SAM on every step after the drop.
    trace, weights = two_pass_trace(20, drops, budget=2.0)
    assert trace == [0] * 6 + [1] * 14
    _, same = two_pass_trace(20, drops, mechanisms=[TwoPassSAM(0.05, 1000, lr_range=(0.0, 0.1))])
    assert all(torch.equal(a, b) for a, b in zip(weights, same))


def test_a_constant_lr_with_no_end_gets_no_sam_below_2_25_and_every_step_at_2_25():
    assert sum(two_pass_trace(12, budget=2.0)[0]) == 0
    assert two_pass_trace(12, budget=2.25)[0] == [1] * 12
    # A plateau scheduler announces no end either: SAM follows its LR drops (x0.1 after 3 bad epochs).
    plateau = two_pass_trace(12, lambda opt: lrs.ReduceLROnPlateau(opt, factor=0.1, patience=2), budget=1.5)[0]
    assert plateau[:4] == [0] * 4 and sum(plateau) > 0


def test_budget_1_adds_no_mechanism():
    model, x, y = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = deepopt.activate(model, opt, budget=1.0)
    assert opt.mechanism("sam") is None


def test_schedule_lengths_and_the_one_line_said():
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    assert schedule_length(lrs.LinearLR(opt, start_factor=0.1, total_iters=5)) is None  # a warm-up
    assert schedule_length(lrs.StepLR(opt, 3)) is None
    assert repr(BudgetSAM(1.5)) == "BudgetSAM(budget=1.5, rho=0.05, warmup=1000)"
    assert BudgetSAM(1.5).share == pytest.approx(0.4)
    with pytest.raises(ValueError, match=r"budget=2.5 is invalid"):
        BudgetSAM(2.5)


def test_it_says_once_where_its_steps_go(capsys):
    two_pass_trace(4, lambda opt: lrs.CosineAnnealingLR(opt, 4), budget=1.5)
    said = capsys.readouterr().err.splitlines()
    assert said == ["deepopt: budget=1.5 (two-pass SAM, rho 0.05) runs on this loop without a closure "
                    "(loss = CrossEntropyLoss(model(...), ...); recomputed at w + e in step()), "
                    "on the last 40% of the run (its length is announced)."], said


def test_resuming_mid_run_continues_the_same_sam_steps(tmp_path):
    sched_of = lambda opt: lrs.CosineAnnealingLR(opt, T_max=12)  # noqa: E731

    def run(stop=None, state=None):
        model, x, y = model_and_data()
        model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                      budget=1.5, mechanisms=[])
        sched = sched_of(opt)
        if state is not None:
            model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])  # noqa: E702
            sched.load_state_dict(state["sched"])
        start = 0 if state is None else state["step"]
        for i in range(start, 12 if stop is None else stop):
            nn.functional.cross_entropy(model(x[i % 4 * 16:(i % 4 + 1) * 16]), y[i % 4 * 16:(i % 4 + 1) * 16])
            loss = nn.CrossEntropyLoss()(model(x[i % 4 * 16:(i % 4 + 1) * 16]), y[i % 4 * 16:(i % 4 + 1) * 16])
            loss.backward(); opt.step(); opt.zero_grad(); sched.step()  # noqa: E702
        return model, opt, sched

    whole, opt, _ = run()
    model, opt_a, sched = run(stop=7)
    state = {"model": model.state_dict(), "opt": opt_a.state_dict(), "sched": sched.state_dict(), "step": 7}
    resumed, opt_b, _ = run(state=state)
    assert opt.mechanism("sam").two_pass_steps == opt_b.mechanism("sam").two_pass_steps == 4
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_budget_that_found_no_step_to_spend_on_says_so_in_the_idle_line(capsys):
    model, x, y = model_and_data()
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe="safe", budget=1.5)
    for i in range(4):  # a constant LR and no announced end: no step late enough to spend on
        nn.CrossEntropyLoss()(model(x[i * 16:(i + 1) * 16]), y[i * 16:(i + 1) * 16]).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model(x)
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 2 and "runs on this loop without a closure" in said[0], said
    assert said[1].startswith("deepopt: after 4 steps this run trains and evaluates as it would without deepopt")
    assert "budget=1.5 (two-pass SAM, rho 0.05) has taken no two-pass step so far (it runs once the LR" in said[1]


def test_two_pass_cost_sets_the_share_a_budget_buys():
    assert BudgetSAM(1.5, two_pass_cost=2.0).share == pytest.approx(0.5)  # the first accounting
    trace, _ = two_pass_trace(20, total_steps=20, mechanisms=[BudgetSAM(1.5, two_pass_cost=2.0)])
    assert trace == [0] * 10 + [1] * 10
    with pytest.raises(ValueError, match="two_pass_cost=1 is invalid"):
        BudgetSAM(1.5, two_pass_cost=1)


def test_adaptive_takes_the_asam_steps_of_two_pass_sam_on_the_same_window():
    trace, weights = two_pass_trace(20, total_steps=20, mechanisms=[BudgetSAM(2.25, rho=0.5, warmup=0, adaptive=True)])
    _, asam = two_pass_trace(20, mechanisms=[TwoPassSAM(0.5, adaptive=True)])
    _, sam = two_pass_trace(20, mechanisms=[TwoPassSAM(0.5)])
    assert trace == [1] * 20
    assert all(torch.equal(a, b) for a, b in zip(weights, asam))
    assert not all(torch.equal(a, b) for a, b in zip(weights, sam))  # the radius is scale-adaptive
    assert "adaptive=True" in repr(BudgetSAM(1.5, adaptive=True))


def test_a_dropped_activation_leaves_no_process_wide_hook():
    """The recorder's hook on every module call holds it weakly: dropping the model and
    optimizer without deactivate() removes it (it would keep the model alive and make
    torch.compile guard on it)."""
    import gc

    from torch.nn.modules import module as torch_module

    from deepopt import replay

    gc.collect()
    for recorder in list(replay._recorders):  # earlier tests' optimizers, still referenced
        recorder.close()
    before = len(torch_module._global_forward_hooks)
    model, x, y = model_and_data()
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), budget=1.5)
    assert len(torch_module._global_forward_hooks) == before + 1
    del model, opt
    gc.collect()
    assert len(torch_module._global_forward_hooks) == before
    assert torch.autograd.backward.__name__ == "backward" and not hasattr(torch.autograd.backward, "__wrapped__")
