"""A compute budget spent on two-pass SAM late in training: ``activate(..., budget=1.5)``.

``budget`` is the most compute deepopt may spend relative to the classical run. A two-pass
step costs up to :data:`TWO_PASS_COST` plain ones (2.04-2.25x measured, BENCHMARKS.md
section 2), so a budget ``b`` buys two passes on a share ``f = (b - 1) / 1.25`` of the
steps: 0.2 at 1.25, 0.4 at 1.5, 0.8 at 2, every step at 2.25. Where they go (Zhou et al., ICLR 2025: SAM in the last part of training
finds the flat minima SAM throughout does; BENCHMARKS.md, section 5, measures it):

* the run announces its end (``optimizer.total_steps``, or a scheduler with a length,
  :mod:`deepopt.horizon`): the last ``f`` of the run;
* budget 2.25: every step;
* it does not (step drops, a plateau scheduler, a hand-set LR): every step once the LR has
  fallen to a tenth of its peak, which finds the drops of a ``MultiStepLR``; none at a
  constant LR.

Either way a step takes two passes only if the two-pass steps, this one included, stay
within ``f`` times the steps, so the cost stays within the budget at every point of the run,
whatever its length. The radius is Foret et al.'s CIFAR value, ramped over the first 1,000
steps as the ``thorough`` recipe's always was.

Example:
    >>> import torch, deepopt
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> model, opt = deepopt.activate(model, opt, budget=1.5)
    >>> opt.mechanism("sam")
    BudgetSAM(budget=1.5, rho=0.05, warmup=1000)
    >>> base = deepopt.deactivate(model, opt)  # removes what it installed
"""

from __future__ import annotations

from typing import Any

from ..horizon import Horizon
from .sam import TwoPassSAM

__all__ = ["BudgetSAM"]

#: Where no end is announced, two passes once the LR is at most this fraction of its peak.
LOW_LR = 0.1
#: What a two-pass step costs in plain steps, at most (BENCHMARKS.md, section 2).
TWO_PASS_COST = 2.25


class BudgetSAM(TwoPassSAM):
    """Two-pass SAM on the last :attr:`share` of the run (see the module docstring).

    Args:
        budget: the most compute relative to the classical run, in ``(1, two_pass_cost]``.
        rho: the SAM radius. warmup: steps over which the radius ramps up from 0.
        two_pass_cost: what a two-pass step is counted as, in plain steps (experimental;
            2.0 is the first accounting, by passes, that the zoo's first budget rows ran with).
        adaptive: ASAM's scale-adaptive radius (experimental; BENCHMARKS.md, section 5.2).
    """

    def __init__(self, budget: float, rho: float = 0.05, warmup: int = 1000,
                 two_pass_cost: float = TWO_PASS_COST, adaptive: bool = False) -> None:
        if not two_pass_cost > 1.0:
            raise ValueError(f"two_pass_cost={two_pass_cost!r} is invalid: it must be a number > 1, e.g. 2.25.")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 1.0 < budget <= two_pass_cost:
            raise ValueError(f"budget={budget!r} is invalid: BudgetSAM needs a number in (1, {two_pass_cost:g}].")
        super().__init__(rho, warmup, adaptive=adaptive, lr_range=(0.0, LOW_LR))
        self.budget, self.two_pass_cost = float(budget), float(two_pass_cost)
        self.horizon = Horizon()

    @classmethod
    def from_settings(cls, settings: Any) -> BudgetSAM | None:
        return cls(settings.budget) if settings.budget > 1.0 else None

    @classmethod
    def example(cls) -> BudgetSAM:
        return cls(TWO_PASS_COST, warmup=0)

    @property
    def share(self) -> float:
        """The share of the steps that may take two passes."""
        return (self.budget - 1.0) / (self.two_pass_cost - 1.0)

    def in_window(self, opt: Any) -> bool:
        """Whether this step takes two passes (the module docstring says when)."""
        share = self.share
        if self.two_pass_steps + 1 > share * (opt.steps + 1) + 1e-9:
            return False  # the cost so far would pass the budget
        if share >= 1.0 - 1e-9:
            return True  # every step
        done = self.horizon.progress(opt, opt.steps, getattr(opt, "total_steps", None))
        if done is None:
            return super().in_window(opt)
        return done >= 1.0 - share - 1e-9

    def when(self, opt: Any) -> str:
        done = self.horizon.progress(opt, opt.steps, getattr(opt, "total_steps", None))
        share = f"{self.share:.0%}"
        if self.share >= 1.0 - 1e-9:
            return "at every step"
        if done is not None:
            return f"on the last {share} of the run (its length is announced)"
        return (f"once the LR has fallen to {LOW_LR:g} of its peak, on at most {share} of the steps "
                "(no scheduler announces the run's length)")

    @property
    def label(self) -> str:
        return f"budget={self.budget:g} (two-pass {'ASAM' if self.adaptive else 'SAM'}, rho {self.rho:g})"

    def __repr__(self) -> str:
        cost = "" if self.two_pass_cost == TWO_PASS_COST else f", two_pass_cost={self.two_pass_cost:g}"
        cost += ", adaptive=True" if self.adaptive else ""
        return f"BudgetSAM(budget={self.budget:g}, rho={self.rho:g}, warmup={self.warmup}{cost})"
