"""Slow/fast weights (Lookahead, Zhang et al., NeurIPS 2019): which weights are kept.

The optimizer runs ``k`` steps on the fast weights; then the slow weights move a
fraction ``alpha`` towards them and the fast weights restart from there:
``slow <- slow + alpha * (fast - slow); fast <- slow``. The update rule of the user's
optimizer is untouched; only which weights survive every ``k`` steps changes.
Cost: one interpolation and one copy every ``k`` steps.

Example:
    >>> import torch
    >>> from deepopt.mechanisms.lookahead import Lookahead
    >>> w = [torch.tensor([0.0])]
    >>> la = Lookahead(k=2, alpha=0.5)
    >>> la.after_step(w); w[0] += 4; la.after_step(w)
    >>> w[0]
    tensor([2.])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import local_tensors
from .base import Mechanism

__all__ = ["sync_", "Lookahead"]


@torch.no_grad()
def sync_(slow: list[Tensor], fast: list[Tensor], alpha: float) -> None:
    """``slow <- slow + alpha (fast - slow)``, then ``fast <- slow``, in place.

    Example:
        >>> import torch
        >>> s, f = [torch.tensor([1.0])], [torch.tensor([3.0])]
        >>> sync_(s, f, 0.25); s, f
        ([tensor([1.5000])], [tensor([1.5000])])
    """
    torch._foreach_lerp_(slow, fast, alpha)
    torch._foreach_copy_(fast, slow)


class Lookahead(Mechanism):
    """Keeps the slow weights; :meth:`after_step` after every optimizer step (experimental).

    Measured no better than the plain run on the seed's nets (BENCHMARKS.md, section 1).

    Args:
        k: sync every ``k`` steps, >= 1.
        alpha: the slow weights' step towards the fast ones, in (0, 1].

    Example:
        >>> import torch
        >>> w = [torch.tensor([0.0])]
        >>> la = Lookahead(k=1, alpha=0.25)
        >>> la.after_step(w); w[0] += 4; la.after_step(w)
        >>> w[0], la.state_dict()["count"]
        (tensor([1.]), 0)
    """

    name = "lookahead"
    unsafe_when_sharded = ""  # elementwise: a shard syncs as the whole would

    def __init__(self, k: int = 5, alpha: float = 0.5) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} is invalid: it must be an integer >= 1, e.g. 5.")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is invalid: it must lie in (0, 1], e.g. 0.5.")
        self.k, self.alpha = k, alpha
        self.slow: list[Tensor] | None = None
        self.count = 0

    @torch.no_grad()
    def after_step(self, fast: list[Tensor]) -> None:
        if self.slow is None or len(self.slow) != len(fast):
            self.slow = [t.detach().clone() for t in fast]
            self.count = 0
        self.count += 1
        if self.count >= self.k:
            sync_(self.slow, fast, self.alpha)
            self.count = 0

    @classmethod
    def example(cls) -> Lookahead:
        return cls(k=3)

    def after_update(self, opt: Any) -> None:
        self.after_step(local_tensors(opt.params()))  # FSDP2: per local shard

    def state_dict(self) -> dict:
        return {"slow": self.slow, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.slow = None if state["slow"] is None else [t.clone() for t in state["slow"]]
        self.count = int(state["count"])

    @property
    def label(self) -> str:
        return f"Lookahead (k={self.k}, alpha={self.alpha})"


    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha})"
