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
subtracting ``e``, so rounding cannot drift them. Under FSDP2 (``fully_shard``) the norm is
the whole model's (the shards' squares all-reduced) and ``e`` is built shard by shard.

Example:
    >>> import torch
    >>> from deepopt.mechanisms.perturb import perturbation
    >>> e = perturbation([torch.tensor([3.0, 4.0])], rho=0.5)
    >>> e[0]
    tensor([0.3000, 0.4000])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import global_norm, local_tensors
from .base import Mechanism, Perturbation

__all__ = ["perturbation", "unit_scale", "direction", "warmed_up", "MomentumPerturbation"]


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
        For DTensor directions (FSDP2), their rank-local parts, scaled by the global norm.

    Example:
        >>> import torch
        >>> perturbation([torch.tensor([1.0, 0.0]), torch.tensor([0.0])], rho=2.0)[0]
        tensor([2., 0.])
    """
    if not directions:
        return []
    group_of, directions = directions, local_tensors(directions)  # sharded: local parts, global norm
    if weights is not None:
        scales = [w.abs().add_(eta) for w in local_tensors(weights)]
        scaled = torch._foreach_mul(directions, scales)
    else:
        scales, scaled = None, directions
    out = torch._foreach_mul(scaled, rho / (global_norm(scaled, like=group_of).item() + 1e-12))
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

    The hot path adds ``scale * d`` in place instead of allocating ``e``. The scale is read
    on the host: one device-to-host sync per perturbed step (the perturbation's only one).

    Example:
        >>> import torch
        >>> round(unit_scale([torch.tensor([3.0]), torch.tensor([4.0])], rho=1.0), 6)
        0.2
    """
    return rho / (global_norm(directions).item() + 1e-12)  # sharded: over every rank's shard


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


class MomentumPerturbation(Mechanism):
    """Each training forward runs at ``w + e``, ``e`` along the optimizer's momentum (zero extra passes).

    Where the optimizer keeps no momentum, the last gradient stands in, with SAM's sign.

    Args:
        rho: the radius ``||e||``, > 0.
        follows_lr: scale ``rho`` by ``lr / (largest lr so far)``, so the perturbation
            shrinks with the schedule (experimental).
        ascent: perturb along ``+m`` (uphill, SAM's sign with the momentum standing in for
            the gradient) instead of ``-m`` (experimental; BENCHMARKS.md, section 1).
        adaptive: scale-adaptive radius (ASAM), per weight ``|w| + 0.01`` (experimental).
        lr_ceiling: perturb only while ``lr <= lr_ceiling * (largest lr so far)``, in the
            low-LR tail of a schedule, as ``TwoPassSAM``'s ``lr_range`` (experimental).

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model, opt = deepopt.activate(model, opt, recipe="safe", rho=0.05)
        >>> opt.mechanism("perturb")
        MomentumPerturbation(rho=0.05, follows_lr=False, ascent=False, adaptive=False, lr_ceiling=1.0)
    """

    name = "perturb"
    needs_one_pass = True
    perturbs = True

    def __init__(self, rho: float, follows_lr: bool = False, ascent: bool = False, adaptive: bool = False,
                 lr_ceiling: float = 1.0) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
            raise ValueError(f"rho={rho!r} is invalid: it must be a number > 0, e.g. 0.05.")
        if isinstance(lr_ceiling, bool) or not isinstance(lr_ceiling, (int, float)) or not 0 < lr_ceiling <= 1:
            raise ValueError(f"lr_ceiling={lr_ceiling!r} is invalid: it must lie in (0, 1], e.g. 0.1 "
                             "(the low-LR tail) or 1.0 (every step).")
        self.rho, self.follows_lr, self.ascent, self.adaptive = float(rho), follows_lr, ascent, adaptive
        self.lr_ceiling = float(lr_ceiling)
        self.grads: list[Tensor | None] = []  # the last gradients, where no momentum is kept
        self._momentum: bool | None = None  # whether the base optimizer keeps a momentum

    @classmethod
    def from_settings(cls, settings: Any) -> MomentumPerturbation | None:
        return cls(settings.rho) if settings.rho > 0 else None

    @classmethod
    def example(cls) -> MomentumPerturbation:
        return cls(0.1)

    def perturbation(self, opt: Any) -> Perturbation | None:
        lr = opt.lr
        max_lr = max(opt.max_lr, lr)  # max_lr is set after an update: a skipped step leaves no trace
        rho = self.rho * (lr / max_lr if self.follows_lr and max_lr > 0 else 1.0)
        if rho <= 0 or lr > self.lr_ceiling * max_lr:
            return None
        params = opt.params()
        last = self.grads if len(self.grads) == len(params) else [None] * len(params)
        tensors, dirs, sign = [], [], 1.0
        for p, g in zip(params, last):
            d, d_sign = direction(opt.optimizer.state.get(p, {}))
            if d is None:
                d, d_sign = g, 1.0
            if d is not None:
                tensors.append(p)
                dirs.append(d)
                sign = d_sign
        if not tensors:
            return None
        sign = abs(sign) if self.ascent else sign
        if self.adaptive:
            return local_tensors(tensors), perturbation(dirs, rho, weights=tensors), sign
        # perturbation()'s maths, without allocating e; sharded: the local shards, the global norm
        return local_tensors(tensors), local_tensors(dirs), sign * unit_scale(dirs, rho)

    def after_update(self, opt: Any) -> None:
        if self._momentum is None:
            self._momentum = any(direction(s)[0] is not None for s in opt.optimizer.state.values())
        if not self._momentum:
            self.grads = [None if p.grad is None else p.grad.clone() for p in opt.params()]

    def state_dict(self) -> dict:
        return {"grads": list(self.grads) if self.grads else None}

    def load_state_dict(self, state: dict) -> None:
        grads = state.get("grads") or []
        self.grads = [None if g is None else g.clone() for g in grads]

    @property
    def label(self) -> str:
        return f"the momentum-direction perturbation (rho={self.rho})"


    def __repr__(self) -> str:
        return (f"MomentumPerturbation(rho={self.rho}, follows_lr={self.follows_lr}, ascent={self.ascent}, "
                f"adaptive={self.adaptive}, lr_ceiling={self.lr_ceiling})")
