"""Exact SAM only every ``k`` steps, its sharpness signal reused between (LookSAM).

LookSAM (Liu et al., CVPR 2022): two-pass SAM costs 2x. Every ``k``-th step runs it and
keeps ``g_v``, the part of the perturbed gradient ``g_s`` orthogonal to the plain
gradient ``g`` (the part that carries the sharpness information, and changes slowly).
The ``k - 1`` steps between take one pass and use ``g + alpha * ||g|| / ||g_v|| * g_v``.
Cost ``1 + 1/k`` passes per step. The update rule of the user's optimizer is untouched;
only the gradient it receives is evaluated closer to SAM's.

With ``alpha = 0`` the steps between take the plain gradient and nothing is kept:
periodic SAM, the deterministic form of SS-SAM / RST (Zhao et al. 2022: SAM or SGD by a
Bernoulli trial per step).

Example:
    >>> import torch
    >>> from deepopt.mechanisms.looksam import orthogonal_part
    >>> orthogonal_part([torch.tensor([1.0, 1.0])], [torch.tensor([1.0, 0.0])])[0]
    tensor([0., 1.])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["orthogonal_part", "reuse_", "LookSAM"]


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return torch.stack([torch.sum(x * y) for x, y in zip(a, b)]).sum()


@torch.no_grad()
def orthogonal_part(sam_grads: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """``g_s - (<g_s, g> / ||g||^2) g``, one inner product over all tensors.

    Example:
        >>> import torch
        >>> orthogonal_part([torch.tensor([2.0, 3.0])], [torch.tensor([0.0, 0.0])])[0]
        tensor([2., 3.])
    """
    gg = _dot(grads, grads)
    coef = (_dot(sam_grads, grads) / gg).item() if gg > 0 else 0.0
    return [s - coef * g for s, g in zip(sam_grads, grads)]


@torch.no_grad()
def reuse_(grads: list[Tensor], ortho: list[Tensor], alpha: float) -> None:
    """``g += alpha * ||g|| / ||g_v|| * g_v`` in place (nothing if ``g_v`` is zero).

    Example:
        >>> import torch
        >>> g = [torch.tensor([3.0, 0.0])]
        >>> reuse_(g, [torch.tensor([0.0, 2.0])], alpha=0.5); g[0]
        tensor([3.0000, 1.5000])
    """
    nv = _dot(ortho, ortho).sqrt().item()
    if nv == 0.0:
        return
    ng = _dot(grads, grads).sqrt().item()
    torch._foreach_add_(grads, ortho, alpha=alpha * ng / nv)


class LookSAM:
    """Decides which steps run exact SAM and keeps ``g_v`` for the others.

    Example:
        >>> import torch
        >>> look = LookSAM(every=3, alpha=0.7)
        >>> look.ortho = [torch.zeros(1)]  # what the first exact step stores
        >>> flags = []
        >>> for _ in range(4):
        ...     flags.append(look.exact_now()); look.advance()
        >>> flags
        [True, False, False, True]
    """

    def __init__(self, every: int, alpha: float) -> None:
        self.every, self.alpha = every, alpha
        self.count = 0
        self.ortho: list[Tensor] | None = None

    def exact_now(self) -> bool:
        """Whether this step runs the two passes (also when a needed ``g_v`` is unknown)."""
        return self.count % self.every == 0 or (self.alpha > 0 and self.ortho is None)

    def advance(self) -> None:
        """Count a finished step."""
        self.count += 1

    def state_dict(self) -> dict:
        return {"count": self.count, "ortho": self.ortho}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.ortho = None if state["ortho"] is None else [t.clone() for t in state["ortho"]]
