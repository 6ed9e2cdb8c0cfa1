"""The activate contract: A/B switch, no double wrap, shared param_groups, schedulers, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepopt
from conftest import bn_cnn, data, mlp, params_of, train
from deepopt.experimental import WeightNoise


def seeded(factory=mlp, seed=0):
    torch.manual_seed(seed)
    return factory()


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_enabled_false_is_bit_identical_to_classical(opt_cls):
    x, y = data()
    runs = []
    for enabled in (None, False):
        model = seeded(lambda: mlp(0.2))
        opt = opt_cls(model.parameters(), lr=0.01)
        if enabled is not None:
            model, opt = deepopt.activate(model, opt, enabled=False, rho=0.1, average="ema")
        torch.manual_seed(1)
        train(model, opt, x, y, steps=10)
        runs.append(params_of(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_activate_twice_never_double_wraps():
    model = seeded()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = deepopt.activate(model, base)
    assert deepopt.activate(model, opt)[1] is opt
    assert deepopt.activate(model, base)[1] is opt
    assert len(model._forward_pre_hooks) == 1


def test_param_groups_shared_and_survive_load_state_dict():
    model = seeded()
    base = torch.optim.SGD([{"params": [model[0].weight]}, {"params": [model[3].weight], "lr": 0.5}], lr=0.1)
    model, opt = deepopt.activate(model, base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is base.param_groups
    assert opt.param_groups[1]["lr"] == 0.5


def make_sched(kind, opt):
    s = torch.optim.lr_scheduler
    return {
        "step": lambda: s.StepLR(opt, 2, gamma=0.5),
        "onecycle": lambda: s.OneCycleLR(opt, max_lr=0.1, total_steps=20),
        "cyclic": lambda: s.CyclicLR(opt, 0.01, 0.1, step_size_up=3),
        "cosine": lambda: s.CosineAnnealingLR(opt, 10),
        "lambda": lambda: s.LambdaLR(opt, lambda e: 0.9**e),
        "sequential": lambda: s.SequentialLR(
            opt, [s.LinearLR(opt, 0.5, total_iters=2), s.ExponentialLR(opt, 0.9)], milestones=[2]
        ),
    }[kind]()


@pytest.mark.parametrize("kind", ["step", "onecycle", "cyclic", "cosine", "lambda", "sequential"])
@pytest.mark.parametrize("built", ["before", "after"])
def test_scheduler_lr_reaches_the_update(kind, built):
    """With no momentum and no weight decay, w_t - w_{t+1} = lr_t * grad exactly."""
    model = seeded(lambda: nn.Linear(10, 1))
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if kind in ("onecycle", "cyclic") else 0)
    if built == "before":
        sched = make_sched(kind, base)
        model, opt = deepopt.activate(model, base, guard=False)
    else:
        model, opt = deepopt.activate(model, base, guard=False)
        sched = make_sched(kind, opt)
    x = torch.randn(8, 10)
    for _ in range(6):
        lr = opt.param_groups[0]["lr"]
        w0 = model.weight.detach().clone()
        model(x).pow(2).mean().backward()
        g = model.weight.grad.clone()
        mom_free = base.state.get(model.weight, {}).get("momentum_buffer") is None
        opt.step()
        opt.zero_grad()
        if mom_free:
            torch.testing.assert_close(w0 - model.weight.detach(), lr * g)
        sched.step()
    assert opt.param_groups[0]["lr"] != 0.1 or kind == "cyclic"


def test_reduce_lr_on_plateau_and_step_hooks_fire_once():
    model = seeded()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    base.register_step_pre_hook(lambda *a: calls.append("pre-base"))
    model, opt = deepopt.activate(model, base)
    opt.register_step_post_hook(lambda *a: calls.append("post-wrapper"))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    x, y = data()
    train(model, opt, x, y, steps=1)
    assert calls == ["pre-base", "post-wrapper"]
    sched.step(1.0)
    sched.step(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_closure_returns_its_loss_without_extra_passes():
    model = seeded()
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and len(calls) == 1


def test_frozen_params_and_several_groups_train():
    model = seeded(bn_cnn)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    base = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[4].parameters(), "lr": 0.01}],
                           lr=0.1, momentum=0.9)
    model, opt = deepopt.activate(model, base, rho=0.05, average="ema")
    x, y = data("img")
    losses = train(model, opt, x, y, steps=8)
    assert all(map(lambda v: v == v, losses))
    assert torch.equal(model[0].weight, frozen)


# -- bad input -----------------------------------------------------------------------------
def test_model_not_a_module():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        deepopt.activate(lambda x: x, opt)


def test_optimizer_not_an_optimizer():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        deepopt.activate(nn.Linear(2, 2), "sgd")


def test_foreign_parameters():
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not model's parameters"):
        deepopt.activate(nn.Linear(2, 2), torch.optim.SGD(other.parameters(), lr=0.1))


def test_no_trainable_parameters():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"recipe": "fast"}, "recipe='fast' is unknown; valid recipes: default, safe, thorough"),
        ({"rhoo": 0.1}, "unknown override.*rhoo.*valid overrides:.*rho"),
        ({"rho": -0.1}, "rho=-0.1 is invalid"),
        ({"ema_decay": 1.0}, r"ema_decay=1.0 is invalid: it must lie in \[0, 1\)"),
        ({"average": "swa"}, "average='swa' is invalid"),
        ({"enabled": False, "rho": -1}, "rho=-1 is invalid"),
        ({"budget": 3}, r"budget=3 is invalid: it must lie in \[1, 2.25\]"),
        ({"sam_rho": 0.05}, r"sam_rho moved to deepopt.experimental: pass mechanisms=\[TwoPassSAM\(rho=...\)\].*budget=1.5"),
    ],
)
def test_bad_settings(kwargs, match):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_deactivate_restores_plain_objects():
    model = seeded()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = deepopt.activate(model, base, rho=0.5)
    x, y = data()
    train(model, opt, x, y, steps=3)
    model(x)  # leaves a perturbation pending in the weights
    model, plain = deepopt.deactivate(model, opt)
    assert plain is base and len(model._forward_pre_hooks) == 0
    assert getattr(base, "_deepopt_wrapper", None) is None


def lbfgs_run(activate: dict | None, steps: int = 3):
    model = seeded(lambda: mlp(0.0))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    if activate is not None:
        model, opt = deepopt.activate(model, opt, **activate)
    x, y = data()
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(opt.step(closure).detach())  # LBFGS evaluates the closure itself, several times
    return model, opt, losses


def test_lbfgs_gets_its_closure_and_the_mechanisms_it_cannot_take_are_off(capsys):
    plain, _, plain_losses = lbfgs_run(None)
    assert capsys.readouterr().err == ""
    model, opt, losses = lbfgs_run({})
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith("deepopt: the divergence guard is off for LBFGS")
    assert opt.mechanism("guard") is None and opt.mechanism("calibrate").calibrated is not None  # calibration measured
    assert opt.steps == 3 and [a.item() for a in losses] == [b.item() for b in plain_losses]
    for a, b in zip(params_of(model), params_of(plain)):
        assert torch.equal(a, b)  # the default recipe leaves a healthy net's training unchanged
    _, opt, _ = lbfgs_run({"rho": 0.1, "mechanisms": [WeightNoise(0.1)], "budget": 1.5, "average": "ema"}, steps=2)
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and all(f"{k}=" in said[0] for k in ("rho", "noise", "budget")), said
    assert [m.name for m in opt.mechanisms] == ["calibrate", "average"]
    assert opt.mechanism("average").tensors is not None  # averaging, which can act, does


def test_thorough_on_a_loss_it_cannot_prove_says_so_once_in_one_line_and_trains_as_plain(capsys):
    """A functional loss (F.cross_entropy) cannot be replayed: no SAM step, one line."""
    runs = []
    for recipe in (None, "thorough"):
        model = seeded()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if recipe:
            model, opt = deepopt.activate(model, opt, recipe=recipe)
        x, y = data()
        train(model, opt, x, y, steps=4)
        runs.append(params_of(model.train()))
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith("deepopt: budget=1.5 (two-pass SAM, rho 0.05) cannot run on this loop")
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # no SAM step ran: the plain SGD trajectory
