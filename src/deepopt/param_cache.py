"""The tensors the mechanisms act on, listed once per change: walking the groups and modules is slow."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .distributed import local_tensors

__all__ = ["ParamCache"]


class ParamCache:
    """The trainable parameters of an optimizer's groups and the model's buffers.

    The lists are rebuilt only when the groups change (``add_param_group``,
    ``load_state_dict``) or after :attr:`stale` is set (a step or a forward:
    ``requires_grad`` may have changed), since they are asked for several times per step.
    ``sharded``: the model is under FSDP2, so :meth:`eval_targets` gives the local shards.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> cache = ParamCache(torch.optim.SGD(model.parameters(), lr=0.1), model, sharded=False)
        >>> len(cache.params()), cache.buffers()
        (2, [])
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, sharded: bool) -> None:
        self.optimizer, self.model, self.sharded = optimizer, model, sharded
        self.stale = False
        self._key: tuple = ()
        self._params: list[Tensor] = []
        self._buffers: list[Tensor] = []

    def params(self) -> list[Tensor]:
        """The trainable parameters (``requires_grad``) of the optimizer's groups."""
        groups = self.optimizer.param_groups
        key = (id(groups), *(id(g["params"]) for g in groups), *(len(g["params"]) for g in groups))
        if key != self._key:
            self._buffers = list(self.model.buffers())
        if key != self._key or self.stale:
            self._key, self._params = key, [p for g in groups for p in g["params"] if p.requires_grad]
            self.stale = False
        return self._params

    def buffers(self) -> list[Tensor]:
        """The model's buffers (listed when the parameters are)."""
        self.params()
        return self._buffers

    def eval_targets(self) -> list[Tensor]:
        """What an evaluation view may change: the parameters (local shards under FSDP2), then the buffers."""
        return (local_tensors(self.params()) if self.sharded else self.params()) + self.buffers()
