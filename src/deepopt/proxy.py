"""An optimizer that is a view of another: what ``torch.optim.Optimizer`` users touch, forwarded.

The state lives in the wrapped optimizer (accelerate's pattern): ``param_groups``, ``state``
and ``defaults`` are the wrapped one's own objects, so an LR scheduler built on either
object drives the learning rate the update uses; every other attribute (hook dicts,
``register_step_pre_hook``, ...) is looked up on the wrapped optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["OptimizerProxy"]


class OptimizerProxy(torch.optim.Optimizer):
    """Base of an optimizer wrapper whose ``self.optimizer`` holds the state (it owns no copies).

    A subclass sets ``self.optimizer`` and never calls ``torch.optim.Optimizer.__init__``.

    Example:
        >>> base = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> class Wrapper(OptimizerProxy):
        ...     def __init__(self, optimizer): self.optimizer = optimizer
        >>> w = Wrapper(base)
        >>> w.param_groups is base.param_groups, w.defaults["lr"]
        (True, 0.1)
    """

    optimizer: torch.optim.Optimizer

    param_groups = property(lambda self: self.optimizer.param_groups,  # type: ignore[assignment]
                            lambda self, v: setattr(self.optimizer, "param_groups", v))
    state = property(lambda self: self.optimizer.state,  # type: ignore[assignment]
                     lambda self, v: setattr(self.optimizer, "state", v))
    defaults = property(lambda self: self.optimizer.defaults,  # type: ignore[assignment]
                        lambda self, v: setattr(self.optimizer, "defaults", v))

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes this object lacks: forward to the base optimizer.
        if name.startswith("__") or name == "optimizer" or "optimizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def __getstate__(self) -> dict:
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)
