"""Start-up calibration: rescues a net whose signal vanishes, leaves others bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepopt
from conftest import data, mlp, params_of, train
from deepopt.mechanisms.calibrate import calibrate_, layer_output_stds, signal_ratio


def deep_plain(depth: int = 30, width: int = 64) -> nn.Module:
    """A plain ReLU MLP whose small init makes the signal vanish with depth (like seed Net 4)."""
    layers, fan_in = [], 10
    for i in range(depth + 1):
        lin = nn.Linear(fan_in, width if i < depth else 3)
        nn.init.xavier_uniform_(lin.weight, gain=0.5)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()] if i < depth else [lin]
        fan_in = width
    return nn.Sequential(*layers)


def test_signal_ratio():
    assert signal_ratio([2.0, 1.0, 0.5]) == 0.25
    assert signal_ratio([1.0]) == 1.0


def test_calibration_brings_every_layer_to_unit_std():
    torch.manual_seed(0)
    net, x = deep_plain(), torch.randn(64, 10)
    assert signal_ratio(layer_output_stds(net, (x,), {})) < 1e-6
    assert calibrate_(net, (x,), {})
    stds = layer_output_stds(net, (x,), {})
    assert all(abs(s - 1) < 0.05 for s in stds)


def test_healthy_net_is_left_alone_bit_identically():
    x, y = data()
    runs = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = mlp(dropout=0.3)
        model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                      recipe="safe", enabled=enabled)
        torch.manual_seed(1)
        train(model, opt, x, y, steps=6)
        runs.append(params_of(model))
        if enabled:
            assert opt.mechanism("calibrate").calibrated is False
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recipe, closure", [("safe", False), ("thorough", True)])
def test_vanishing_net_trains_only_when_activated(recipe, closure):
    # thorough: step(closure), two-pass SAM; its first pass calibrates as a plain step does.
    x, y = data(n=256)
    final = {}
    for enabled in (False, True):
        torch.manual_seed(0)
        model = deep_plain(8)
        model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                      recipe=recipe, enabled=enabled)
        losses = train(model, opt, x, y, steps=150, batch=32, closure=closure)
        final[enabled] = sum(losses[-20:]) / 20
    assert final[True] < 0.8 * final[False]


def test_two_pass_sam_calibrates_on_the_first_forward_of_its_closure():
    # step(closure) holds the model hooks for SAM's two passes; the first pass must
    # still calibrate, with the same factors as a plain step on the same batch.
    x, y = data(n=256)
    weights = {}
    for recipe, closure in (("default", False), ("thorough", True)):
        torch.manual_seed(0)
        model = deep_plain(8)
        model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                      recipe=recipe)
        train(model, opt, x, y, steps=1, batch=32, closure=closure)
        assert opt.mechanism("calibrate").calibrated is True, recipe
        weights[recipe] = params_of(model)
    for a, b in zip(weights["default"], weights["thorough"]):
        assert torch.equal(a, b)  # lr 0: the weights are the calibrated ones
