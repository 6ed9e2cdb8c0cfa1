"""Weight averaging: which weights are evaluated and saved.

The optimizer keeps training the raw weights ``w``; an average ``a`` of the
trajectory is kept beside them and is what ``model.eval()`` computes with.

* ``"ema"``: exponential moving average with decay warm-up (as in timm's ModelEma):
  ``d_t = min(decay, (1 + t) / (10 + t))``, ``a <- d_t a + (1 - d_t) w``.
* ``"phase"``: a uniform (SWA-style, Izmailov et al. 2018) average that restarts
  whenever the learning rate changes, so it averages within the current LR phase
  and never mixes the weights of a high-LR phase into a low-LR one.

Floating-point buffers (BatchNorm running statistics) are averaged the same way, so
the evaluation weights come with statistics that belong to them; integer buffers
(``num_batches_tracked``) are copied.

Example:
    >>> import torch
    >>> from deepopt.mechanisms.average import ema_decay, average_
    >>> a = [torch.zeros(2)]
    >>> average_(a, [torch.ones(2)], weight=1 - ema_decay(0, 0.999))
    >>> a[0]
    tensor([0.9000, 0.9000])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ema_decay", "average_", "WeightAverage"]


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
    floats = [(a, n) for a, n in zip(avg, new) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [n for _, n in floats], weight)
    for a, n in zip(avg, new):
        if not a.is_floating_point():
            a.copy_(n)


class WeightAverage:
    """Running average of a list of tensors (parameters, then buffers).

    Args:
        kind: ``"ema"`` or ``"phase"`` (see the module docstring).
        decay: EMA decay in ``[0, 1)``.
        warmup: use the EMA decay warm-up.
        every: fold in only every ``every``-th call (the EMA decay becomes
            ``decay ** every``, the same horizon in steps): ``1/every`` of the cost.

    Example:
        >>> import torch
        >>> avg = WeightAverage("phase")
        >>> w = [torch.tensor([1.0])]
        >>> avg.update(w, lr=0.1); w[0] += 2; avg.update(w, lr=0.1)
        >>> avg.tensors[0]
        tensor([2.])
    """

    def __init__(self, kind: str = "ema", decay: float = 0.999, warmup: bool = True, every: int = 1) -> None:
        self.kind = kind
        self.decay = decay
        self.warmup = warmup
        self.every = every
        self.calls = 0  # calls since the last fold
        self.tensors: list[Tensor] | None = None
        self.count = 0  # updates folded into the current average
        self.lr: float | None = None  # LR of the current phase ("phase" kind)

    @torch.no_grad()
    def update(self, current: list[Tensor], lr: float | None = None) -> None:
        """Fold ``current`` into the average (``lr``: the LR the step used)."""
        restart = self.kind == "phase" and lr is not None and lr != self.lr
        if self.tensors is None or restart or len(self.tensors) != len(current):
            self.tensors = [t.detach().clone() for t in current]
            self.count, self.lr, self.calls = 1, lr, 0
            return
        self.calls += 1
        if self.calls < self.every:
            return
        self.calls = 0
        if self.kind == "ema":
            weight = 1.0 - ema_decay(self.count - 1, self.decay**self.every, self.warmup)
        else:
            weight = 1.0 / (self.count + 1)
        average_(self.tensors, current, weight)
        self.count += 1

    def state_dict(self) -> dict:
        return {"tensors": self.tensors, "count": self.count, "lr": self.lr, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        self.tensors = None if tensors is None else [t.clone() for t in tensors]
        self.count, self.lr = int(state["count"]), state["lr"]
        self.calls = int(state.get("calls", 0))
