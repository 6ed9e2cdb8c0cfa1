"""Weight averaging: hand-computed EMA/phase averages, eval weights, BatchNorm buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepopt
from conftest import assert_equal, bn_cnn, data, train
from deepopt.checkpoint import training_state_dict
from deepopt.experimental import TwoPassSAM
from deepopt.mechanisms.average import (
    WeightAverage,
    average_,
    ema_decay,
    lr_window,
    power_gamma,
    power_weight,
)


def test_ema_decay_warmup():
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(8, 0.999) == pytest.approx(9 / 18)
    assert ema_decay(10**7, 0.999) == 0.999
    assert ema_decay(0, 0.9, warmup=False) == 0.9


def test_ema_matches_hand_computation():
    avg = WeightAverage("ema", decay=0.5, warmup=False)
    for v in (1.0, 3.0, 7.0):
        avg.update([torch.tensor([v])])
    # a1 = 1; a2 = .5*1 + .5*3 = 2; a3 = .5*2 + .5*7 = 4.5
    assert avg.tensors[0].item() == pytest.approx(4.5)


def test_phase_average_restarts_when_lr_changes():
    avg = WeightAverage("phase")
    for v, lr in ((1.0, 0.1), (3.0, 0.1), (10.0, 0.01), (20.0, 0.01), (30.0, 0.01)):
        avg.update([torch.tensor([v])], lr=lr)
    assert avg.tensors[0].item() == pytest.approx(20.0) and avg.count == 3


def test_average_copies_integer_buffers():
    a = [torch.tensor([1.0]), torch.tensor(3)]
    average_(a, [torch.tensor([3.0]), torch.tensor(5)], 0.5)
    assert a[0].item() == 2.0 and a[1].item() == 5


def test_eval_uses_averaged_weights_and_bn_stats_then_train_resumes():
    torch.manual_seed(0)
    model = bn_cnn()
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  average="ema", ema_decay=0.9)
    x, y = data("img")
    train(model, opt, x, y, steps=5)
    train_state = training_state_dict(model)
    avg = opt.mechanism("average").tensors
    model.eval()
    with torch.no_grad():
        model(x)
    names = [n for n, p in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name, a in zip(names, avg):
        assert torch.equal(model.state_dict()[name], a), name
    assert not torch.equal(model.state_dict()["0.weight"], train_state["0.weight"])
    model.train()
    assert_equal(training_state_dict(model), train_state)
    for k, v in model.state_dict().items():  # what a checkpoint gets in train mode too
        assert torch.equal(v, avg[names.index(k)]), k
    train(model, opt, x, y, steps=2)


def test_state_dict_in_eval_mode_holds_eval_weights_without_a_forward():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.5), average="ema")
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward(); opt.step(); opt.zero_grad()
    model.eval()
    assert torch.equal(model.state_dict()["weight"], opt.mechanism("average").tensors[0])


def test_zero_grad_after_train_brings_back_training_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.5), average="ema")
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward(); opt.step(); opt.zero_grad()
    w = model.weight.detach().clone()
    model.eval()
    model(torch.randn(2, 3))
    assert not torch.equal(model.weight, w)
    model.train()
    opt.zero_grad()
    assert torch.equal(model.weight, w)


def test_average_restart_continues_from_the_phase_average_after_an_lr_drop():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = deepopt.activate(model, opt, recipe="safe", mechanisms=[WeightAverage("phase", restart=True)])
    x = torch.randn(16, 3)
    seen = []
    for _ in range(4):
        model(x).pow(2).mean().backward()
        opt.step(); opt.zero_grad()
        seen.append([p.detach().clone() for p in model.parameters()])
    before = [p.detach().clone() for p in model.parameters()]
    model(x).pow(2).mean().backward()  # same LR: no restart, the raw weights train on
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.zero_grad()
    for g in opt.param_groups:
        g["lr"] = 0.01  # what a scheduler's drop does
    model(x).pow(2).mean().backward()
    expected = [torch.stack(ws).mean(0) for ws in zip(*seen)]
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_average_restart_moved_to_experimental_and_bad_kinds_are_refused():
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"average_restart moved to deepopt.experimental.*restart=True"):
        deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe="safe", average_restart=True)
    with pytest.raises(ValueError, match="kind='swa' is invalid"):
        WeightAverage("swa", restart=True)


def test_average_every_k_folds_every_kth_iterate_with_the_same_horizon():
    avg = WeightAverage("phase", every=3)
    for v in range(10):  # iterates 0..9: the first starts the average, then every 3rd
        avg.update([torch.tensor([float(v)])], lr=0.1)
    assert avg.tensors[0].item() == pytest.approx((0 + 3 + 6 + 9) / 4)
    ema = WeightAverage("ema", decay=0.9, warmup=False, every=2)
    ema.update([torch.tensor([0.0])])
    ema.update([torch.tensor([1.0])])  # skipped
    ema.update([torch.tensor([1.0])])
    assert ema.tensors[0].item() == pytest.approx(1 - 0.9**2)
    state = ema.state_dict()
    ema.update([torch.tensor([5.0])])  # one call into the next window...
    again = WeightAverage("ema", decay=0.9, warmup=False, every=2)
    again.load_state_dict(state)
    again.update([torch.tensor([5.0])])
    assert again.calls == ema.calls == 1 and torch.equal(again.tensors[0], ema.tensors[0])


def test_average_restart_also_acts_on_a_two_pass_sam_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = deepopt.activate(model, opt, recipe="safe",
                                  mechanisms=[TwoPassSAM(0.05), WeightAverage("phase", restart=True)])
    x = torch.randn(16, 3)
    seen, first = [], []

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        if not first:  # the weights of SAM's first pass, after the forward's hooks
            first.append([p.detach().clone() for p in model.parameters()])
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
        seen.append([p.detach().clone() for p in model.parameters()])
    for g in opt.param_groups:
        g["lr"] = 0.01  # what a scheduler's drop does
    first.clear()
    opt.step(closure)
    expected = [torch.stack(ws).mean(0) for ws in zip(*seen)]
    for p, e in zip(first[0], expected):
        torch.testing.assert_close(p, e)


def test_power_average_weighs_iterate_i_about_i_to_the_gamma():
    avg = WeightAverage("power", width=0.1)
    values = [1.0, 4.0, -2.0, 8.0, 3.0, 5.0]
    for v in values:
        avg.update([torch.tensor([v], dtype=torch.float64)])
    g = power_gamma(0.1)
    # Iterate i (1-based) weighs i**(g+1) - (i-1)**(g+1), about (g+1) i**g (EDM2, eq. 3).
    weights = [i ** (g + 1) - (i - 1) ** (g + 1) for i in range(1, len(values) + 1)]
    expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    assert avg.tensors[0].item() == pytest.approx(expected, rel=1e-6)


def test_power_window_is_a_fixed_fraction_of_the_steps_so_far():
    # The weight of the newest iterate falls as 1/t: twice the steps, half the weight.
    g = power_gamma(0.05)
    assert power_weight(2000, g) / power_weight(1000, g) == pytest.approx(0.5, rel=1e-2)
    with pytest.raises(ValueError, match="sigma_rel"):
        power_gamma(0.3)


def test_lr_following_window_tracks_the_iterate_when_the_lr_reaches_zero():
    avg = WeightAverage("power", width=0.05, follows_lr=True)
    for v, lr in ((1.0, 0.1), (2.0, 0.1), (3.0, 0.05), (10.0, 0.0)):
        avg.update([torch.tensor([v])], lr=lr, max_lr=0.1)
    # the annealed iterate, not a mean with earlier ones: eval() shows the training weights
    assert avg.at_iterate and avg.evaluated() is None
    assert lr_window(0.01, lr=0.05, max_lr=0.1) == pytest.approx(0.02)


def test_activated_power_average_matches_a_hand_kept_average_of_the_trajectory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    model, opt = deepopt.activate(model, opt, average="power", average_width=0.1, average_follows_lr=True,
                                  average_every=1)
    hand = WeightAverage("power", width=0.1, follows_lr=True)
    max_lr = 0.0
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for _ in range(10):
        nn.functional.cross_entropy(model(x), y).backward()
        lr = opt.param_groups[0]["lr"]
        opt.step(); opt.zero_grad(); sched.step()
        max_lr = max(max_lr, lr)
        hand.update([p.detach() for p in model.parameters()], lr=lr, max_lr=max_lr)
    model.eval()
    model(x)  # an evaluation forward shows the evaluation weights
    shown = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(shown, hand.tensors))
    assert not all(torch.equal(a, b) for a, b in zip(shown, opt.state_dict()["deepopt"]["train_values"]))


def test_a_window_of_one_step_is_taken_at_once_even_between_folds():
    # every=4, but once the LR has fallen enough the average is the iterate at every step
    avg = WeightAverage("power", width=0.05, every=4, follows_lr=True)
    for v, lr in ((1.0, 0.1), (2.0, 0.1), (3.0, 0.1), (4.0, 1e-6), (5.0, 1e-6)):
        avg.update([torch.tensor([v])], lr=lr, max_lr=0.1)
        assert avg.at_iterate == (lr < 0.1)  # eval() shows the training weights: nothing copied
    for v in (6.0, 7.0, 8.0, 9.0):  # the LR back up: at the next fold, averaging starts from the iterate
        avg.update([torch.tensor([v])], lr=0.1, max_lr=0.1)
    assert not avg.at_iterate and avg.evaluated()[0].item() == 9.0
    plain = WeightAverage("power", width=0.05, every=4)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        plain.update([torch.tensor([v])], lr=0.1, max_lr=0.1)
    assert plain.count == 2  # the first iterate, then one fold after 4 more steps


def test_average_width_out_of_range_is_refused_with_its_name():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="average_width=0.5"):
        deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), average="power", average_width=0.5)


def test_samples_fold_less_often_as_the_window_grows_and_keep_the_power_average():
    gamma_width, steps = 0.05, 6000
    sparse = WeightAverage("power", width=gamma_width, samples=8)
    dense = WeightAverage("power", width=gamma_width)  # one fold per step
    folds = []
    for t in range(1, steps + 1):
        value = [torch.tensor([float(t)], dtype=torch.float64)]
        before = sparse.count
        sparse.update(value, lr=0.1, max_lr=0.1)
        dense.update(value, lr=0.1, max_lr=0.1)
        if sparse.count > before:
            folds.append(t)
    gaps = [b - a for a, b in zip(folds, folds[1:])]
    assert gaps[0] == 1 and abs(gaps[-1] - gamma_width * steps / 8) <= 1  # 1/8 of the window apart
    assert len(folds) < steps / 6  # 1/6 of the steps here, falling as 1 / steps
    # on a ramp, a power average lags by steps / (gamma + 2); the sparse one within a fold's gap
    lag = steps - dense.tensors[0].item()
    assert lag == pytest.approx(steps / (dense.gamma + 2), rel=0.01)
    assert abs(sparse.tensors[0].item() - dense.tensors[0].item()) < gaps[-1]
