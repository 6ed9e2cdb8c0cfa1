"""Dropout-matched evaluation: factors, the gate, eval-only effect, views, checkpoints, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deepopt
import deepopt.mechanisms.dropout_match
from conftest import assert_equal, data, mlp, train
from deepopt.checkpoint import training_state_dict
from deepopt.experimental import TwoPassSAM
from deepopt.mechanisms.dropout_match import (
    DropoutMatch,
    has_dropout,
    matched_scales,
    weighted_layers,
)


def deep(p: float = 0.6, depth: int = 6) -> nn.Sequential:
    mods: list[nn.Module] = []
    cin = 10
    for _ in range(depth):
        mods += [nn.Linear(cin, 32), nn.Dropout(p), nn.ReLU()]
        cin = 32
    return nn.Sequential(*mods, nn.Linear(cin, 3))


def test_has_dropout_ignores_dropout_that_drops_nothing():
    assert has_dropout(mlp(0.3)) and not has_dropout(mlp(0.0)) and not has_dropout(nn.Linear(2, 2))


def test_factors_match_eval_outputs_to_dropout_outputs_layer_by_layer():
    torch.manual_seed(0)
    net = deep().eval()
    x = torch.randn(256, 10)
    scales, _ = matched_scales(net, (x,), {}, samples=8)
    assert scales[0] == 1.0  # no dropout upstream of the first layer
    assert all(s > 1.0 for s in scales[1:]) and scales[1] > 1.2  # eval-mode outputs shrink
    assert not any(m.training for m in net.modules())  # dropout switched off again
    targets: list[float] = []
    hooks = [m.register_forward_hook(lambda m, i, o: targets.append(o.abs().mean().item()))
             for m in weighted_layers(net)]
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(8):
            net(x)
    for h in hooks:
        h.remove()
    state = DropoutMatch()
    state.scales, state.keep = scales, True
    scaled = copy.deepcopy(net).eval()
    state.apply_(weighted_layers(scaled))
    found: list[float] = []
    for m in weighted_layers(scaled):
        m.register_forward_hook(lambda m, i, o: found.append(o.abs().mean().item()))
    with torch.no_grad():
        scaled(x)
    per_layer = torch.tensor(targets).view(8, -1).mean(0)
    # each rescaled eval-mode layer sits at the dropout outputs' level (two dropout draws)
    assert torch.allclose(torch.tensor(found), per_layer, rtol=0.15)


def test_gate_keeps_nothing_on_a_net_without_dropout():
    torch.manual_seed(0)
    scales, keep = matched_scales(mlp(0.0).eval(), (torch.randn(8, 10),), {})
    assert scales == [1.0, 1.0] and keep is False


def train_pair(overrides: dict, steps: int = 12, evals: bool = True, closure: bool = False):
    """A dropout net trained with an evaluation after every 3 steps; weights and eval outputs."""
    x, y = data("vec", n=96)
    torch.manual_seed(0)
    model = deep(0.5, depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if overrides is not None:
        model, opt = deepopt.activate(model, opt, **overrides)
    outputs = []
    for start in range(0, steps, 3):
        train(model, opt, x, y, steps=3, start=start, closure=closure)
        if evals:
            model.eval()
            with torch.no_grad():
                outputs.append(model(x))
            model.train()
    opt.zero_grad()
    return model, opt, outputs


def test_training_is_bit_identical_to_classical_and_eval_too_where_the_gate_says_no():
    ref, _, ref_out = train_pair(None)
    # average=None: the default recipe's averaged evaluation weights would differ from classical's
    model, opt, out = train_pair({"dropout_match": True, "average": None})
    assert opt.mechanism("dropout_match") is not None and opt.mechanism("dropout_match").step == 12 and not opt.mechanism("dropout_match").keep
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(ref_out, out))


@pytest.fixture
def always_keep(monkeypatch):
    """The gate says yes with factor 2 everywhere but the first layer (a broken eval, forced)."""
    def fake(model, args, kwargs, *, layers, **_):
        return [1.0] + [2.0] * (len(layers) - 1), True
    monkeypatch.setattr(deepopt.mechanisms.dropout_match, "matched_scales", fake)


def test_kept_factors_change_only_the_evaluated_weights(always_keep):
    ref, _, ref_out = train_pair(None)
    # average=None: the factors alone, applied to the training weights (not to an average)
    model, opt, out = train_pair({"dropout_match": True, "average": None})
    assert opt.mechanism("dropout_match").keep
    for a, b in zip(ref.state_dict().values(), training_state_dict(model).values()):
        assert torch.equal(a, b)  # the training weights, as classical's
    train_mode_saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    shown = model.state_dict()
    assert_equal(shown, train_mode_saved)  # a checkpoint holds the evaluated weights in either mode
    assert torch.equal(shown["0.weight"], ref.state_dict()["0.weight"])
    assert torch.equal(shown["3.weight"], 2 * ref.state_dict()["3.weight"])
    assert torch.equal(shown["3.bias"], 2 * ref.state_dict()["3.bias"])
    scaled = copy.deepcopy(ref).eval()
    with torch.no_grad():
        for m in weighted_layers(scaled)[1:]:
            m.weight.mul_(2.0)
            m.bias.mul_(2.0)
        x, _ = data("vec", n=96)
        assert torch.equal(model(x), scaled(x))
    assert not torch.equal(out[-1], ref_out[-1])
    model.train()
    assert torch.equal(training_state_dict(model)["3.weight"], ref.state_dict()["3.weight"])


def test_two_pass_sam_steps_are_measured_and_matched_too(always_keep):
    # SAM's closures run with the model hooks held; the training batch must still be kept.
    model, opt, out = train_pair({"average": None, "mechanisms": [TwoPassSAM(0.05, 1000)]}, closure=True)
    assert opt.mechanism("dropout_match").step == 12 and opt.mechanism("dropout_match").keep
    model.eval()
    shown = model.state_dict()["3.weight"].clone()  # state_dict() holds the live tensors
    model.train()
    assert torch.equal(shown, 2 * training_state_dict(model)["3.weight"])


def test_frozen_layers_are_never_rescaled(always_keep):
    torch.manual_seed(0)
    model = deep(0.5, depth=3)
    model[3].requires_grad_(False)  # the second linear layer
    frozen = model[3].weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    # average=None: the evaluated weights are then the trained ones times the factors
    model, opt = deepopt.activate(model, opt, dropout_match=True, average=None)
    x, y = data("vec")
    train(model, opt, x, y, steps=2)
    trained = model[6].weight.detach().clone()
    model.eval()
    with torch.no_grad():
        model(x)
    assert torch.equal(model[3].weight, frozen)  # its factor would not be undone by train()
    assert torch.equal(model[6].weight, 2 * trained)
    model.train()
    opt.zero_grad()
    assert torch.equal(model[6].weight, trained)


def test_checkpoint_taken_in_eval_mode_resumes_the_same_trajectory(always_keep):
    x, y = data("vec", n=96)
    model, opt, _ = train_pair({"dropout_match": True}, steps=6)
    model.eval()
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()})
    torch.manual_seed(1)
    model2 = deep(0.5, depth=4)
    model2, opt2 = deepopt.activate(model2, torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9,
                                                            weight_decay=5e-4), dropout_match=True)
    opt2.load_state_dict(ckpt["opt"])
    model2.load_state_dict(ckpt["model"])
    assert opt2.mechanism("dropout_match").state_dict() == opt.mechanism("dropout_match").state_dict()
    for m, o in ((model, opt), (model2, opt2)):
        torch.set_rng_state(ckpt["rng"])
        m.train()
        train(m, o, x, y, steps=4, start=6)
        m.eval()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_nets_without_dropout_get_no_state_and_no_extra_pass():
    torch.manual_seed(0)
    model = mlp(0.0)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), dropout_match=True)
    assert opt.mechanism("dropout_match") is None


def test_dropout_match_must_be_a_bool():
    with pytest.raises(ValueError, match="dropout_match='yes'"):
        deepopt.activate(mlp(0.2), torch.optim.SGD(mlp(0.2).parameters(), lr=0.1), dropout_match="yes")


def test_a_short_last_batch_does_not_replace_the_measured_batch():
    torch.manual_seed(0)
    model = mlp(0.3)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), dropout_match=True)
    x, y = data("vec", n=36)
    for xb, yb in zip(x.split(16), y.split(16)):  # 16, 16, then 4
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(opt.mechanism("dropout_match")._last_batch[0][0], x[16:32])


class EvalNeedsEight(nn.Module):
    """A user model whose eval forward only takes batches of 8 (it trains on 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and len(x) != 8:
            raise ValueError("eval batches must hold 8 rows")
        return self.net(x)


def test_a_model_that_cannot_be_measured_is_evaluated_plainly_with_a_warning():
    torch.manual_seed(0)
    model = EvalNeedsEight()
    # average=None: "evaluated plainly" then means at the training weights
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), dropout_match=True,
                                  average=None)
    x, y = data("vec")
    train(model, opt, x, y, steps=2)
    weights = training_state_dict(model)
    model.eval()
    with pytest.warns(UserWarning, match="dropout-matched evaluation is off.*dropout_match=False"):
        with torch.no_grad():
            out = model(x[:8])
    assert out.shape == (8, 3) and opt.mechanism("dropout_match").off and not opt.has_eval_view
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(not m.training for m in model.modules())  # its dropout is off again
