"""Every registered mechanism, alone, passes the same checks: a new one is tested by registering it.

For each class in :data:`deepopt.mechanisms.REGISTRY` and ``VARIANTS`` (its ``example()`` instance, on top of
the ``safe`` recipe's calibration and guard):

* its facts agree with the events it overrides, and its name is its own;
* ``enabled=False`` is the classical loop, bit for bit;
* a checkpoint (taken in eval mode) resumes onto the uninterrupted trajectory, bit for bit;
* its state survives ``torch.save``/``torch.load(weights_only=True)``;
* a NaN loss and an inf gradient leave no trace: the run equals one that never saw those batches;
* an exception in the model's forward leaves the training weights in the model and in what
  ``state_dict()`` saves, and training goes on;
* one mechanism object serves one activation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepopt
from conftest import assert_equal, roundtrip
from deepopt.checkpoint import training_state_dict
from deepopt.mechanisms import REGISTRY, VARIANTS
from deepopt.mechanisms.base import EVENTS, Mechanism

NAMES = [cls.name for cls in REGISTRY]
CHECKED = REGISTRY + VARIANTS
IDS = NAMES + [cls.__name__ for cls in VARIANTS]


def net() -> nn.Module:
    # BatchNorm buffers, dropout (RNG) and a bias: everything a mechanism may have to keep
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


class Flaky(nn.Module):
    """``net()`` whose forward raises once, when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.body = net()
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.fail:
            self.fail = False
            raise RuntimeError("user code failed")
        return out


def batches(n: int = 14) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * 8, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n * 8,), generator=g)
    return [(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]) for i in range(n)]


def build(cls: type[Mechanism], enabled: bool = True, flaky: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = Flaky() if flaky else net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.5)
    model, opt = deepopt.activate(model, opt, recipe="safe", enabled=enabled, mechanisms=[cls.example()])
    return model, opt, sched


def step(cls, model, opt, sched, xb, yb, fault: str | None = None) -> None:
    """One iteration of the user's loop (``step(closure)`` for a mechanism that needs one)."""
    model.train()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        if fault == "loss_nan":
            loss = loss * float("nan")
        loss.backward()
        if fault == "grad_inf":
            with torch.no_grad():
                next(model.parameters()).grad.view(-1)[0] = float("inf")
        return loss

    if cls.needs_closure:
        opt.step(closure)
    else:
        closure()
        opt.step()
    opt.zero_grad()
    sched.step()


def run(cls, model, opt, sched, data, start: int, stop: int, faults: dict | None = None) -> None:
    for i in range(start, stop):
        fault = (faults or {}).get(i)
        rng = torch.get_rng_state()
        step(cls, model, opt, sched, *data[i], fault=fault)
        if fault:  # its dropout masks aside (the reference run never draws them), no trace is left
            torch.set_rng_state(rng)
        if i % 4 == 3:  # evaluate now and then, as users do
            model.eval()
            with torch.no_grad():
                model(data[i][0])


def views(model) -> dict[str, torch.Tensor]:
    model.train()
    out = {f"train.{k}": v for k, v in training_state_dict(model).items()}
    model.eval()
    out.update({f"eval.{k}": v.clone() for k, v in model.state_dict().items()})
    model.train()
    return out


@pytest.fixture(params=CHECKED, ids=IDS)
def cls(request) -> type[Mechanism]:
    return request.param


def test_registry_names_are_unique_and_facts_match_the_events_overridden(cls):
    assert len(set(NAMES)) == len(NAMES) and cls.name
    overrides = {e for e in EVENTS if getattr(cls, e) is not getattr(Mechanism, e)}
    m = cls.example()
    assert bool(m.perturbs) == ("perturbation" in overrides), cls
    assert bool(m.has_eval_view) <= ("show_eval" in overrides), cls
    assert bool(m.needs_closure) <= ("claims_step" in overrides and cls.run_step is not Mechanism.run_step), cls
    assert m.label and m.describe() and repr(m).startswith(type(m).__name__)
    assert roundtrip(m.state_dict()) is not None  # weights_only-safe


def test_disabled_is_the_classical_loop_bit_for_bit(cls):
    data = batches()
    torch.manual_seed(0)
    plain = net()
    base = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(base, 4, gamma=0.5)
    model, opt, sched2 = build(cls, enabled=False)
    assert opt.__class__ is torch.optim.SGD and not model._forward_pre_hooks
    torch.manual_seed(1)
    run(cls, plain, base, sched, data, 0, 10)
    torch.manual_seed(1)
    run(cls, model, opt, sched2, data, 0, 10)
    assert_equal(views(plain), views(model))


def test_checkpoint_in_eval_mode_resumes_the_uninterrupted_trajectory(cls):
    data = batches()
    model, opt, sched = build(cls)
    assert opt.mechanism(cls.name) is not None, "the example must act on the test net"
    torch.manual_seed(1)
    run(cls, model, opt, sched, data, 0, 6)
    model.eval()
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                      "rng": torch.get_rng_state()})
    run(cls, model, opt, sched, data, 6, 12)
    fresh, fresh_opt, fresh_sched = build(cls, seed=7)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    fresh_sched.load_state_dict(ckpt["sched"])
    torch.set_rng_state(ckpt["rng"])
    run(cls, fresh, fresh_opt, fresh_sched, data, 6, 12)
    assert_equal(views(fresh), views(model))
    a, b = opt.state_dict()["deepopt"], fresh_opt.state_dict()["deepopt"]
    assert a["steps"] == b["steps"] == 12
    assert str(a["mechanisms"][cls.name]) == str(b["mechanisms"][cls.name])


def test_non_finite_steps_leave_no_trace(cls):
    data = batches()
    faults = {3: "loss_nan", 7: "grad_inf"}
    model, opt, sched = build(cls)
    torch.manual_seed(1)
    run(cls, model, opt, sched, data, 0, 10, faults)
    ref, ref_opt, ref_sched = build(cls)
    torch.manual_seed(1)
    for i in range(10):
        if i in faults:  # never seen: the schedule still counts the iteration
            ref_sched.step()
            continue
        step(cls, ref, ref_opt, ref_sched, *data[i])
        if i % 4 == 3:
            ref.eval()
            with torch.no_grad():
                ref(data[i][0])
    assert opt.mechanism("guard").skipped == 2
    if cls.name != "noise":  # the noise draws of the skipped steps move its own generator
        assert_equal(views(model), views(ref))
    for v in views(model).values():
        assert torch.isfinite(v.float()).all()


def test_exception_in_forward_leaves_the_training_weights(cls):
    data = batches()
    model, opt, sched = build(cls, flaky=True)
    torch.manual_seed(1)
    run(cls, model, opt, sched, data, 0, 5)
    before = {k: v.clone() for k, v in model.named_parameters()}
    model.fail = True
    with pytest.raises(RuntimeError, match="user code failed"):
        step(cls, model, opt, sched, *data[5])
    trained = training_state_dict(model)  # what a resume continues from, right after the exception
    assert_equal({k: trained[k] for k in before}, before)
    assert_equal(dict(model.named_parameters()), before)  # no perturbation left in the tensors
    run(cls, model, opt, sched, data, 5, 9)  # and training goes on
    assert opt.steps == 9
    for v in views(model).values():
        assert torch.isfinite(v.float()).all()


def test_one_mechanism_object_serves_one_activation(cls):
    m = cls.example()
    model = net()
    deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), mechanisms=[m])
    other = net()
    with pytest.raises(ValueError, match="already serves another activation"):
        deepopt.activate(other, torch.optim.SGD(other.parameters(), lr=0.1), mechanisms=[m])
    with pytest.raises(ValueError, match="two mechanisms named"):
        deepopt.activate(other, torch.optim.SGD(other.parameters(), lr=0.1),
                         mechanisms=[cls.example(), cls.example()])
