"""Exact two-pass SAM through ``optimizer.step(closure)`` (Foret et al., ICLR 2021).

The closure's gradient ``g`` at ``w`` gives ``e = rho * g / ||g||`` (:func:`perturbation`);
a second closure call at ``w + e`` leaves the gradient that drives the update. The user's
update rule is untouched; only where its gradient is taken changes. Twice the compute.
The radius ramps up over the first ``warmup`` steps (:func:`warmed_up`): at full radius
from step 0 SAM killed the last hidden layer of the seed's 13-layer MLP on 2 of 3 seeds.

Experimental variants (constructor arguments; BENCHMARKS.md, section 1, measures them):
ASAM's scale-adaptive radius, SAM only within an LR range, and LookSAM (two passes every
``every``-th step, the sharpness direction reused between; :mod:`.looksam`).

A ``budget`` (:mod:`.budget`) decides on which steps it runs; this class, with its knobs,
is the experimental form (``deepopt.experimental.TwoPassSAM``).

Example:
    >>> import torch, deepopt
    >>> from deepopt.experimental import TwoPassSAM
    >>> model = torch.nn.Linear(3, 1)
    >>> model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                               mechanisms=[TwoPassSAM(rho=0.05)])
    >>> x = torch.ones(4, 3)
    >>> def closure():
    ...     opt.zero_grad(); loss = model(x).pow(2).mean(); loss.backward(); return loss
    >>> _ = opt.step(closure)
    >>> opt.mechanism("sam").two_pass_steps
    1
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import local_tensors
from ..replay import LoopRecorder
from .base import Mechanism
from .looksam import LookSAM, orthogonal_part, reuse_
from .perturb import perturbation, warmed_up

__all__ = ["TwoPassSAM"]


class TwoPassSAM(Mechanism):
    """Two-pass SAM on ``step(closure)``; a ``step()`` without a closure takes one plain pass.

    Args:
        rho: the radius, > 0 (0.05: Foret et al.'s CIFAR value).
        warmup: ramp the radius from 0 to ``rho`` over the first ``warmup`` steps (0: no ramp).
        adaptive: ASAM's scale-adaptive radius (experimental).
        lr_range: ``(low, high)``: two passes only while ``lr / largest lr so far`` lies in
            it, one plain pass elsewhere (experimental; ``(0, 1)`` is every LR).
        every: two passes every ``every``-th step only (LookSAM; experimental).
        reuse: LookSAM's ``alpha``, the weight of the reused sharpness direction on the
            steps between (0: the plain gradient, periodic SAM; 0.7, LookSAM's value, was
            measured unstable with SGD momentum).
    """

    name = "sam"
    needs_closure = True
    needs_one_pass = True

    def __init__(self, rho: float = 0.05, warmup: int = 0, adaptive: bool = False,
                 lr_range: tuple[float, float] = (0.0, 1.0), every: int = 1, reuse: float = 0.0) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
            raise ValueError(f"rho={rho!r} is invalid: it must be a number > 0, e.g. 0.05.")
        low, high = lr_range
        if not 0.0 <= low <= high <= 1.0 or high == 0.0:
            raise ValueError(f"lr_range={lr_range!r} is invalid: it must be (low, high) with 0 <= low <= high <= 1, "
                             "high > 0; (0, 1) runs SAM at every LR.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is invalid: it must be an integer >= 1 (1 = every step).")
        if not reuse >= 0:
            raise ValueError(f"reuse={reuse!r} is invalid: it must be a number >= 0 (0 = periodic SAM).")
        self.rho, self.warmup, self.adaptive = float(rho), warmup, adaptive
        self.lr_range = (float(low), float(high))
        self.every, self.reuse = every, reuse
        self.look = LookSAM(every, reuse) if every > 1 else None
        if every > 1:  # its inner products are not all-reduced over shards
            self.unsafe_when_sharded = "LookSAM's inner products would be each rank's shard's"  # type: ignore[misc]
        self.recorder: LoopRecorder | None = None
        self.two_pass_steps = 0  # steps whose gradient was taken at w + e
        self._told = False  # said once whether SAM runs on a loop without closure

    @classmethod
    def from_settings(cls, settings: Any) -> TwoPassSAM | None:
        return None  # the settings ask for SAM through a budget (BudgetSAM)

    @classmethod
    def example(cls) -> TwoPassSAM:
        return cls(0.05)

    def attach(self, opt: Any) -> bool:
        # Watches the loop from the first step, so the user hears at once whether SAM will
        # run there, even if it starts only in the low-LR tail.
        self.recorder = LoopRecorder(opt.model, opt.params, pre_hook=False)
        return True

    def on_train_forward(self, opt: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.recorder is not None:
            self.recorder.forward_started(module, args, kwargs)

    def detach(self, opt: Any) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def in_window(self, opt: Any) -> bool:
        """Whether this step's LR lies in ``lr_range`` (of the largest LR so far)."""
        lr = opt.lr
        max_lr = max(opt.max_lr, lr)
        return self.lr_range[0] * max_lr <= lr <= self.lr_range[1] * max_lr

    def claims_step(self, opt: Any, closure: Any) -> bool:
        if closure is None:
            return False  # replace_grads replays the loop's loss, if it can
        if self.recorder is not None:  # the user passes closures: nothing to replay
            self.detach(opt)
        return self.in_window(opt)

    def run_step(self, opt: Any, closure: Any, kwargs: dict) -> Any:
        opt.show("train")
        try:
            # The model hooks hold during the closure, but its forward still starts a
            # training step (calibration, the guard's buffer snapshot, dropout's batch).
            with opt.hold(first_pass=True), torch.enable_grad():
                loss = closure()
        finally:
            opt.show("train")
        if opt.accept(loss) and self._sharpen(opt, closure):
            opt.base_step(kwargs)
            opt.after_update()
        return loss

    def replace_grads(self, opt: Any) -> bool:
        """Without a closure: replay the loop's own loss at ``w + e`` (:mod:`deepopt.replay`)."""
        recorder = self.recorder
        if recorder is None:
            return True
        in_window = self.in_window(opt)
        closure, what = recorder.replay() if in_window or not self._told else (None, "")
        if not self._told:
            self._tell(opt, closure is not None, what)
        if closure is None or not in_window:
            recorder.clear()
            return True
        try:
            return self._sharpen(opt, closure, lambda: not recorder.found_inf)
        finally:
            recorder.clear()

    def _tell(self, opt: Any, can: bool, what: str) -> None:
        from ..hooks import say

        self._told = True
        when = self.when(opt)
        if can:
            say(f"{self.label} runs on this loop without a closure ({what}; recomputed at w + e in step()), {when}.")
        else:
            say(f"{self.label} cannot run on this loop: {what}; it trains without SAM. To run it, pass "
                "the loss as a closure: `def closure(): optimizer.zero_grad(); loss = ...; loss.backward(); "
                "return loss` then `optimizer.step(closure)`.")

    def when(self, opt: Any) -> str:
        """On which steps it takes two passes, for the one line said at the first step."""
        low, high = self.lr_range
        return ("at every step" if (low, high) == (0.0, 1.0) else
                f"while the LR is at most {high:g} of its peak" if low == 0.0 else
                f"while the LR lies within {low:g} to {high:g} of its peak")

    def _sharpen(self, opt: Any, closure: Any, finite: Any = lambda: True) -> bool:
        """Replace the gradient at ``w`` in ``.grad`` by the one at ``w + e`` (``closure``
        recomputes the loss); ``False`` if the result must not be applied (``finite()`` says
        whether the closure's own check found it finite)."""
        with_grad = [p for p in opt.params() if p.grad is not None]
        look, ortho, two_pass = self.look, None, False
        try:
            with opt.hold():
                if look is not None and not look.exact_now() and (look.alpha == 0 or len(look.ortho) == len(with_grad)):
                    if look.alpha > 0:  # one pass only; alpha 0 keeps the plain gradient
                        reuse_([p.grad for p in with_grad], look.ortho, look.alpha)
                else:
                    ortho, two_pass = self._second_pass(opt, closure, with_grad), True
        finally:
            opt.show("train")
        if not (finite() and opt.accept(None)):
            return False
        self.two_pass_steps += two_pass  # counts applied steps only: a skipped one leaves no trace
        if look is not None:
            look.ortho = look.ortho if ortho is None else ortho  # kept only from a finite step
            look.advance()
        return True

    def _second_pass(self, opt: Any, closure: Any, with_grad: list[Tensor]) -> list[Tensor] | None:
        """Leave in ``.grad`` the gradient at ``w + e``; return LookSAM's ``g_v`` (if reused)."""
        grads = [p.grad for p in with_grad]
        rho = warmed_up(self.rho, opt.steps, self.warmup)
        e = perturbation(grads, rho, weights=with_grad if self.adaptive else None)
        clean = [g.clone() for g in grads] if self.look is not None and self.look.alpha > 0 else None
        buffers = opt.buffers()
        saved_buffers = [b.clone() for b in buffers]
        try:
            opt.views.enter(with_grad, "perturbed")
            with torch.no_grad():
                torch._foreach_add_(local_tensors(with_grad), e)  # FSDP2: e is per local shard
            opt.optimizer.zero_grad()
            with torch.enable_grad():
                closure()
        finally:
            # The second pass must not move BatchNorm running statistics, even if it raised.
            with torch.no_grad():
                for b, s in zip(buffers, saved_buffers):
                    b.copy_(s)
        if clean is None:
            return None
        sam_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in with_grad]
        return orthogonal_part(sam_grads, clean)

    def idle(self, opt: Any) -> str | None:
        if self.two_pass_steps:
            return None
        return f"{self.label} has taken no two-pass step so far (it runs {self.when(opt)})"

    def state_dict(self) -> dict:
        return {"two_pass_steps": self.two_pass_steps, **({} if self.look is None else self.look.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.two_pass_steps = int(state.pop("two_pass_steps", 0))
        if self.look is not None and state:
            self.look.load_state_dict(state)

    @property
    def label(self) -> str:
        return f"two-pass SAM (rho={self.rho})"

    def __repr__(self) -> str:
        return (f"TwoPassSAM(rho={self.rho}, warmup={self.warmup}, adaptive={self.adaptive}, "
                f"lr_range={self.lr_range}, every={self.every}, reuse={self.reuse})")
