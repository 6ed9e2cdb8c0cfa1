"""Divergence guard: a non-finite loss or gradient never reaches the weights.

Before the base optimizer runs, the gradients are checked; if any is NaN or inf the
update is skipped, so the weights and the optimizer state stay the last good ones
(the original framework restored its last checkpoint on a NaN loss). After
``max_consecutive`` failures in a row the guard raises, since by then skipping is
hiding a real problem (a learning rate too high, a loss that overflows).

Under FSDP2 (``fully_shard``) each rank checks its own shard of the gradients and its own
loss; one all-reduced flag makes the decision the same on every rank, so a NaN batch on
one rank skips the step everywhere and the shards stay one model.

Example:
    >>> import torch
    >>> from deepopt.mechanisms.guard import all_finite
    >>> all_finite([torch.ones(2), torch.tensor([float("nan")])])
    False
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import all_ranks, local_tensors
from .base import Mechanism

__all__ = ["all_finite", "DivergenceGuard", "DivergenceError"]


class DivergenceError(RuntimeError):
    """Raised after ``max_skips`` consecutive non-finite steps; the weights stay the last finite ones.

    Catch it to lower the learning rate and go on, or let it stop the run.

    Example:
        >>> g = DivergenceGuard(max_consecutive=1)
        >>> try:
        ...     g.record(ok=False)
        ... except DivergenceError as e:
        ...     print(str(e)[:48])
        deepopt skipped 1 optimizer steps in a row becau
    """


@torch.no_grad()
def all_finite(tensors: list[Tensor]) -> bool:
    """True if every element of every tensor is finite (one fused check and one sync per device).

    Uses the check GradScaler runs before a step (``found_inf`` set on the tensors' device,
    the tensors multiplied by exactly 1.0, which leaves every value as it was), about 4x
    cheaper per step than a norm per tensor on a small model; sparse tensors and devices
    it does not support fall back to the sum of norms.

    Cost on a GPU: one fused kernel and one device-to-host sync per device per step (the
    answer decides, on the host, whether the base optimizer runs). A fused optimizer could
    take ``found_inf`` on the device instead, as under GradScaler, but only for optimizers
    with that argument; the sync is the honest price of a guard that works for any optimizer.

    Example:
        >>> import torch
        >>> all_finite([torch.ones(3)]), all_finite([]), all_finite([torch.tensor([1.0, float("inf")])])
        (True, True, False)
    """
    if not tensors:
        return True
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, group in by_device.items():
        if any(t.is_sparse for t in group):
            if not _finite_by_norms(group):
                return False
            continue
        found, one = torch.zeros(1, device=device), torch.ones(1, device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
        except (RuntimeError, NotImplementedError):  # a device or dtype without the fused check
            if not _finite_by_norms(group):
                return False
            continue
        if found.item() != 0:
            return False
    return True


def _finite_by_norms(tensors: list[Tensor]) -> bool:
    # A sum of norms is non-finite iff some element is; one reduction per tensor.
    norms = torch._foreach_norm([t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors])
    return math.isfinite(torch.stack(norms).sum().item())


class DivergenceGuard(Mechanism):
    """Skips updates with a non-finite loss or gradient; raises after ``max_consecutive`` in a row.

    A skipped step also puts back the buffers (BatchNorm statistics) as they were before
    that step's first training forward: it leaves no trace.

    Example:
        >>> g = DivergenceGuard(max_consecutive=2)
        >>> g.record(ok=False); g.record(ok=True); g.skipped
        1
    """

    name = "guard"
    needs_one_pass = True

    def __init__(self, max_consecutive: int = 20) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._snapshot: list[Tensor] = []
        self._snapshot_taken = False  # buffers saved since the last update

    @classmethod
    def from_settings(cls, settings: Any) -> DivergenceGuard | None:
        return cls(settings.max_skips) if settings.guard else None

    def record(self, ok: bool) -> None:
        """Count one step, skipped unless ``ok``; raise :class:`DivergenceError` at the limit."""
        if ok:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise DivergenceError(
                f"deepopt skipped {self.consecutive} optimizer steps in a row because the "
                "loss or the gradients were NaN/inf; the weights are the last finite ones. "
                "Try a lower learning rate, gradient clipping, or check the loss for "
                "log(0) / division by zero (raise the limit with max_skips=...)."
            )

    def on_train_forward(self, opt: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._snapshot_taken:  # every training forward passes here: keep it cheap
            return
        buffers = opt.buffers()
        if len(self._snapshot) != len(buffers) or any(
            s.shape != b.shape or s.dtype != b.dtype or s.device != b.device for s, b in zip(self._snapshot, buffers)
        ):
            self._snapshot = [b.detach().clone() for b in buffers]
        elif buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._snapshot, [b.detach() for b in buffers])
        self._snapshot_taken = True

    def accept(self, opt: Any, loss: Any) -> bool:
        grads = [p.grad for p in opt.params() if p.grad is not None]
        checked = local_tensors(grads)
        # The loss joins the gradients' fused check: one sync per step instead of two (its
        # multiplication by exactly 1.0 leaves values and version counters as they were).
        # An integer loss is always finite.
        if isinstance(loss, Tensor) and (loss.is_floating_point() or loss.is_complex()):
            checked.append(loss.detach().reshape(-1))
        ok = all_ranks(all_finite(checked), grads)  # sharded: every rank decides alike
        if not ok and self._snapshot_taken:
            # A NaN batch would otherwise leave NaN running statistics in BatchNorm (and so in
            # every later evaluation) although its update was skipped. Before record(), which may raise.
            buffers = opt.buffers()
            if len(buffers) == len(self._snapshot) and buffers:
                with torch.no_grad():
                    torch._foreach_copy_(buffers, self._snapshot)
        if not ok:
            self._snapshot_taken = False
        self.record(ok)
        return ok

    def after_update(self, opt: Any) -> None:
        self._snapshot_taken = False

    def on_weights_loaded(self, opt: Any, resumed: bool) -> None:
        self._snapshot_taken = False

    def idle(self, opt: Any) -> str | None:
        return "the guard skipped no step (it acts only on a NaN or inf loss or gradient)" if not self.skipped else None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self._snapshot_taken = False

    @property
    def label(self) -> str:
        return "the divergence guard"

    def describe(self) -> str:
        return f"the divergence guard ({self.skipped} steps skipped)"

    def __repr__(self) -> str:
        return f"DivergenceGuard(max_consecutive={self.max_consecutive})"
