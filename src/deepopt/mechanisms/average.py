"""Weight averaging: which weights are evaluated and saved.

The optimizer keeps training the raw weights ``w``; an average ``a`` of the
trajectory is kept beside them and is what ``model.eval()`` computes with.

* ``"ema"``: exponential moving average with decay warm-up (as in timm's ModelEma):
  ``d_t = min(decay, (1 + t) / (10 + t))``, ``a <- d_t a + (1 - d_t) w``.
* ``"power"``: power-function EMA (Karras et al. 2024, EDM2): iterate ``tau`` weighs
  ``tau ** gamma``, a window that is a fixed fraction (``width``, ``sigma_rel``) of the
  steps taken so far, so it needs no horizon (which ``activate`` cannot know).
* ``"phase"``: a uniform (SWA-style, Izmailov et al. 2018) average that restarts
  whenever the learning rate changes, so it averages within the current LR phase
  and never mixes the weights of a high-LR phase into a low-LR one.

Floating-point buffers (BatchNorm running statistics) are averaged the same way, so
the evaluation weights come with statistics that belong to them; integer buffers
(``num_batches_tracked``) are copied.

Under FSDP2 (``fully_shard``) the average is kept per local shard (the optimizer hands
over each parameter's rank-local part), so it costs one shard's copy per rank, and the
evaluation view is swapped shard by shard, without gathering the full weights.

Example:
    >>> import torch
    >>> from deepopt.mechanisms.average import ema_decay, average_
    >>> a = [torch.zeros(2)]
    >>> average_(a, [torch.ones(2)], weight=1 - ema_decay(0, 0.999))
    >>> a[0]
    tensor([0.9000, 0.9000])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Mechanism

__all__ = ["ema_decay", "power_gamma", "power_weight", "power_weight_steps", "lr_window", "average_", "WeightAverage"]


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """Decay for update number ``step`` (0-based): ``min(decay, (1+step)/(10+step))``.

    The warm-up keeps the first averages from being dominated by the initial weights.

    Example:
        >>> ema_decay(0, 0.999), ema_decay(10**6, 0.999)
        (0.1, 0.999)
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


def power_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of a power-function EMA of relative width ``sigma_rel``.

    Karras et al. 2024 (EDM2, eq. 3): the average weights iterate ``tau`` by
    ``tau ** gamma``, a window whose standard deviation is ``sigma_rel`` times the
    steps taken so far, whatever the run's length. Solves
    ``sigma_rel**2 = (gamma + 1) / ((gamma + 2)**2 (gamma + 3))``.

    Example:
        >>> round(power_gamma(0.10), 2), round(power_gamma(0.05), 2)
        (6.94, 16.97)
    """
    if not 0.0 < sigma_rel < 0.28:  # gamma > 0 needs sigma_rel below sqrt(1/12) ~ 0.289
        raise ValueError(f"sigma_rel={sigma_rel!r} is invalid: it must lie in (0, 0.28), e.g. 0.1.")
    lo, hi = 0.0, 1e6  # the width falls monotonically with gamma: bisect
    for _ in range(200):
        mid = (lo + hi) / 2
        if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > sigma_rel**2:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def power_weight(count: int, gamma: float) -> float:
    """Weight of iterate number ``count`` (1-based) in a power-function EMA.

    ``1 - (1 - 1/count) ** (gamma + 1)``: the first iterate is copied, and iterate ``i``
    of ``t`` ends up weighing ``(i**(gamma+1) - (i-1)**(gamma+1)) / t**(gamma+1)``, about
    ``tau ** gamma`` (EDM2, eq. 3).

    Example:
        >>> power_weight(1, 6.94), round(power_weight(100, 6.94), 4)
        (1.0, 0.0767)
    """
    return 1.0 - (1.0 - 1.0 / count) ** (gamma + 1.0)


def power_weight_steps(before: int, now: int, gamma: float) -> float:
    """Weight of a fold at step ``now`` whose last fold was at step ``before`` (power-function EMA).

    ``1 - (before / now) ** (gamma + 1)``: the fold stands for the ``now - before`` steps
    since the last one, so folds may be unevenly spaced; with one fold per step it is
    :func:`power_weight`.

    Example:
        >>> power_weight_steps(99, 100, 6.94) == power_weight(100, 6.94)
        True
    """
    return 1.0 - (before / now) ** (gamma + 1.0)


def lr_window(weight: float, lr: float, max_lr: float) -> float:
    """Widen an averaging ``weight`` as the LR falls below its largest value so far.

    ``min(1, weight * max_lr / lr)``: the window (in steps) shrinks in proportion to
    the LR, so where a schedule anneals the LR to zero the average converges to the
    iterate, which the schedule has already averaged (Sandler et al. 2023).

    Example:
        >>> lr_window(0.01, lr=0.1, max_lr=0.1), lr_window(0.01, lr=0.001, max_lr=0.1)
        (0.01, 1.0)
    """
    if lr <= 0.0 or max_lr <= 0.0:
        return 1.0 if max_lr > 0.0 else weight
    return min(1.0, weight * max_lr / lr)


@torch.no_grad()
def average_(avg: list[Tensor], new: list[Tensor], weight: float) -> None:
    """In place ``avg <- avg + weight * (new - avg)`` for floating tensors; copy the rest.

    Example:
        >>> import torch
        >>> a = [torch.tensor([0.0]), torch.tensor([1])]
        >>> average_(a, [torch.tensor([4.0]), torch.tensor([7])], weight=0.25)
        >>> a
        [tensor([1.]), tensor([7])]
    """
    if all(a.is_floating_point() for a in avg):  # the common case, kept cheap: every step
        torch._foreach_lerp_(avg, new, weight)
        return
    floats = [(a, n) for a, n in zip(avg, new) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [n for _, n in floats], weight)
    for a, n in zip(avg, new):
        if not a.is_floating_point():
            a.copy_(n)


class WeightAverage(Mechanism):
    """Running average of a list of tensors (parameters, then buffers); what ``eval()`` shows.

    Args:
        kind: ``"ema"``, ``"power"`` or ``"phase"`` (see the module docstring).
        decay: EMA decay in ``[0, 1)`` (``"ema"``).
        warmup: use the EMA decay warm-up (``"ema"``).
        every: fold in only every ``every``-th call (the EMA decay becomes
            ``decay ** every``, the same horizon in steps): ``1/every`` of the cost.
        samples: for ``"power"``, > 0: fold in once per ``1/samples`` of the window's width
            (``width`` times the steps so far, times ``lr / max lr`` if ``follows_lr``), and
            at least ``every`` steps apart; each fold weighs the steps since the last one
            (:func:`power_weight_steps`), so the cost per step falls as ``1 / steps``.
            0: every ``every`` steps.
        width: the power-function EMA's relative width ``sigma_rel`` (``"power"``).
        follows_lr: shrink the window with the LR (:func:`lr_window`).
        restart: when the learning rate changes (an LR drop), training continues from the
            averaged weights (SWA's point fine-tuned at the new LR). Measured to lose on
            some nets (BENCHMARKS.md, section 1): an experimental option.

    Example:
        >>> import torch
        >>> avg = WeightAverage("phase")
        >>> w = [torch.tensor([1.0])]
        >>> avg.update(w, lr=0.1); w[0] += 2; avg.update(w, lr=0.1)
        >>> avg.tensors[0]
        tensor([2.])
    """

    name = "average"
    has_eval_view = True

    def __init__(self, kind: str = "ema", decay: float = 0.999, warmup: bool = True, every: int = 1,
                 width: float = 0.05, follows_lr: bool = False, restart: bool = False, samples: int = 0) -> None:
        if kind not in ("ema", "power", "phase"):
            raise ValueError(f"kind={kind!r} is invalid: use 'ema', 'power' or 'phase'.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay!r} is invalid: it must lie in [0, 1), e.g. 0.999.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is invalid: it must be an integer >= 1.")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0 or (samples and kind != "power"):
            raise ValueError(f"samples={samples!r} is invalid: it must be an integer >= 0, and 0 unless "
                             "kind='power' (e.g. 8 folds per window width).")
        self.samples = samples
        self.kind = kind
        self.decay = decay
        self.warmup = warmup
        self.every = every
        self.width = width
        self.gamma = power_gamma(width) if kind == "power" else 0.0
        self.follows_lr = follows_lr
        self.restart = restart
        self.calls = 0  # calls since the last fold
        self.tensors: list[Tensor] | None = None
        self.count = 0  # updates folded into the current average
        self.seen = 0  # updates since the average (re)started
        self.folded_at = 0  # the value of ``seen`` at the last fold
        self.lr: float | None = None  # LR of the current phase ("phase" kind)
        self.last_lr: float | None = None  # LR of the last update (restart)
        # The average is the training weights (an LR-following window narrower than a step):
        # then ``tensors`` are not kept up to date and eval() shows the training weights.
        self.at_iterate = False

    @classmethod
    def from_settings(cls, settings: Any) -> WeightAverage | None:
        if not settings.average:
            return None
        return cls(settings.average, settings.ema_decay, every=settings.average_every,
                   width=settings.average_width, follows_lr=settings.average_follows_lr,
                   samples=settings.average_samples if settings.average == "power" else 0)

    def weight(self, lr: float | None, max_lr: float | None) -> float:
        """Weight of the next iterate folded in (the average holds ``count`` already)."""
        if self.kind == "ema":
            weight = 1.0 - ema_decay(self.count - 1, self.decay**self.every, self.warmup)
        elif self.samples:
            weight = power_weight_steps(self.folded_at, self.seen, self.gamma)
        elif self.kind == "power":
            weight = power_weight(self.count + 1, self.gamma)
        else:
            weight = 1.0 / (self.count + 1)
        if self.follows_lr and lr is not None and max_lr is not None:
            weight = lr_window(weight, lr, max_lr)
        return weight

    def fold_period(self, lr: float | None, max_lr: float | None) -> int:
        """Steps between folds: ``every``, or with ``samples`` a ``1/samples`` of the window's width."""
        if not self.samples:
            return self.every
        width = self.width * self.seen
        if self.follows_lr and lr is not None and max_lr:
            width *= lr / max_lr
        return max(self.every, int(width / self.samples))

    @torch.no_grad()
    def update(self, current: list[Tensor], lr: float | None = None, max_lr: float | None = None) -> None:
        """Fold ``current`` into the average (``lr``: the LR the step used; ``max_lr``: the largest so far)."""
        restart = self.kind == "phase" and lr is not None and lr != self.lr
        if self.tensors is None or restart or len(self.tensors) != len(current):
            self.tensors = [t.detach().clone() for t in current]
            self.count, self.lr, self.calls, self.seen, self.folded_at = 1, lr, 0, 1, 1
            self.at_iterate = False
            return
        self.calls += 1
        self.seen += 1
        weight = self.weight(lr, max_lr)
        # A weight of 1 (the LR-following window, once the LR has fallen far enough) is
        # taken at once, every step: the average is then the iterate, and nothing is copied.
        if self.calls < self.fold_period(lr, max_lr) and weight < 1.0:
            return
        self.calls, self.folded_at, self.count = 0, self.seen, self.count + 1
        if weight >= 1.0:
            self.at_iterate = True
        elif self.at_iterate:  # the window widened again: the average starts from the iterate
            torch._foreach_copy_(self.tensors, [t.detach() for t in current])
            self.at_iterate = False
        else:
            average_(self.tensors, current, weight)

    def evaluated(self) -> list[Tensor] | None:
        """The averaged tensors, or ``None`` where the average is the training weights."""
        return None if self.at_iterate else self.tensors

    # -- events ------------------------------------------------------------------------------
    def on_train_forward(self, opt: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.restart:
            return
        lr = opt.lr  # at an LR change, continue training from the average (before this forward)
        if self.last_lr is None or lr == self.last_lr:
            return
        self.last_lr = lr
        targets, average = opt.eval_targets(), self.evaluated()
        if average is not None and len(targets) == len(average):
            opt.show("train")
            with torch.no_grad():
                torch._foreach_copy_(targets, average)

    def after_update(self, opt: Any) -> None:
        lr = opt.lr
        self.last_lr = lr
        self.update(opt.eval_targets(), lr=lr, max_lr=opt.max_lr)

    @torch.no_grad()
    def show_eval(self, opt: Any, targets: list[Tensor]) -> None:
        average = self.evaluated()
        if average is not None and len(targets) == len(average):
            opt.views.enter(targets, "eval")
            torch._foreach_copy_(targets, average)

    def on_weights_loaded(self, opt: Any, resumed: bool) -> None:
        if not resumed:
            self.tensors = None  # new weights: the average restarts from them

    def idle(self, opt: Any) -> str | None:
        # Early in a run a power average is nearly the iterate too, but it will act: only an
        # annealed LR (a tenth of its peak or less) says the schedule has taken its place.
        if self.at_iterate and opt.lr <= 0.1 * opt.max_lr:
            return (f"the LR has fallen to {opt.lr / opt.max_lr:.2g} of its peak, so the average is the "
                    "last iterate (the schedule did the averaging)")
        return None

    def state_dict(self) -> dict:
        return {"tensors": self.tensors, "count": self.count, "lr": self.lr, "calls": self.calls,
                "last_lr": self.last_lr, "seen": self.seen, "folded_at": self.folded_at, "at_iterate": self.at_iterate}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        self.tensors = None if tensors is None else [t.clone() for t in tensors]
        self.count, self.lr = int(state["count"]), state["lr"]
        self.calls = int(state.get("calls", 0))
        self.last_lr = state.get("last_lr")
        # version-1 states: their tensors were kept up to date (copied) at every step
        self.seen, self.folded_at = int(state.get("seen", self.count)), int(state.get("folded_at", self.count))
        self.at_iterate = bool(state.get("at_iterate", False))

    @property
    def label(self) -> str:
        return "weight averaging"

    def describe(self) -> str:
        rule = {"ema": f"EMA {self.decay}", "power": f"power-function EMA, width {self.width}",
                "phase": "uniform within each LR phase"}[self.kind]
        return f"weight averaging ({rule}; {self.count} updates folded in)"

    def __repr__(self) -> str:
        return (f"WeightAverage(kind={self.kind!r}, decay={self.decay}, every={self.every}, width={self.width}, "
                f"follows_lr={self.follows_lr}, restart={self.restart}, samples={self.samples})")
