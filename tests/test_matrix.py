"""Across architectures, losses and optimizers: activated training runs, stays finite, and
is not worse than classical on a small task over several seeds."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

import deepopt
from conftest import LSTMNet, TransformerNet, bn_cnn, data, mlp


def plain_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))


ARCHS = {"mlp": (mlp, "vec"), "plain_cnn": (plain_cnn, "img"), "bn_cnn": (bn_cnn, "img"),
         "lstm": (LSTMNet, "seq"), "transformer": (TransformerNet, "seq")}
OPTS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


def ce(out, y, model):
    return nn.functional.cross_entropy(out, y)


def mse(out, y, model):
    return nn.functional.mse_loss(out, nn.functional.one_hot(y, 3).float())


def custom(out, y, model):
    # a user's own loss with an explicit L1 penalty term inside it
    return nn.functional.cross_entropy(out, y, label_smoothing=0.1) + 1e-4 * sum(
        p.abs().sum() for p in model.parameters())


LOSSES = {"ce": ce, "mse": mse, "custom": custom}


def fit(arch, opt_name, loss_name, seed, enabled, steps=60):
    factory, kind = ARCHS[arch]
    x, y = data(kind, n=192, seed=0)
    xt, yt = data(kind, n=128, seed=1)
    torch.manual_seed(seed)
    model = factory()
    opt = OPTS[opt_name](model.parameters())
    model, opt = deepopt.activate(model, opt, enabled=enabled)
    loss_fn = LOSSES[loss_name]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        model.train()
        loss = loss_fn(model(x[idx]), y[idx], model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        held_out = loss_fn(model(xt), yt, model).item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return held_out


CASES = [(a, "sgd", "ce") for a in ARCHS] + [("mlp", o, "ce") for o in OPTS] + \
        [("mlp", "adam", loss) for loss in LOSSES] + [("transformer", "adamw", "mse"), ("lstm", "rmsprop", "custom")]


@pytest.mark.parametrize("arch, opt_name, loss_name", CASES)
def test_activated_not_worse_than_classical(arch, opt_name, loss_name):
    seeds = (0, 1, 2)
    classical = statistics.fmean(fit(arch, opt_name, loss_name, s, False) for s in seeds)
    activated = statistics.fmean(fit(arch, opt_name, loss_name, s, True) for s in seeds)
    assert activated <= classical * 1.05 + 0.01, (activated, classical)
