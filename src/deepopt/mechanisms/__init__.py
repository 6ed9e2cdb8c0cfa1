"""The training mechanisms, one module each, and the registry that composes them.

Each module holds a pure function on tensors plus a thin stateful class following
:class:`~deepopt.mechanisms.base.Mechanism`. Mechanisms never import each other;
:data:`REGISTRY` lists them in the order their events run, and :func:`compose` builds the
list an activation uses. Adding a mechanism is one module plus one line here.

Why this order: calibration measures the clean first batch before anything else acts;
Lookahead's sync comes before the average folds the weights in; a restart from the average
happens before the guard snapshots the buffers; the average's evaluation weights come before
dropout matching rescales them; the perturbations are computed at the clean weights.

Example:
    >>> from deepopt import RECIPES
    >>> [m.name for m in compose(RECIPES["default"])]
    ['calibrate', 'average', 'dropout_match', 'guard']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .average import WeightAverage
from .base import Mechanism
from .budget import BudgetSAM
from .calibrate import Calibration
from .dropout_match import DropoutMatch
from .guard import DivergenceGuard
from .lookahead import Lookahead
from .noise import WeightNoise
from .perturb import MomentumPerturbation
from .sam import TwoPassSAM
from .switch import SwitchAverage

__all__ = ["REGISTRY", "VARIANTS", "compose", "upgrade_state", "Mechanism"]

REGISTRY: tuple[type[Mechanism], ...] = (
    Calibration,
    Lookahead,
    WeightAverage,
    DropoutMatch,
    DivergenceGuard,
    MomentumPerturbation,
    WeightNoise,
    BudgetSAM,
)

#: Subclasses that take a registered mechanism's place (same name, same slot in the order)
#: when passed in ``mechanisms=[...]``; the conformance tests check them as registered ones.
VARIANTS: tuple[type[Mechanism], ...] = (SwitchAverage, TwoPassSAM)


def compose(settings: Any, extra: Iterable[Mechanism] = ()) -> list[Mechanism]:
    """The mechanisms ``settings`` ask for, each replaced by an ``extra`` one of its name.

    ``extra`` mechanisms of other names join in registry order (unregistered ones last).

    Example:
        >>> from deepopt import RECIPES
        >>> [m.name for m in compose(RECIPES["safe"], [Lookahead(k=5)])]
        ['calibrate', 'lookahead', 'guard']
    """
    given: dict[str, Mechanism] = {}
    for m in extra:
        if not isinstance(m, Mechanism):
            raise TypeError(
                f"mechanisms must hold deepopt Mechanism objects, got {type(m).__name__}; e.g. "
                "mechanisms=[deepopt.experimental.Lookahead(k=5)]."
            )
        if m.name in given:
            raise ValueError(f"mechanisms holds two mechanisms named {m.name!r}; pass one of each.")
        given[m.name] = m
    chosen = [given.pop(cls.name, None) or cls.from_settings(settings) for cls in REGISTRY]
    return [m for m in chosen if m is not None] + list(given.values())


def upgrade_state(deep: dict) -> dict:
    """A ``"deepopt"`` state entry in today's layout (version 1 kept one key per mechanism)."""
    if deep.get("version") != 1:
        return deep
    return {
        "version": 2, "steps": deep["steps"], "max_lr": deep["max_lr"], "train_values": deep["train_values"],
        "mechanisms": {
            "calibrate": {"calibrated": deep["calibrated"]},
            "lookahead": deep.get("lookahead"),
            "average": None if deep["average"] is None else {**deep["average"], "last_lr": deep.get("last_lr")},
            "dropout_match": deep.get("dropout_match"),
            "guard": deep["guard"],
            "perturb": {"grads": deep["last_grads"]},
            "noise": deep.get("noise"),
            "sam": deep.get("looksam") or {},
        },
    }
