"""Checkpoints with the ordinary idiom continue the exact same trajectory, for every recipe."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import deepopt
from conftest import bn_cnn, data, mlp, train
from deepopt.experimental import legacy_kwargs

RECIPE_CASES = [
    {"recipe": "default"},
    {"recipe": "safe"},
    {"recipe": "default", "rho": 0.2},
    {"recipe": "default", "rho": 0.2, "adaptive": True, "rho_follows_lr": True},
    {"recipe": "default", "average": "ema"},
    {"recipe": "default", "average": "phase", "rho": 0.1},
    {"recipe": "thorough", "closure": True},
    {"recipe": "default", "lookahead_k": 3, "rho": 0.1},
]


def build(kwargs, factory, opt_cls):
    torch.manual_seed(0)
    model = factory()
    kwargs = dict(kwargs)
    kwargs.pop("closure", None)
    opt = opt_cls(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.5)
    model, opt = deepopt.activate(model, opt, **legacy_kwargs(kwargs))
    return model, opt, sched


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kwargs", RECIPE_CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("factory, kind", [(mlp, "vec"), (bn_cnn, "img")], ids=["mlp", "bn_cnn"])
@pytest.mark.parametrize("save_in_eval", [False, True])
def test_resume_equals_uninterrupted(kwargs, factory, kind, save_in_eval):
    x, y = data(kind)
    closure = kwargs.get("closure", False)
    opt_cls = lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-3)  # noqa: E731

    model, opt, sched = build(kwargs, factory, opt_cls)
    train(model, opt, x, y, steps=12, scheduler=sched, closure=closure)
    model.eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = build(kwargs, factory, opt_cls)
    train(model, opt, x, y, steps=5, scheduler=sched, closure=closure)
    if save_in_eval:
        model.eval()
        with torch.no_grad():
            model(x)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})

    model2, opt2, sched2 = build(kwargs, factory, opt_cls)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    # the remaining 7 steps use batches 5..11 as in the uninterrupted run
    train(model2, opt2, x, y, steps=7, scheduler=sched2, closure=closure, start=5)
    model2.eval()
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_optimizer_loaded_before_model_still_resumes():
    x, y = data()
    kwargs = {"average": "ema", "rho": 0.1}
    opt_cls = lambda p, lr: torch.optim.Adam(p, lr=lr * 0.1)  # noqa: E731
    model, opt, sched = build(kwargs, mlp, opt_cls)
    train(model, opt, x, y, steps=8, scheduler=sched)
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = build(kwargs, mlp, opt_cls)
    train(model, opt, x, y, steps=4, scheduler=sched)
    model.eval()
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    model2, opt2, sched2 = build(kwargs, mlp, opt_cls)
    opt2.load_state_dict(ckpt["opt"])
    model2.load_state_dict(ckpt["model"])  # eval weights: must not replace the training weights
    sched2.load_state_dict(ckpt["sched"])
    train(model2, opt2, x, y, steps=4, scheduler=sched2, start=4)
    for p, r in zip(model2.parameters(), reference):
        assert torch.equal(p, r)


def test_plain_optimizer_state_loads_into_activated_optimizer():
    model = mlp()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data()
    train(model, plain, x, y, steps=2)
    sd = plain.state_dict()
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"], plain.state[model[0].weight]["momentum_buffer"])


def test_future_format_version_fails_clearly():
    model = nn.Linear(2, 2)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1))
    sd = opt.state_dict()
    sd["deepopt"]["version"] = 99
    with pytest.raises(ValueError, match="format version 99"):
        opt.load_state_dict(sd)


def test_model_state_dict_holds_no_perturbation_mid_step():
    torch.manual_seed(0)
    model = mlp()
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.5)
    x, y = data()
    train(model, opt, x, y, steps=3)
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nn.functional.cross_entropy(model(x), y)  # perturbed now
    loss.backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, clean[k])
