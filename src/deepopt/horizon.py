"""How far through its run training is, where the run announces its length.

A compute budget spends its extra passes late in training; for that it must know where
the end is. Two sources say so, in this order:

* ``optimizer.total_steps``: the run's length in optimizer steps, set by the Lightning and
  Trainer callbacks (``estimated_stepping_batches``, ``max_steps``) or by the user;
* an LR scheduler on the optimizer whose length is part of its definition
  (:func:`schedule_length`): ``OneCycleLR``, ``CosineAnnealingLR``, ``PolynomialLR``, a
  decaying ``LinearLR`` and a ``SequentialLR`` ending in one of those. Schedulers are found
  once, at the first question, among the live objects (:func:`find_schedulers`), so one
  built on the user's optimizer before ``activate`` counts as one built after.

Other schedules (``MultiStepLR``, ``StepLR``, ``ExponentialLR``, ``ReduceLROnPlateau``, a
hand-set LR) announce no end: :func:`progress` is ``None`` there.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    >>> schedule_length(sched), progress(0, None, [sched])
    (100, 0.0)
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from torch.optim import lr_scheduler as lrs

__all__ = ["schedule_length", "find_schedulers", "progress", "Horizon"]


def schedule_length(scheduler: Any) -> int | None:
    """The number of ``scheduler.step()`` calls its schedule is defined over, or ``None``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> schedule_length(torch.optim.lr_scheduler.MultiStepLR(opt, [5, 8])) is None
        True
    """
    if isinstance(scheduler, lrs.OneCycleLR):
        return int(scheduler.total_steps)
    if isinstance(scheduler, lrs.CosineAnnealingLR):
        return int(scheduler.T_max)
    if isinstance(scheduler, lrs.PolynomialLR):
        return int(scheduler.total_iters)
    if isinstance(scheduler, lrs.LinearLR):  # a rising LinearLR is a warm-up, not the run's end
        return int(scheduler.total_iters) if scheduler.end_factor < scheduler.start_factor else None
    if isinstance(scheduler, lrs.SequentialLR):
        last = schedule_length(scheduler._schedulers[-1])
        return None if last is None else int(scheduler._milestones[-1]) + last
    return None


def find_schedulers(*optimizers: Any) -> list[Any]:
    """The live LR schedulers built on any of ``optimizers``."""
    wanted = {id(o) for o in optimizers}
    # type(), not isinstance(): some live objects are lazy modules that warn on __class__.
    return [o for o in gc.get_objects()
            if issubclass(type(o), lrs.LRScheduler) and id(getattr(o, "optimizer", None)) in wanted]


def progress(steps: int, total_steps: int | None, schedulers: list[Any]) -> float | None:
    """The fraction of the run done: ``steps / total_steps``, else the longest announced
    schedule's ``last_epoch / length``; ``None`` where nothing announces an end."""
    if total_steps:
        return steps / total_steps
    known = [(length, s) for s in schedulers if (length := schedule_length(s))]
    if not known:
        return None
    length, scheduler = max(known, key=lambda pair: pair[0])
    return max(0, scheduler.last_epoch) / length


class Horizon:
    """The schedulers of one optimizer, found at the first question and kept weakly.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        >>> Horizon().progress(opt, steps=3)
        0.0
    """

    def __init__(self) -> None:
        self._refs: list[weakref.ref] | None = None

    def schedulers(self, *optimizers: Any) -> list[Any]:
        live = [s for r in self._refs or () if (s := r()) is not None]
        if self._refs is None or len(live) < len(self._refs):  # first question, or one was freed
            live = find_schedulers(*optimizers)
            self._refs = [weakref.ref(s) for s in live]
        return live

    def progress(self, opt: Any, steps: int, total_steps: int | None = None) -> float | None:
        """:func:`progress` for ``opt`` (and the optimizer it wraps, if any)."""
        if total_steps:
            return steps / total_steps
        inner = getattr(opt, "optimizer", None)
        return progress(steps, None, self.schedulers(opt, *([inner] if inner is not None else [])))
