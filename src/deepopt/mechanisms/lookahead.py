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

import torch
from torch import Tensor

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


class Lookahead:
    """Keeps the slow weights; call :meth:`after_step` after every optimizer step.

    Example:
        >>> import torch
        >>> w = [torch.tensor([0.0])]
        >>> la = Lookahead(k=1, alpha=0.25)
        >>> la.after_step(w); w[0] += 4; la.after_step(w)
        >>> w[0], la.state_dict()["count"]
        (tensor([1.]), 0)
    """

    def __init__(self, k: int = 5, alpha: float = 0.5) -> None:
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

    def state_dict(self) -> dict:
        return {"slow": self.slow, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.slow = None if state["slow"] is None else [t.clone() for t in state["slow"]]
        self.count = int(state["count"])
