"""Faults: a non-finite step leaves no trace; an exception in user code leaves no perturbation.

* NaN/inf injected at random steps (in the loss, in a gradient, in the input batch, in the
  second SAM pass): weights, BatchNorm buffers, optimizer state, averages, Lookahead
  weights and the LR scheduler end finite and *equal* to a run that skips those batches
  (the scheduler still counts them as iterations, as with GradScaler's skipped steps);
  ``optimizer.mechanism("guard").skipped`` counts them; ``max_skips`` in a row raise ``DivergenceError``.
* An exception raised by user code at any point of a step (forward, loss, backward hook,
  closure, ``KeyboardInterrupt`` in forward) leaves the training weights in
  ``model.state_dict()``; training continues, or is checkpointed and resumed, exactly as
  if the failed iteration had never happened.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

import deepopt
from conftest import bn_cnn, data, mlp
from deepopt.checkpoint import training_state_dict
from deepopt.experimental import legacy_kwargs

NAN, INF = float("nan"), float("inf")

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


def build(factory, opt_name, overrides):
    torch.manual_seed(0)
    model = factory()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.7)  # built before activate
    model, opt = deepopt.activate(model, opt, **legacy_kwargs(overrides))
    return model, opt, sched


def inject_grad(model, value):
    with torch.no_grad():
        next(model.parameters()).grad.view(-1)[0] = value


def fit(model, opt, sched, x, y, steps, faults, drop, closure):
    """The user's loop; ``faults``: step -> injection; ``drop``: steps whose batch is never seen."""
    loss_fn = nn.functional.cross_entropy
    for i in range(steps):
        if i in drop:
            sched.step()  # the iteration still counts for the schedule
            continue
        kind = faults.get(i)
        xb, yb = x[i * 8:(i + 1) * 8].clone(), y[i * 8:(i + 1) * 8]
        if kind == "input":
            xb.view(len(xb), -1)[1, 0] = NAN
        if closure:
            calls = []

            def step_closure(xb=xb, yb=yb, kind=kind, calls=calls):
                calls.append(1)
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                if kind == "loss_nan" or (kind == "second_pass" and len(calls) == 2):
                    loss = loss * NAN
                loss.backward()
                if kind == "grad_inf":
                    inject_grad(model, INF)
                return loss

            opt.step(step_closure)
        else:
            loss = loss_fn(model(xb), yb)
            if kind == "loss_nan":
                loss = loss * NAN
            elif kind == "loss_inf":
                loss = loss * INF
            opt.zero_grad()
            loss.backward()
            if kind == "grad_nan":
                inject_grad(model, NAN)
            elif kind == "grad_inf":
                inject_grad(model, -INF)
            opt.step()
        sched.step()


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        if a.is_floating_point():
            assert torch.isfinite(a).all(), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == b and a == a, where
    else:
        assert a == b, where


def everything(model, opt, sched):
    """Weights and buffers (training and evaluation views), optimizer state, deepopt state, schedule."""
    model.train()
    train_view = training_state_dict(model)
    model.eval()
    eval_view = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    state = opt.state_dict()
    state["deepopt"]["mechanisms"].pop("guard")  # the skip counter is the only difference, checked apart
    return {"train": train_view, "eval": eval_view, "optimizer": state, "scheduler": sched.state_dict(),
            "lr": sched.get_last_lr()}


FAULT_CASES = [
    # (model, optimizer, overrides, closure, injections, seed)
    (mlp, "sgd", {}, False, ["loss_nan", "loss_inf", "grad_nan"], 0),
    (bn_cnn, "sgd", {"rho": 0.1, "average": "ema"}, False, ["input", "loss_inf", "grad_inf"], 1),
    (mlp, "adam", {"average": "phase", "lookahead_k": 3, "rho": 0.05}, False, ["grad_nan", "loss_nan"], 2),
    (bn_cnn, "adagrad", {"rho": 0.1, "adaptive": True}, False, ["input", "grad_nan"], 3),
    (bn_cnn, "rmsprop", {"recipe": "safe", "average": "ema"}, False, ["input", "loss_inf"], 4),
    (bn_cnn, "sgd", {"recipe": "thorough", "sam_lr_ceiling": 1.0}, True, ["loss_nan", "second_pass", "grad_inf"], 5),
]


@pytest.mark.filterwarnings("ignore:Detected call of")  # a skipped first step, in both runs
@pytest.mark.parametrize("factory, opt_name, overrides, closure, kinds, seed", FAULT_CASES,
                         ids=[f"{c[0].__name__}-{c[1]}-{'-'.join(f'{k}={v}' for k, v in c[2].items()) or 'default'}"
                              for c in FAULT_CASES])
def test_non_finite_steps_leave_no_trace(factory, opt_name, overrides, closure, kinds, seed):
    steps = 14
    x, y = data("img" if factory is bn_cnn else "vec", n=steps * 8)
    rng = random.Random(seed)
    # random steps, never two in a row more often than max_skips; step 0 hits calibration
    bad = sorted(rng.sample(range(steps), 5) + ([0] if seed % 2 else []))
    faults = {s: rng.choice(kinds) for s in bad}

    model, opt, sched = build(factory, opt_name, overrides)
    fit(model, opt, sched, x, y, steps, faults, drop=set(), closure=closure)
    assert opt.mechanism("guard").skipped == len(faults)
    got = everything(model, opt, sched)

    model, opt, sched = build(factory, opt_name, overrides)
    fit(model, opt, sched, x, y, steps, {}, drop=set(faults), closure=closure)
    assert opt.mechanism("guard").skipped == 0
    assert_same(got, everything(model, opt, sched))
    assert all(lr == lr and abs(lr) < INF for lr in got["lr"])


def test_accumulated_step_with_one_bad_micro_batch_is_skipped_whole():
    """Gradient accumulation: the buffers go back to before the step's *first* micro-batch."""
    x, y = data("img", n=64)

    def run(inject):
        model, opt, sched = build(bn_cnn, "sgd", {"rho": 0.1})
        for i in range(4):
            if i == 2 and not inject:
                continue
            opt.zero_grad()
            for j in range(2):
                xb = x[(2 * i + j) * 8:(2 * i + j + 1) * 8].clone()
                if i == 2 and j == 1:
                    xb[0, 0, 0, 0] = NAN
                (nn.functional.cross_entropy(model(xb), y[(2 * i + j) * 8:(2 * i + j + 1) * 8]) / 2).backward()
            opt.step()
        return everything(model, opt, sched)

    assert_same(run(inject=True), run(inject=False))


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_nan_first_batch_does_not_poison_calibration():
    """Calibration measures the first *finite* batch; a NaN first batch would divide by NaN."""
    x, y = data(n=64)
    model, opt, sched = build(mlp, "sgd", {})
    fit(model, opt, sched, x, y, 4, {0: "input"}, drop=set(), closure=False)
    assert opt.mechanism("calibrate").calibrated is False and opt.mechanism("guard").skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unfrozen_layer_is_guarded():
    """Parameters unfrozen after activate (fine-tuning) are checked, perturbed and averaged too."""
    x, y = data()
    torch.manual_seed(0)
    model = mlp()
    model[0].requires_grad_(False)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  average="ema")
    loss_fn = nn.functional.cross_entropy
    for i in range(4):
        if i == 2:
            model[0].requires_grad_(True)
        loss = loss_fn(model(x[:8]), y[:8])
        opt.zero_grad()
        loss.backward()
        if i == 3:
            model[0].weight.grad[0, 0] = NAN
        opt.step()
    assert opt.mechanism("guard").skipped == 1
    assert torch.isfinite(model[0].weight).all()
    assert len(opt.mechanism("average").tensors) == len(list(model.parameters())) + len(list(model.buffers()))


def test_divergence_error_after_max_skips_in_a_row_keeps_last_good_state():
    x, y = data("img")
    model, opt, sched = build(bn_cnn, "sgd", {"max_skips": 3, "rho": 0.1})
    fit(model, opt, sched, x, y, 3, {}, drop=set(), closure=False)
    good = training_state_dict(model)
    good_momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    loss_fn = nn.functional.cross_entropy
    xb = x[:8].clone()
    xb[0, 0, 0, 0] = NAN  # NaN reaches the BatchNorm statistics too
    for attempt in range(3):
        loss = loss_fn(model(xb), y[:8])
        opt.zero_grad()
        loss.backward()
        if attempt < 2:
            opt.step()
        else:
            with pytest.raises(deepopt.DivergenceError, match=r"skipped 3 optimizer steps in a row.*max_skips"):
                opt.step()
    assert opt.mechanism("guard").skipped == 3
    for p in model.parameters():  # the parameters themselves, not only state_dict()
        assert torch.isfinite(p).all()
    for k, v in training_state_dict(model).items():
        assert torch.equal(v, good[k]), k
    for p, m in zip(model.parameters(), good_momentum):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    # the user may lower the LR and carry on: one good step resets the count
    fit(model, opt, sched, x, y, 2, {}, drop=set(), closure=False)
    assert opt.mechanism("guard").consecutive == 0 and opt.steps == 5


# -- exceptions raised by the user's code ---------------------------------------------------
class Faulty(nn.Module):
    """A user's model whose forward raises ``fail`` once, half-way through."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(10, 16)
        self.second = nn.Linear(16, 3)
        self.fail: BaseException | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return self.second(h)


class UserError(Exception):
    pass


def one_iteration(model, opt, xb, yb, closure, point=None):
    """One iteration of the user's loop, raising at ``point``."""
    loss_fn = nn.functional.cross_entropy

    def user_loss(out):
        if point == "loss":
            raise UserError("bad loss")
        return loss_fn(out, yb)

    if point in ("forward", "closure1", "closure2"):
        model.fail = UserError("bad forward") if point != "closure2" else None
    elif point == "interrupt":
        model.fail = KeyboardInterrupt()
    if closure:
        calls = []

        def step_closure():
            calls.append(1)
            if point == "closure2" and len(calls) == 2:
                model.fail = UserError("bad second pass")
            opt.zero_grad()
            loss = user_loss(model(xb))
            loss.backward()
            return loss

        opt.step(step_closure)
        return
    out = model(xb)
    loss = user_loss(out)
    opt.zero_grad()
    handle = None
    if point == "backward":
        def boom(grad):
            raise UserError("bad backward hook")
        handle = model.first.weight.register_hook(boom)
    try:
        loss.backward()
    finally:
        if handle is not None:
            handle.remove()
    opt.step()


def run_faulty(overrides, closure, fail_at=None, point=None, steps=6, start=0, model_opt=None):
    x, y = data(n=80)
    if model_opt is None:
        torch.manual_seed(0)
        model = Faulty()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model, opt = deepopt.activate(model, opt, **legacy_kwargs(overrides))
    else:
        model, opt = model_opt
    for i in range(start, steps):
        if i == fail_at:
            return model, opt
        one_iteration(model, opt, x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8], closure)
    return model, opt


# points where deepopt regains control before the exception reaches the user
RESTORED_AT_ONCE = {"forward", "closure1", "closure2"}
EXCEPTION_CASES = [
    ({"rho": 0.3}, False, "forward"),
    ({"rho": 0.3}, False, "loss"),
    ({"rho": 0.3}, False, "backward"),
    ({"rho": 0.3}, False, "interrupt"),
    ({"rho": 0.3, "average": "ema"}, False, "forward"),
    ({"rho": 0.3, "average": "ema"}, False, "backward"),
    ({"rho": 0.3}, True, "closure1"),
    ({"recipe": "thorough", "sam_lr_ceiling": 1.0}, True, "closure1"),
    ({"recipe": "thorough", "sam_lr_ceiling": 1.0}, True, "closure2"),
    ({"recipe": "thorough", "sam_lr_ceiling": 1.0, "rho": 0.3, "average": "ema"}, True, "closure2"),
]


@pytest.mark.parametrize("overrides, closure, point", EXCEPTION_CASES,
                         ids=[f"{p}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for o, _, p in EXCEPTION_CASES])
def test_exception_in_user_code_leaves_training_weights(overrides, closure, point):
    fail_at, steps = 3, 6
    x, y = data(n=80)
    model, opt = run_faulty(overrides, closure, fail_at=fail_at)
    weights = training_state_dict(model)
    model.eval()
    evaluated = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    perturbed = {"rho": 0.3}.items() <= overrides.items()
    expected = KeyboardInterrupt if point == "interrupt" else UserError
    with pytest.raises(expected):
        one_iteration(model, opt, x[24:32], y[24:32], closure, point)

    # the parameter tensors themselves
    same = [torch.equal(p, weights[n]) for n, p in model.named_parameters()]
    if point in RESTORED_AT_ONCE or not perturbed:
        assert all(same)
    else:
        # Documented: between a training forward and step() the parameters hold w + e
        # (backward needs them); an exception in the loss or backward, or a KeyboardInterrupt
        # (torch runs always_call hooks only for Exception), returns to the user inside that
        # window. Every observation point restores them, state_dict() first of all.
        assert not all(same)
    for k, v in model.state_dict().items():  # what a user saves now: the evaluation weights
        assert torch.equal(v, evaluated[k]), k
    for k, v in training_state_dict(model).items():  # ... and the training weights, unperturbed
        assert torch.equal(v, weights[k]), k

    # ... checkpointed now and resumed in fresh objects ...
    # (deepcopy: torch's Optimizer.load_state_dict keeps the very tensors it is given)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    torch.manual_seed(1)
    fresh = Faulty()
    fresh, fresh_opt = deepopt.activate(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9),
                                        **legacy_kwargs(overrides))
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    run_faulty(overrides, closure, steps=steps, start=fail_at, model_opt=(fresh, fresh_opt))
    # ... or continued in place: both equal a run where the failed iteration never happened
    run_faulty(overrides, closure, steps=steps, start=fail_at, model_opt=(model, opt))
    reference, _ = run_faulty(overrides, closure, steps=steps)
    for state in (training_state_dict, lambda m: m.state_dict()):
        for name, ref in state(reference).items():
            assert torch.equal(state(model)[name], ref), name
            assert torch.equal(state(fresh)[name], ref), name


def test_exception_in_eval_forward_keeps_the_right_views():
    x, y = data(n=80)
    model, opt = run_faulty({"rho": 0.3, "average": "ema"}, False, steps=3)
    train_weights = training_state_dict(model)
    model(x[:8])  # a training forward: w + e shown
    model.eval()
    model.fail = UserError("bad eval forward")
    with pytest.raises(UserError), torch.no_grad():
        model(x[:8])
    for (_, p), a in zip(model.named_parameters(), opt.mechanism("average").tensors):
        assert torch.equal(p, a)  # evaluation weights, never w + e
    model.train()
    for k, v in training_state_dict(model).items():
        assert torch.equal(v, train_weights[k]), k
