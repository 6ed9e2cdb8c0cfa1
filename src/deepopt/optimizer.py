"""The optimizer wrapper: where a list of mechanisms meets the user's optimizer.

``DeepOptimizer`` shares ``param_groups``, ``state`` and ``defaults`` with the user's
optimizer (it owns no copies), so LR schedulers and step hooks on either object act on
the update. It composes mechanisms (:mod:`deepopt.mechanisms`) through their events and
names none; every place a user can observe the model first shows the right view
(:mod:`deepopt.views`; the exact rules: docs/weight-views.md, docs/guarantees.md).
Drivers (``deepopt run``, the integrations) use the public lifecycle methods.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint
from .checkpoint import STATE_VERSION, check_state_version
from .distributed import fsdp_modules, reshard
from .hooks import ModelHook, needs_closure
from .mechanisms.base import EVENTS, Mechanism
from .messages import tell_if_idle, without_one_pass
from .param_cache import ParamCache
from .proxy import OptimizerProxy
from .views import VIEWS, Views

__all__ = ["DeepOptimizer", "STATE_VERSION", "check_state_version"]


class DeepOptimizer(OptimizerProxy):
    """A ``torch.optim.Optimizer`` that runs the user's optimizer with deepopt's mechanisms.

    Built by :func:`deepopt.activate`; not meant to be constructed directly.

    Attributes:
        optimizer: the user's optimizer. model: the user's model.
        mechanisms: the mechanisms acting, in the order their events run.
        settings: the :class:`deepopt.Settings` they were built from.
        steps: updates taken. max_lr: the largest LR an update has used.
        total_steps: the run's length in updates, if known (``None``): the Lightning and
            Trainer callbacks set it; a user may (it places a ``budget``'s SAM steps).
        views: which weights the model shows (:class:`deepopt.views.Views`).

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model, opt = deepopt.activate(model, opt, rho=0.05)
        >>> isinstance(opt, torch.optim.Optimizer), opt.param_groups is opt.optimizer.param_groups
        (True, True)
        >>> [m.name for m in opt.mechanisms]
        ['calibrate', 'average', 'guard', 'perturb']
    """

    # GradScaler must unscale before calling step(); never hand it the fused path.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, mechanisms: Sequence[Mechanism],
                 settings: Any = None) -> None:
        # No super().__init__(): the state lives in the base optimizer (deepopt.proxy).
        self.optimizer, self.model, self.settings = optimizer, model, settings
        self.steps, self.max_lr, self.total_steps = 0, 0.0, None
        self._fsdp = fsdp_modules(model)  # FSDP2 (fully_shard): mechanisms act on local shards
        self.views = Views(functools.partial(reshard, self._fsdp) if self._fsdp else None)
        self.base_stepping = False  # inside this wrapper's own call of the base step
        self._held = False  # model hooks paused (a mechanism's own forwards)
        self._first_pass = False  # a held step's first training forward is still to come
        self._forward_ok = False
        self._cache = ParamCache(optimizer, model, sharded=bool(self._fsdp))
        self.resume = checkpoint.Resume()  # model + optimizer loads, in either order
        self._told_idle = False  # said once that nothing acted
        # An optimizer whose step(closure) evaluates the closure itself (LBFGS), possibly
        # several times, updates inside that call: nothing can act once per forward/backward.
        self.closure_driven = needs_closure(optimizer)
        mechanisms = without_one_pass(mechanisms, optimizer) if self.closure_driven else list(mechanisms)
        self.mechanisms = tuple(m for m in mechanisms if m.attach(self))
        self._by_event = {e: [m for m in self.mechanisms if getattr(type(m), e) is not getattr(Mechanism, e)]
                          for e in EVENTS}
        self._train_forward, self._after = self._by_event["on_train_forward"], self._by_event["after_update"]
        self.perturbs = bool(self._by_event["perturbation"])  # whether a training forward may be perturbed
        # Under FSDP2 the pre-hook runs before FSDP's own, which gathers the weights it shows;
        # state_dict() holds the evaluation weights; torch.save(model) gives a plain model.
        self._handles = [model.register_forward_pre_hook(ModelHook(self, "forward_started"), with_kwargs=True,
                                                         prepend=bool(self._fsdp)),
                         *checkpoint.install(self)]
        if self.perturbs:  # only a perturbing forward needs undoing when it raises
            self._handles += [
                model.register_forward_hook(ModelHook(self, "_on_forward_done")),
                model.register_forward_hook(ModelHook(self, "_on_forward_exit"), always_call=True),
            ]

    # -- facts asked of the list ---------------------------------------------------------------
    @property
    def has_eval_view(self) -> bool:
        """Whether ``model.eval()`` may show other weights than the training ones."""
        return any(m.has_eval_view for m in self.mechanisms)

    def mechanism(self, name: str) -> Mechanism | None:
        """The acting mechanism called ``name``, or ``None``."""
        return next((m for m in self.mechanisms if m.name == name), None)

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group (what a scheduler sets)."""
        return float(self.param_groups[0]["lr"])

    # -- what torch.optim.Optimizer users and schedulers touch (the rest: deepopt.proxy) ---------
    def __repr__(self) -> str:
        return f"DeepOptimizer({', '.join(map(repr, self.mechanisms))}; base={self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The perturbed view stays: zero_grad() between forward and backward is a common
        # idiom, and moving those weights then would break autograd. A model put back in
        # train() after evaluation gets its training weights here.
        if self.views.current == "eval" and self.model.training and not self._held:
            self.show("train")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- the step ------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """One optimizer step; a mechanism may claim ``step(closure)`` and run it itself (``claims_step``)."""
        self._cache.stale = True  # requires_grad may have changed since the last step
        if self.closure_driven:
            self.show("train")
            try:  # without a closure, the base step raises its own TypeError
                loss = self.base_step(kwargs, closure)
            finally:
                self.show("train")
            self.after_update()
            return loss
        for m in self._by_event["claims_step"]:
            if m.claims_step(self, closure):
                return m.run_step(self, closure, kwargs)
        loss = None
        try:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
        finally:
            self.show("train")
        if self.accept(loss) and self.replace_grads():
            self.base_step(kwargs)
            self.after_update()
        return loss

    def base_step(self, kwargs: dict, closure: Callable[[], Any] | None = None) -> Any:
        """The user's optimizer's own step."""
        self.base_stepping = True
        try:
            return self.optimizer.step(**kwargs) if closure is None else self.optimizer.step(closure, **kwargs)
        finally:
            self.base_stepping = False

    def accept(self, loss: Any = None) -> bool:
        """Whether every mechanism lets this update happen (the gradients are in ``.grad``)."""
        for m in self._by_event["accept"]:
            if not m.accept(self, loss):
                return False
        return True

    def replace_grads(self) -> bool:
        """After :meth:`accept` without a closure: each mechanism may replace ``.grad``
        (two-pass SAM's second pass); ``False``: skip the update."""
        return all(m.replace_grads(self) for m in self._by_event["replace_grads"])

    def before_update(self, loss: Any = None) -> bool:
        """For drivers calling the base step themselves: training weights shown, then
        :meth:`accept` and :meth:`replace_grads`."""
        self._cache.stale = True
        self.show("train")
        return self.accept(loss) and self.replace_grads()

    @torch.no_grad()
    def after_update(self) -> None:
        """After the base optimizer's update: count it, then each mechanism's ``after_update``."""
        self.steps += 1
        self.resume.stepped(self)
        lr = self.lr
        if lr > self.max_lr:
            self.max_lr = lr
        for m in self._after:
            m.after_update(self)

    @contextlib.contextmanager
    def hold(self, first_pass: bool = False) -> Iterator[None]:
        """Pause the model hooks (a mechanism's own forwards); ``first_pass``: the first
        training forward inside still starts a training step (``on_train_forward``)."""
        held, self._held, self._first_pass = self._held, True, first_pass
        try:
            yield
        finally:
            self._held, self._first_pass = held, False

    # -- parameters, buffers, views ------------------------------------------------------------
    def params(self) -> list[Tensor]:
        """The trainable parameters (``requires_grad``) of the optimizer's groups."""
        return self._cache.params()

    def buffers(self) -> list[Tensor]:
        """The model's buffers (listed when the parameters are: walking modules is slow)."""
        return self._cache.buffers()

    def eval_targets(self) -> list[Tensor]:
        """What an evaluation view may change: the parameters (local shards under FSDP2), then the buffers."""
        return self._cache.eval_targets()

    def show(self, view: str) -> None:
        """Show ``"train"``, ``"perturbed"`` or ``"eval"`` weights in the model."""
        if view == self.views.current:  # the common case, kept cheap: no grad-mode switch
            return
        if view not in VIEWS:
            raise ValueError(f"view={view!r} is invalid: use one of {', '.join(VIEWS)}.")
        with torch.no_grad():
            self.views.leave()
            if view == "perturbed":
                parts = [p for m in self._by_event["perturbation"] if (p := m.perturbation(self)) is not None]
                if parts:  # each computed at the clean weights, then all added
                    self.views.enter(parts[0][0] if len(parts) == 1 else self.params(), "perturbed")
                    for tensors, deltas, alpha in parts:
                        torch._foreach_add_(tensors, deltas, alpha=alpha)
            elif view == "eval":
                targets = self.eval_targets()
                for m in self._by_event["show_eval"]:
                    m.show_eval(self, targets)
                if not self._told_idle and self.steps:
                    self._told_idle = tell_if_idle(self)

    # -- model hooks ---------------------------------------------------------------------------
    def forward_started(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The model's forward pre-hook: show the view this forward needs (drivers call it
        for a forward whose hooks were registered too late to see it)."""
        grad = torch.is_grad_enabled()
        if self._held:
            if self._first_pass and grad and module.training:
                self._first_pass = False
                for m in self._by_event["on_train_forward"]:
                    m.on_train_forward(self, module, args, kwargs)
            return
        if not module.training:
            self.show("eval")
            return
        if grad:
            for m in self._train_forward:
                m.on_train_forward(self, module, args, kwargs)
        self._cache.stale = True  # requires_grad may have changed since the last forward
        self.show("perturbed" if grad and self.perturbs else "train")
        self._forward_ok = False

    def _on_forward_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._forward_ok = True

    def _on_forward_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Registered with always_call: reached without _on_forward_done only if forward raised.
        if not self._forward_ok and self.views.current == "perturbed" and not self._held:
            self.show("train")
        self._forward_ok = False

    def _on_state_dict(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        if not self._held:  # in either mode, the evaluation weights (deepopt.checkpoint)
            checkpoint.show_saved(self, module)

    def _on_model_loaded(self, module: nn.Module, incompatible_keys: Any) -> None:
        checkpoint.model_loaded(self)

    # -- checkpoints (deepopt.checkpoint) ------------------------------------------------------
    def state_dict(self) -> dict:  # type: ignore[override]
        """The base optimizer's state dict plus a ``"deepopt"`` entry with deepopt's state."""
        return checkpoint.optimizer_state(self)

    def deepopt_state(self) -> dict:
        """deepopt's part of :meth:`state_dict`: counters, each mechanism's state by name."""
        return checkpoint.deepopt_state(self)

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Load a state saved by :meth:`state_dict` (or a plain optimizer state dict)."""
        checkpoint.load_optimizer_state(self, state_dict)

    def load_deepopt_state(self, deep: dict) -> None:
        """Load what :meth:`deepopt_state` returned (or a version-1 entry)."""
        checkpoint.load_deepopt_state(self, deep)

    # -- undo ----------------------------------------------------------------------------------
    def detach(self) -> torch.optim.Optimizer:
        """Remove deepopt from the model (training weights shown) and return the base optimizer."""
        self.show("train")
        for m in self._by_event["detach"]:
            m.detach(self)
        for h in self._handles:
            h.remove()
        self._handles = []
        checkpoint.uninstall(self)
        if getattr(self.optimizer, "_deepopt_wrapper", None) is self:
            del self.optimizer._deepopt_wrapper
        return self.optimizer

