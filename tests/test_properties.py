"""Property-based: random combinations of optimizer, param groups, recipe, overrides, a registered
mechanism added through ``mechanisms=[...]`` (every one in REGISTRY is drawn), model
family and dtype either train with finite weights or are rejected up front naming the argument.

On every combination that trains:

* ``enabled=False`` is bit-identical to the classical loop;
* ``model.eval()`` shows the evaluation weights (the average, else the training weights),
  never the perturbed ones, even right after a training forward;
* saving both state dicts (``torch.save``/``torch.load(weights_only=True)``) and loading
  them into a freshly built and activated model and optimizer continues bit for bit.

The number of cases is fixed (``derandomize=True``) and printed at the end of the run
(``pytest tests/test_properties.py -s``); docs/guarantees.md states it.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import deepopt
from conftest import LSTMNet, TransformerNet, assert_equal, bn_cnn, data, roundtrip
from deepopt.checkpoint import training_state_dict
from deepopt.experimental import legacy_kwargs
from deepopt.mechanisms import REGISTRY
from deepopt.mechanisms.dropout_match import weighted_layers
from deepopt.recipes import MOVED

EXAMPLES_PER_FAMILY = 60  # 300 cases over the five families; the suite stays under 10 minutes on 2 cores
STEPS, SAVE_AT = 4, 2


def plain_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def _bf16_supported(family: str) -> bool:
    """Whether this CPU runs ``family`` under bfloat16 autocast: oneDNN has no bf16 LSTM
    kernel without AVX-512 (torch raises "could not create a primitive descriptor")."""
    factory, kind = FAMILIES[family]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            factory()(data(kind, n=2)[0])
    except RuntimeError:
        return False
    return True


FAMILIES = {"mlp": (mlp, "vec"), "cnn": (plain_cnn, "img"), "bn_cnn": (bn_cnn, "img"),
            "lstm": (LSTMNet, "seq"), "transformer": (TransformerNet, "seq")}

BF16 = {family: _bf16_supported(family) for family in FAMILIES}

OPTIMIZERS = {
    "sgd": lambda g, lr: torch.optim.SGD(g, lr=lr),
    "sgd_momentum": lambda g, lr: torch.optim.SGD(g, lr=lr, momentum=0.9),
    "sgd_nesterov": lambda g, lr: torch.optim.SGD(g, lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda g, lr: torch.optim.Adam(g, lr=lr * 0.1),
    "adamw": lambda g, lr: torch.optim.AdamW(g, lr=lr * 0.1, weight_decay=1e-2),
    "rmsprop": lambda g, lr: torch.optim.RMSprop(g, lr=lr * 0.02),
    "rmsprop_momentum": lambda g, lr: torch.optim.RMSprop(g, lr=lr * 0.02, momentum=0.5),
    "adagrad": lambda g, lr: torch.optim.Adagrad(g, lr=lr),
}

# Overrides a user may pass: valid values, and invalid ones that must be refused up front.
VALID = {
    "rho": [0.0, 0.02, 0.2],
    "budget": [1.0, 1.25, 2.0],
    "ascent": [False, True],
    "adaptive": [False, True],
    "rho_follows_lr": [False, True],
    "average": [None, "ema", "phase"],
    "ema_decay": [0.0, 0.5, 0.999],
    "lookahead_k": [0, 1, 3],
    "noise": [0.0, 0.1],
    "average_every": [1, 3],
    "sam_every": [1, 3],
    "sam_warmup": [0, 3],
    "sam_lr_fraction": [0.0, 0.5, 1.0],
    "sam_lr_ceiling": [0.05, 0.5, 1.0],
    "guard": [False, True],
}
INVALID = {
    "rho": [-0.1, math.nan, math.inf, "0.1"],
    "budget": [0.5, 2.5, math.nan, "1.5"],
    "ema_decay": [1.0, -0.5, math.nan],
    "average": ["swa", "EMA"],
    "lookahead_k": [-1, 2.5, True],
    "lookahead_alpha": [0.0, 1.5],
    "noise": [-0.1, math.inf],
    "sam_every": [0, 1.5, False],
    "sam_warmup": [-1, 2.5, True],
    "sam_reuse": [math.nan],
    "sam_lr_fraction": [-0.1, 1.5, math.nan],
    "sam_lr_ceiling": [0.0, 1.5, math.nan],
    "average_restart": ["yes"],
    "average_every": [0, 2.0],
    "guard": ["yes", 1, None],
    "ascent": ["no"],
    "max_skips": [0],
    "rhoo": [0.1],  # a typo
    "recipe": ["fast"],
}


class Unused(nn.Module):
    """The user's net with an extra layer that forward never uses (its grad stays None)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.spare = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

REGISTERED = {cls.name: cls for cls in REGISTRY}  # every mechanism is drawn, as registered


@dataclass(frozen=True)
class Case:
    family: str
    optimizer: str
    groups: str  # "one", "two" (different lr / weight decay)
    frozen: bool  # first parameter frozen, still in the optimizer
    unused: bool
    recipe: str
    overrides: tuple
    closure: bool
    bf16: bool
    invalid: str | None  # the argument that must be named in the error
    extra: str | None = None  # a registered mechanism's example() added through mechanisms=[...]

    def activate_kwargs(self) -> dict:
        kw = legacy_kwargs(dict(self.overrides))
        mechanisms = kw.setdefault("mechanisms", [])
        if self.extra is not None and self.extra not in {m.name for m in mechanisms}:
            mechanisms.append(REGISTERED[self.extra].example())
        return kw

    def build(self, seed: int = 0, enabled: bool | None = True):
        factory, _ = FAMILIES[self.family]
        torch.manual_seed(seed)
        model = factory()
        if self.unused:
            model = Unused(model)
        params = list(model.parameters())
        if self.frozen:
            params[0].requires_grad_(False)
        lr = 0.05
        if self.groups == "one":
            groups = [{"params": params}]
        else:
            half = len(params) // 2
            groups = [{"params": params[:half]}, {"params": params[half:], "lr": lr * 0.3, "weight_decay": 1e-2}]
        opt = OPTIMIZERS[self.optimizer](groups, lr)
        if enabled is not None:
            model, opt = deepopt.activate(model, opt, recipe=self.recipe, enabled=enabled,
                                          **self.activate_kwargs())
        return model, opt


@st.composite
def cases(draw, family: str) -> Case:
    # Hypothesis draws the seed; the combination is drawn from it uniformly (Hypothesis's own
    # choices favour the first option of every list, which would leave whole corners untested).
    rng = random.Random(f"{family}-{draw(st.integers(0, 2**32 - 1))}")
    overrides = {k: rng.choice(v) for k, v in VALID.items() if rng.random() < 0.5}
    if overrides.get("sam_lr_fraction", 0.0) > overrides.get("sam_lr_ceiling", 1.0):
        del overrides["sam_lr_ceiling"]  # an empty SAM LR range is refused (tests/test_looksam.py)
    recipe = rng.choice(["default", "safe", "thorough"])
    invalid = None
    if rng.random() < 0.125:  # now and then: a bad argument
        invalid = rng.choice(sorted(INVALID))
        value = rng.choice(INVALID[invalid])
        if invalid == "recipe":
            recipe = value
        else:
            overrides[invalid] = value
    return Case(
        family=family,
        optimizer=rng.choice(sorted(OPTIMIZERS)),
        groups=rng.choice(["one", "two"]),
        frozen=rng.random() < 0.5,
        unused=rng.random() < 0.5,
        recipe=recipe,
        overrides=tuple(sorted(overrides.items())),
        closure=rng.random() < 0.5,
        bf16=rng.random() < 0.5 and BF16[family],
        invalid=invalid,
        extra=rng.choice([None, *sorted(REGISTERED)]),
    )


def train(case: Case, model, opt, start: int, stop: int) -> None:
    """The user's loop (optionally step(closure), optionally under bfloat16 autocast)."""
    _, kind = FAMILIES[case.family]
    x, y = data(kind, n=8 * STEPS)
    loss_fn = nn.functional.cross_entropy

    def loss_of(xb, yb):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.bf16):
            return loss_fn(model(xb).float(), yb)

    for i in range(start, stop):
        model.train()
        xb, yb = x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]
        if case.closure:
            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = loss_of(xb, yb)
                loss.backward()
                return loss
            opt.step(closure)
        else:
            loss = loss_of(xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()


def weights(model) -> dict[str, torch.Tensor]:
    return training_state_dict(model)


def check(case: Case) -> str:
    if case.invalid is not None:
        model, opt = case.build(enabled=None)
        try:
            # the valid knobs that moved to deepopt.experimental as mechanisms; the invalid one as given
            overrides = dict(case.overrides)
            bad = {case.invalid: overrides.pop(case.invalid)} if case.invalid in overrides else {}
            deepopt.activate(model, opt, recipe=case.recipe, **legacy_kwargs(overrides), **bad)
        except (TypeError, ValueError) as e:
            message = str(e)
            if case.invalid in MOVED:  # refused with where it went, whatever its value
                assert case.invalid in message.split(" moved to ")[0], message
            else:
                assert f"{case.invalid}=" in message or f"override(s) {case.invalid}" in message, message
            # refused up front: nothing was attached
            assert not model._forward_pre_hooks and getattr(opt, "_deepopt_wrapper", None) is None
            return "rejected"
        raise AssertionError(f"{case.invalid} was accepted: {case}")

    # enabled=False is the classical loop, bit for bit (also for bad-but-unused settings)
    runs = []
    for enabled in (None, False):
        model, opt = case.build(enabled=enabled)
        torch.manual_seed(1)
        train(case, model, opt, 0, STEPS)
        runs.append(weights(model))
    assert_equal(*runs)

    # activated: finite weights; a checkpoint at SAVE_AT continues bit for bit in fresh objects
    model, opt = case.build()
    torch.manual_seed(1)
    train(case, model, opt, 0, SAVE_AT)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()})
    train(case, model, opt, SAVE_AT, STEPS)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    fresh, fresh_opt = case.build(seed=7)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    train(case, fresh, fresh_opt, SAVE_AT, STEPS)
    assert_equal(weights(fresh), weights(model))

    # eval shows the evaluation weights, never w + e, even right after a training forward
    _, kind = FAMILIES[case.family]
    x, _ = data(kind, n=8)
    trained = training_state_dict(model)
    train_view = {n: trained[n] for n, _ in model.named_parameters()}
    model.train()
    model(x)  # perturbed now, if the recipe perturbs
    model.eval()
    with torch.no_grad():
        model(x)
    averaged = {}
    average = opt.mechanism("average")
    if average is not None and average.evaluated() is not None:  # None: the average is the iterate
        averaged = {id(p): a for p, a in zip(opt.params(), average.evaluated())}
    factors = {}  # dropout-matched evaluation, where its gate kept the rescaled weights
    if opt.mechanism("dropout_match") is not None and opt.mechanism("dropout_match").keep:
        layers = weighted_layers(model, {id(p) for p in opt.params()})
        factors = {id(q): s for layer, s in zip(layers, opt.mechanism("dropout_match").scales)
                   for q in layer.parameters(recurse=False)}
    for name, p in model.named_parameters():
        expected = averaged.get(id(p), train_view[name])
        assert torch.equal(p, expected * factors[id(p)] if id(p) in factors else expected), name
    model.train()
    state = training_state_dict(model)
    assert_equal({n: state[n] for n in train_view}, train_view)
    return "trained"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_combinations_train_or_are_rejected(family):
    counts: Counter = Counter()

    @settings(max_examples=EXAMPLES_PER_FAMILY, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases(family))
    def run(case: Case) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns on some random combinations, by design
            outcome = check(case)
        event(outcome)
        counts[outcome] += 1
        for key, value in case.overrides:
            counts[f"{key}={value}"] += 1
        counts[case.optimizer] += 1
        counts["bf16"] += case.bf16

    run()
    total = counts["trained"] + counts["rejected"]
    print(f"\nproperty cases [{family}]: {total} ({counts['trained']} trained, {counts['rejected']} rejected); "
          f"{dict(sorted(counts.items()))}")
    assert total >= EXAMPLES_PER_FAMILY and counts["trained"] > counts["rejected"]
