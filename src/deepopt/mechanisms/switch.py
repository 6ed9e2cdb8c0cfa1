"""Switch EMA (Li et al. 2024): training continues from the average, periodically.

The average of :mod:`.average` is kept as usual and is what ``eval()`` shows; in
addition, every so often the training weights are set to it, so the optimizer
carries on from the smoother point (the optimizer's own state, e.g. momentum, is
kept). Li et al. switch once per epoch; ``activate`` knows no epoch, so the period is
tied to the averaging window instead: a switch every ``period`` times the average's
lag behind the iterate (:func:`lag`). A period near the lag stalls a net that is
still learning (the switch throws back most of the progress made since the last one);
a long period leaves the run as it was.

Example:
    >>> import torch
    >>> from deepopt.mechanisms.switch import lag
    >>> lag("power", steps=1900, gamma=17.0), round(lag("ema", steps=1900, decay=0.999))
    (100.0, 1000)
"""

from __future__ import annotations

from typing import Any

import torch

from .average import WeightAverage

__all__ = ["lag", "SwitchAverage"]


def lag(kind: str, steps: int, gamma: float = 0.0, decay: float = 0.0) -> float:
    """How many steps an average of ``steps`` iterates lags behind the last one (its mean age).

    Power-function EMA: iterate ``tau`` weighs ``tau ** gamma``, mean age ``steps / (gamma + 2)``;
    EMA: ``1 / (1 - decay)``; a uniform average: ``steps / 2``.

    Example:
        >>> lag("phase", steps=100)
        50.0
    """
    if kind == "power":
        return steps / (gamma + 2.0)
    if kind == "ema":
        return 1.0 / (1.0 - decay)
    return steps / 2.0


class SwitchAverage(WeightAverage):
    """A :class:`~deepopt.mechanisms.average.WeightAverage` that training switches to periodically.

    Replaces the recipe's average (same name): ``activate(..., mechanisms=[SwitchAverage(4)])``.

    Args:
        period: switch every ``period`` times the average's lag (:func:`lag`), at least
            every ``min_steps`` steps; > 0.
        min_steps: the shortest period in steps, so that the first steps, whose lag is a few
            steps, are not switched every step.
        **average: the average's arguments (:class:`WeightAverage`); by default the default
            recipe's: power-function EMA, width 0.05, window following the LR, folded every
            4th step.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model, opt = deepopt.activate(model, opt, mechanisms=[SwitchAverage(period=8)])
        >>> opt.mechanism("average").period
        8.0
    """

    def __init__(self, period: float = 8.0, min_steps: int = 50, **average: Any) -> None:
        if isinstance(period, bool) or not isinstance(period, (int, float)) or not period > 0:
            raise ValueError(f"period={period!r} is invalid: it must be a number > 0 (times the average's lag), "
                             "e.g. 8.")
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 1:
            raise ValueError(f"min_steps={min_steps!r} is invalid: it must be an integer >= 1, e.g. 50.")
        settings = {"kind": "power", "width": 0.05, "follows_lr": True, "every": 4, **average}
        super().__init__(**settings)
        self.period = float(period)
        self.min_steps = min_steps
        self.since = 0  # steps since the last switch (or the start)
        self.switches = 0

    @classmethod
    def example(cls) -> SwitchAverage:
        return cls(period=1.0, min_steps=3, every=1)

    def due(self, steps: int) -> bool:
        """Whether the training weights switch to the average now, ``steps`` steps into the run."""
        if self.evaluated() is None or self.since < self.min_steps:  # none yet, or it is the iterate
            return False
        return self.since >= self.period * lag(self.kind, steps, self.gamma, self.decay)

    def on_train_forward(self, opt: Any, module: Any, args: tuple, kwargs: dict) -> None:
        # Before the forward, so the step's gradient is taken at the switched weights and the
        # guard's snapshot of this step holds them.
        if not self.due(opt.steps):
            return
        targets, average = opt.eval_targets(), self.evaluated()
        if len(targets) != len(average):
            return
        opt.show("train")
        with torch.no_grad():
            torch._foreach_copy_(targets, average)
        self.since, self.switches = 0, self.switches + 1

    def after_update(self, opt: Any) -> None:
        self.since += 1
        super().after_update(opt)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "since": self.since, "switches": self.switches}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.since, self.switches = int(state["since"]), int(state["switches"])

    @property
    def label(self) -> str:
        return "switch EMA"

    def describe(self) -> str:
        return f"{super().describe()}; training switched to it {self.switches} times"

    def __repr__(self) -> str:
        return f"SwitchAverage(period={self.period}, min_steps={self.min_steps}, {super().__repr__()})"
