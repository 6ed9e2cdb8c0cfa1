"""The one-line messages the optimizer wrapper says (through :func:`deepopt.hooks.say`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .hooks import say

if TYPE_CHECKING:
    from .mechanisms.base import Mechanism
    from .optimizer import DeepOptimizer

__all__ = ["without_one_pass", "tell_if_idle"]


def without_one_pass(mechanisms: Sequence[Mechanism], optimizer: torch.optim.Optimizer) -> list[Mechanism]:
    """``mechanisms`` less those that need one forward/backward per update, saying which are off."""
    off = [m for m in mechanisms if m.needs_one_pass]
    if off:
        names = ", ".join(m.label for m in off)
        say(f"{names} {'is' if len(off) == 1 else 'are'} off for {type(optimizer).__name__}: its "
            "step(closure) evaluates the closure itself (possibly several times), so deepopt cannot "
            "check or perturb one forward/backward per update; the other mechanisms act.")
    return [m for m in mechanisms if not m.needs_one_pass]


def tell_if_idle(opt: DeepOptimizer) -> bool:
    """At an evaluation, say if no mechanism has changed this run (``Mechanism.idle``); whether it was said."""
    reasons = [m.idle(opt) for m in opt.mechanisms]
    if any(r is None for r in reasons):
        return False
    why = "; ".join(r for r in reasons if r) or "no mechanism acts on this model and optimizer"
    steps = f"{opt.steps} step{'s' if opt.steps != 1 else ''}"
    say(f"after {steps} this run trains and evaluates as it would without deepopt: {why}.")
    return True
