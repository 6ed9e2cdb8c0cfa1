"""Sharpness-aware gradient evaluation: where the gradient of a step is taken.

Two forms share one pure function, :func:`perturbation`:

* **Momentum direction, zero extra passes** (Momentum-SAM, Becker et al. 2024): the
  forward/backward pass of step ``t`` runs at ``w + e`` with
  ``e = -rho * m / ||m||`` where ``m`` is the optimizer's momentum (SGD
  ``momentum_buffer``, Adam ``exp_avg``). ``m`` points along the gradient, so ``-m``
  is the direction the optimizer is travelling; evaluating the gradient a radius
  ``rho`` further along it lands on the far wall of a sharp valley and so penalises
  sharpness at no extra cost. Where an optimizer keeps no momentum the last gradient
  ``g`` is used with the SAM sign, ``e = +rho * g / ||g||``.
* **Exact two-pass SAM** (Foret et al., ICLR 2021; adaptive ASAM, Kwon et al. 2021):
  with a closure, the gradient at ``w`` gives ``e = rho * g / ||g||`` and the gradient
  at ``w + e`` drives the update. Twice the compute.

The weights are always restored by copying the saved ``w`` back, never by
subtracting ``e``, so rounding cannot drift them.

Example:
    >>> import torch
    >>> from deepopt.mechanisms.perturb import perturbation
    >>> e = perturbation([torch.tensor([3.0, 4.0])], rho=0.5)
    >>> e[0]
    tensor([0.3000, 0.4000])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["perturbation", "unit_scale", "direction", "warmed_up"]


@torch.no_grad()
def perturbation(
    directions: list[Tensor],
    rho: float,
    weights: list[Tensor] | None = None,
    eta: float = 0.01,
) -> list[Tensor]:
    """Return ``e`` with ``||e|| = rho`` along ``directions`` (one global norm).

    Args:
        directions: one tensor per parameter (gradient or momentum), any shapes.
        rho: radius of the perturbation, ``>= 0``.
        weights: if given, the scale-adaptive form of ASAM: with
            ``T = |w| + eta``, ``e = rho * T^2 d / ||T d||``, which makes the radius
            invariant to rescaling a layer's weights.
        eta: ASAM's offset that keeps zero weights perturbable.

    Returns:
        A new list of tensors, one per direction; all zeros if every direction is zero.

    Example:
        >>> import torch
        >>> perturbation([torch.tensor([1.0, 0.0]), torch.tensor([0.0])], rho=2.0)[0]
        tensor([2., 0.])
    """
    if not directions:
        return []
    if weights is not None:
        scales = [w.abs().add_(eta) for w in weights]
        scaled = torch._foreach_mul(directions, scales)
    else:
        scales, scaled = None, directions
    out = torch._foreach_mul(scaled, unit_scale(scaled, rho))
    if scales is not None:
        torch._foreach_mul_(out, scales)
    return out


def warmed_up(rho: float, step: int, warmup: int) -> float:
    """The radius at 0-based ``step`` of a linear ramp from 0 to ``rho`` over ``warmup`` steps.

    Step ``warmup - 1`` and later get the full ``rho``; ``warmup=0`` means no ramp.

    Example:
        >>> warmed_up(0.05, 0, 4), warmed_up(0.05, 1, 4), warmed_up(0.05, 3, 4), warmed_up(0.05, 9, 0)
        (0.0125, 0.025, 0.05, 0.05)
    """
    if warmup <= 0:
        return rho
    return rho * min(1.0, (step + 1) / warmup)


@torch.no_grad()
def unit_scale(directions: list[Tensor], rho: float) -> float:
    """``rho / ||directions||`` (one global norm), so ``unit_scale(d, rho) * d`` has norm rho.

    The hot path adds ``scale * d`` in place instead of allocating ``e``.

    Example:
        >>> import torch
        >>> round(unit_scale([torch.tensor([3.0]), torch.tensor([4.0])], rho=1.0), 6)
        0.2
    """
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(directions)))
    return rho / (norm.item() + 1e-12)


_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def direction(state: dict) -> tuple[Tensor | None, float]:
    """The optimizer's momentum for one parameter and the sign to perturb along it.

    Returns ``(tensor, -1.0)`` for a momentum buffer (SGD, RMSprop with momentum,
    Adam-family ``exp_avg``), or ``(None, 0.0)`` when the optimizer keeps none.

    Example:
        >>> import torch
        >>> direction({"exp_avg": torch.ones(2)})
        (tensor([1., 1.]), -1.0)
    """
    for key in _MOMENTUM_KEYS:
        buf = state.get(key)
        if isinstance(buf, Tensor):
            return buf, -1.0
    return None, 0.0
