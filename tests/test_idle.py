"""When activation leaves a run as it would have been, deepopt says so once, in one line, with the reason."""

from __future__ import annotations

import torch
from torch import nn

import deepopt
from conftest import mlp


def deep_narrow() -> nn.Module:
    # 12 tanh layers at a small init: the signal vanishes through depth, so calibration acts
    layers = []
    for _ in range(12):
        lin = nn.Linear(16, 16)
        nn.init.normal_(lin.weight, std=0.05)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(nn.Linear(10, 16), *layers, nn.Linear(16, 3))


def lines(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("deepopt: ")]


def loop(model, opt, steps: int, eval_every: int = 10, sched=None, nan_at: int = -1) -> list[int]:
    """The user's loop with an evaluation every ``eval_every`` steps; the steps evaluated at."""
    g = torch.Generator().manual_seed(0)
    evaluated = []
    for i in range(steps):
        model.train()
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y) * (float("nan") if i == nan_at else 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if (i + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                model(x)
            evaluated.append(i + 1)
    return evaluated


def activated(net: nn.Module, steps: int = 0, **kwargs):
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if steps else None
    model, opt = deepopt.activate(net, opt, **kwargs)
    return model, opt, sched


def test_safe_recipe_on_a_healthy_net_says_once_at_the_first_evaluation(capfd):
    torch.manual_seed(0)
    model, opt, _ = activated(mlp(), recipe="safe")
    capfd.readouterr()
    loop(model, opt, 40)
    said = lines(capfd)
    assert len(said) == 1, said
    assert said[0].startswith("deepopt: after 10 steps this run trains and evaluates as it would without deepopt")
    assert "calibration found the signal healthy" in said[0] and "the guard skipped no step" in said[0]


def test_nothing_is_said_where_a_mechanism_acted(capfd):
    for net, kwargs, nan_at in ((deep_narrow(), {"recipe": "safe"}, -1),  # calibration rescaled
                                (mlp(), {"recipe": "safe"}, 3),  # the guard skipped a NaN step
                                (mlp(), {}, -1)):  # the default's average at a constant LR
        model, opt, _ = activated(net, **kwargs)
        capfd.readouterr()
        loop(model, opt, 60, nan_at=nan_at)
        assert lines(capfd) == [], kwargs


def test_default_says_so_once_the_schedule_has_annealed_the_average_into_the_iterate(capfd):
    model, opt, sched = activated(mlp(), steps=300)
    capfd.readouterr()
    evaluated = loop(model, opt, 300, sched=sched)
    said = lines(capfd)
    assert len(said) == 1 and "so the average is the last iterate (the schedule did the averaging)" in said[0]
    step = int(said[0].split("after ")[1].split(" steps")[0])
    lr = 0.05 * (1 + torch.cos(torch.tensor(step / 300 * torch.pi))) / 2  # cosine's LR at that step
    assert step in evaluated and lr <= 0.1 * 0.05  # not before the LR fell to a tenth of its peak
