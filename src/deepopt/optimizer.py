"""The optimizer wrapper: where deepopt's mechanisms meet the user's optimizer.

``DeepOptimizer`` shares ``param_groups``, ``state`` and ``defaults`` with the user's
optimizer (it owns no copies), so any LR scheduler built on either object drives the
learning rate the update uses, and step hooks registered on either fire once per step.

The model's parameters are shown in one of three *views*:

* ``"train"``: the training weights ``w`` (what the base optimizer updates);
* ``"perturbed"``: ``w + e`` during a training forward/backward (sharpness-aware);
* ``"eval"``: the evaluation weights: the averaged weights and their BatchNorm
  statistics, and/or the weights rescaled to match dropout (``dropout_match``).

Leaving a view always copies the saved training weights back (never subtracts), and
every place a user can observe the model (``step``, an ``eval`` forward, ``state_dict``,
an exception in ``forward``) first puts the right view in place. Between a training
forward and ``step`` the parameters hold ``w + e`` by design (backward needs them), so an
exception raised in the loss or in backward, or a ``KeyboardInterrupt`` in ``forward``
(torch runs ``always_call`` hooks only for ``Exception``), leaves ``w + e`` in the
parameter tensors until the next of those places; ``state_dict()`` is always clean.

A step the divergence guard skips also puts back the buffers (BatchNorm statistics) as
they were before that step's first training forward: a skipped step leaves no trace.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .mechanisms.average import WeightAverage
from .mechanisms.calibrate import calibrate_
from .mechanisms.dropout_match import (
    DropoutMatch,
    batch_size,
    has_dropout,
    matched_scales,
    weighted_layers,
)
from .mechanisms.guard import DivergenceGuard, all_finite
from .mechanisms.lookahead import Lookahead
from .mechanisms.looksam import LookSAM, orthogonal_part, reuse_
from .mechanisms.noise import WeightNoise
from .mechanisms.perturb import direction, perturbation, unit_scale, warmed_up
from .recipes import Settings

__all__ = ["DeepOptimizer", "STATE_VERSION"]

STATE_VERSION = 1


def say(text: str) -> None:
    """Tell the user, in one line on stderr, what deepopt does not do on their script."""
    print(f"deepopt: {text}", file=sys.stderr, flush=True)


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (LBFGS): it evaluates it itself.

    Example:
        >>> import torch
        >>> p = [torch.nn.Parameter(torch.ones(1))]
        >>> needs_closure(torch.optim.LBFGS(p)), needs_closure(torch.optim.SGD(p, lr=0.1))
        (True, False)
    """
    try:
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):  # a step inspect cannot read: assume the common kind
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _closure_driven(settings: Settings, name: str) -> Settings:
    """``settings`` without the mechanisms that need one forward/backward per update.

    An optimizer whose ``step(closure)`` evaluates the closure itself, possibly several
    times (LBFGS's line search), updates inside that call: a perturbation would move the
    weights between its evaluations, two-pass SAM cannot run its own passes, and the
    guard cannot check a step's loss and gradients before the update. One line says so.
    """
    off = {
        "the divergence guard": settings.guard,
        f"the weight perturbation (rho={settings.rho})": settings.rho > 0,
        f"the weight noise (noise={settings.noise})": settings.noise > 0,
        f"two-pass SAM (sam_rho={settings.sam_rho})": settings.sam_rho > 0,
    }
    off_names = [k for k, on in off.items() if on]
    if not off_names:
        return settings
    verb = "is" if len(off_names) == 1 else "are"
    say(f"{', '.join(off_names)} {verb} off for {name}: its step(closure) evaluates the closure itself "
        "(possibly several times), so deepopt cannot check or perturb one forward/backward per "
        "update; the other mechanisms act.")
    return replace(settings, guard=False, rho=0.0, noise=0.0, sam_rho=0.0, sam_every=1)


class _ModelHook:
    """Callable stored in the model's hook dicts; inert once copied or unpickled.

    Copies of an activated model (``deepcopy``, ``pickle``) leave these hooks out
    (``_plain_model_state``); one copied some other way forgets its
    optimizer instead of dragging it (and its state) along.
    """

    def __init__(self, owner: DeepOptimizer, method: str) -> None:
        self.owner: DeepOptimizer | None = owner
        self.method = method

    # Never traced by torch.compile (the view swaps would be baked into graphs and
    # recompiled for every new perturbation): always run eagerly. torch._disable_dynamo,
    # as torch.optim uses it, imports torch._dynamo only on the first call.
    @torch._disable_dynamo
    def __call__(self, *args: Any) -> Any:
        if self.owner is not None:
            return getattr(self.owner, self.method)(*args)
        return None

    def __getstate__(self) -> dict:
        return {"method": self.method}

    def __setstate__(self, state: dict) -> None:
        self.owner, self.method = None, state["method"]


def _plain_model_state(model: nn.Module) -> dict:
    """The pickled state of an activated ``model``: a plain model, no trace of deepopt.

    Its weights are those ``model.state_dict()`` gives in the model's current mode (each
    optimizer activated on it puts its view in place, as before a ``state_dict()``).
    """
    hook_dicts = {k: d for k, d in vars(model).items() if "hooks" in k and isinstance(d, dict)}
    ours = {i for d in hook_dicts.values() for i, h in d.items() if isinstance(h, _ModelHook)}
    for hook in list(hook_dicts.get("_state_dict_pre_hooks", {}).values()):
        if isinstance(hook, _ModelHook):
            hook(model, "", False)
    state = type(model).__getstate__(model)
    state.pop("__getstate__", None)
    for name in hook_dicts.keys() & state.keys():  # keyed by hook id (with_kwargs, always_called too)
        state[name] = type(state[name])((i, h) for i, h in state[name].items() if i not in ours)
    return state


class DeepOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs the user's optimizer with deepopt's mechanisms.

    Built by :func:`deepopt.activate`; not meant to be constructed directly.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model, opt = deepopt.activate(model, opt, rho=0.05)
        >>> isinstance(opt, torch.optim.Optimizer), opt.param_groups is opt.optimizer.param_groups
        (True, True)
    """

    # GradScaler must unscale before calling step(); never hand it the fused path.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, settings: Settings) -> None:
        # No super().__init__(): the state lives in the base optimizer (accelerate's
        # pattern); __getattr__ forwards everything else, hook dicts included.
        self.optimizer = optimizer
        self.model = model
        # LBFGS-like optimizers run the closure inside their own step (see _closure_driven).
        self._closure_driven = needs_closure(optimizer)
        if self._closure_driven:
            settings = _closure_driven(settings, type(optimizer).__name__)
        self.settings = settings
        self.steps = 0
        self.calibrated: bool | None = None if settings.calibrate else False
        self.average = (
            WeightAverage(settings.average, settings.ema_decay, every=settings.average_every,
                          width=settings.average_width, follows_lr=settings.average_follows_lr)
            if settings.average
            else None
        )
        self.guard = DivergenceGuard(settings.max_skips) if settings.guard else None
        self.lookahead = Lookahead(settings.lookahead_k, settings.lookahead_alpha) if settings.lookahead_k else None
        # Seeded from the user's seed without drawing from (and so moving) the global RNG.
        self.noise = WeightNoise(settings.noise, torch.initial_seed()) if settings.noise else None
        self.looksam = LookSAM(settings.sam_every, settings.sam_reuse) if settings.sam_every > 1 else None
        self.dropout_match = DropoutMatch() if settings.dropout_match and has_dropout(model) else None
        self._last_batch: tuple[tuple, dict] | None = None  # dropout_match measures on it
        self._max_lr = 0.0
        self._last_lr: float | None = None  # LR of the last update (average_restart)
        self._last_grads: dict[Tensor, Tensor] = {}
        self._view = "train"
        self._shown: list[Tensor] = []
        self._backup: list[Tensor] = []
        self._hold = False  # mechanisms paused (inside calibration / two-pass SAM)
        self._sam_first_pass = False  # two-pass SAM's first forward is still to come
        self._pending_train_values: list[Tensor] | None = None
        self._param_cache: tuple[tuple, list[Tensor]] = ((), [])
        self._buffer_cache: list[Tensor] = []
        self._params_stale = False
        self._momentum: bool | None = None  # whether the base optimizer keeps a momentum
        self._warned_no_closure = False
        self._base_stepping = False  # inside this wrapper's own call of the base step
        self._handles = [
            model.register_forward_pre_hook(_ModelHook(self, "_on_forward"), with_kwargs=True),
            model.register_state_dict_pre_hook(_ModelHook(self, "_on_state_dict")),
            model.register_load_state_dict_post_hook(_ModelHook(self, "_on_model_loaded")),
        ]
        if self._perturbs:  # only a perturbing forward needs undoing when it raises
            self._handles += [
                model.register_forward_hook(_ModelHook(self, "_on_forward_done")),
                model.register_forward_hook(_ModelHook(self, "_on_forward_exit"), always_call=True),
            ]
        self._forward_ok = False
        self._buffer_snapshot: list[Tensor] = []
        self._snapshot_taken = False  # buffers saved since the last step (guard only)
        # torch.save(model) must load where deepopt is not installed: pickling the model
        # (and copy.deepcopy) goes through this instance attribute, which leaves out every
        # deepopt hook and shows the weights state_dict() would give.
        model.__dict__["__getstate__"] = functools.partial(_plain_model_state, model)

    @property
    def _has_eval_view(self) -> bool:
        """Whether ``model.eval()`` may show other weights than the training ones."""
        return self.average is not None or self.dropout_match is not None

    @property
    def _perturbs(self) -> bool:
        """Whether a training forward runs at perturbed weights."""
        return self.settings.rho > 0 or self.settings.noise > 0

    # -- what torch.optim.Optimizer users and schedulers touch ---------------------------
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes this object lacks: forward to the base optimizer.
        if name.startswith("__") or name == "optimizer" or "optimizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def __getstate__(self) -> dict:
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"DeepOptimizer({self.settings}, base={self.optimizer!r})"

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The perturbed view stays: zero_grad() between forward and backward is a common
        # idiom, and moving those weights then would break autograd. A model put back in
        # train() after evaluation gets its training weights here, before any user code
        # of the new iteration reads them.
        if self._view == "eval" and self.model.training and not self._hold:
            self._show("train")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- the step ------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """One optimizer step; ``closure`` enables exact two-pass SAM when ``sam_rho > 0``."""
        self._params_stale = True  # requires_grad may have changed since the last step
        if self._closure_driven:
            return self._closure_driven_step(closure, kwargs)
        if closure is not None and self.settings.sam_rho > 0:
            if self._sam_lr_in_range():
                return self._two_pass_step(closure, **kwargs)
        elif self.settings.sam_rho > 0 and not self._warned_no_closure:
            self._warned_no_closure = True
            say(f"two-pass SAM (sam_rho={self.settings.sam_rho}) acts only through "
                "optimizer.step(closure); this step() got no closure, so SAM is skipped (here and "
                "at every step without one). Pass a closure that zeroes the grads, computes the "
                "loss, calls backward and returns the loss.")
        loss = None
        try:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
        finally:
            self._show("train")
        if not self._finite(loss):
            return loss
        self._base_step(kwargs)
        self._after_update()
        return loss

    def _base_step(self, kwargs: dict, closure: Callable[[], Any] | None = None) -> Any:
        self._base_stepping = True
        try:
            return self.optimizer.step(**kwargs) if closure is None else self.optimizer.step(closure, **kwargs)
        finally:
            self._base_stepping = False

    def _closure_driven_step(self, closure: Callable[[], Any] | None, kwargs: dict) -> Any:
        """A step of an optimizer that calls the closure itself (LBFGS): hand it the closure.

        Its forwards start training forwards as usual (calibration, dropout-matched
        evaluation's batch); the perturbations and the guard are off (``_closure_driven``).
        """
        self._show("train")
        try:
            loss = self._base_step(kwargs, closure)  # without a closure, the base raises its own TypeError
        finally:
            self._show("train")
        self._after_update()
        return loss

    def _before_update(self, loss: Any = None) -> bool:
        """The pre-update part of :meth:`step` (no closure): training weights shown, guard check.

        Used when the base optimizer's own ``step`` is called (``deepopt run``); ``False``
        means the guard skips this update.
        """
        self._params_stale = True
        self._show("train")
        return self._finite(loss)

    def _sam_lr_in_range(self) -> bool:
        """Whether the LR, as a fraction of the largest so far, lies where SAM runs.

        That is ``[sam_lr_fraction, sam_lr_ceiling]``; the default ``[0, 1]`` is every LR.
        """
        lr = float(self.param_groups[0]["lr"])
        max_lr = max(self._max_lr, lr)
        return self.settings.sam_lr_fraction * max_lr <= lr <= self.settings.sam_lr_ceiling * max_lr

    def _two_pass_step(self, closure: Callable[[], Any], **kwargs: Any) -> Any:
        params = self._params()
        self._show("train")
        self._snapshot_buffers()  # the model hooks are on hold during the closures
        self._hold = True
        self._sam_first_pass = True  # ... but for what starts a training step (_on_forward)
        try:
            with torch.enable_grad():
                loss = closure()
            if not self._finite(loss):
                return loss
            with_grad = [p for p in params if p.grad is not None]
            look, ortho = self.looksam, None
            if look is not None and not look.exact_now() and (look.alpha == 0 or len(look.ortho) == len(with_grad)):
                if look.alpha > 0:  # one pass only; alpha 0 keeps the plain gradient
                    reuse_([p.grad for p in with_grad], look.ortho, look.alpha)
            else:
                ortho = self._sam_second_pass(closure, with_grad)
        finally:
            self._show("train")
            self._hold = self._sam_first_pass = False
        if not self._finite(None):
            return loss
        self._base_step(kwargs)
        self._after_update()
        if look is not None:
            look.ortho = look.ortho if ortho is None else ortho  # kept only from a finite step
            look.advance()
        return loss

    def _sam_second_pass(self, closure: Callable[[], Any], with_grad: list[Tensor]) -> list[Tensor] | None:
        """Leave in ``.grad`` the gradient at ``w + e``, ``e`` along the gradient at ``w``.

        Returns LookSAM's ``g_v`` when LookSAM is on (else ``None``).
        """
        grads = [p.grad for p in with_grad]
        rho = warmed_up(self.settings.sam_rho, self.steps, self.settings.sam_warmup)
        e = perturbation(grads, rho, weights=with_grad if self.settings.adaptive else None)
        clean = [g.clone() for g in grads] if self.looksam is not None and self.looksam.alpha > 0 else None
        buffers = self._buffers()
        saved_buffers = [b.clone() for b in buffers]
        try:
            self._enter(with_grad, "perturbed")
            with torch.no_grad():
                torch._foreach_add_(with_grad, e)
            self.optimizer.zero_grad()
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

    def _finite(self, loss: Any) -> bool:
        if self.guard is None:
            return True
        ok = loss is None or not isinstance(loss, Tensor) or bool(torch.isfinite(loss.detach()).all())
        ok = ok and all_finite([p.grad for p in self._params() if p.grad is not None])
        if not ok:
            self._restore_buffers()  # before record(), which may raise DivergenceError
        self.guard.record(ok)
        return ok

    def _snapshot_buffers(self) -> None:
        """Save the buffers before a step's first training forward, so a skipped step can undo it."""
        if self.guard is None or self._snapshot_taken:
            return
        buffers = self._buffers()
        if not buffers:
            self._snapshot_taken = True
            return
        with torch.no_grad():
            self._copy_snapshot(buffers)

    def _copy_snapshot(self, buffers: list[Tensor]) -> None:
        if len(self._buffer_snapshot) != len(buffers) or any(
            s.shape != b.shape or s.dtype != b.dtype or s.device != b.device
            for s, b in zip(self._buffer_snapshot, buffers)
        ):
            self._buffer_snapshot = [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._buffer_snapshot, [b.detach() for b in buffers])
        self._snapshot_taken = True

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        # A NaN batch would otherwise leave NaN running statistics in BatchNorm (and so in
        # every later evaluation) although its update was skipped.
        if self._snapshot_taken:
            buffers = self._buffers()
            if len(buffers) == len(self._buffer_snapshot) and buffers:
                torch._foreach_copy_(buffers, self._buffer_snapshot)
        self._snapshot_taken = False

    @torch.no_grad()
    def _after_update(self) -> None:
        self.steps += 1
        self._snapshot_taken = False
        self._pending_train_values = None
        lr = float(self.param_groups[0]["lr"])
        self._max_lr = max(self._max_lr, lr)
        self._last_lr = lr
        if self.lookahead is not None:
            self.lookahead.after_step(self._params())
        if self.average is not None:
            self.average.update(self._eval_targets(), lr=lr, max_lr=self._max_lr)
        if self.settings.rho > 0:
            if self._momentum is None:
                self._momentum = any(direction(s)[0] is not None for s in self.optimizer.state.values())
            if not self._momentum:
                self._last_grads = {p: p.grad.clone() for p in self._params() if p.grad is not None}

    # -- views ---------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        # Rebuilt only when the groups change (add_param_group, load_state_dict): this
        # runs several times per step.
        groups = self.param_groups
        key = (id(groups), *(id(g["params"]) for g in groups), *(len(g["params"]) for g in groups))
        if key != self._param_cache[0]:
            self._buffer_cache = list(self.model.buffers())
        if key != self._param_cache[0] or self._params_stale:
            self._param_cache = (key, [p for g in groups for p in g["params"] if p.requires_grad])
            self._params_stale = False
        return self._param_cache[1]

    def _buffers(self) -> list[Tensor]:
        """The model's buffers, listed when the parameter list is (walking modules is slow)."""
        self._params()
        return self._buffer_cache

    def _eval_targets(self) -> list[Tensor]:
        return self._params() + self._buffers()

    @torch.no_grad()
    def _enter(self, tensors: list[Tensor], view: str) -> None:
        """Save ``tensors`` (the training values) so leaving ``view`` can copy them back."""
        if len(self._backup) != len(tensors) or any(
            b.shape != t.shape or b.dtype != t.dtype for b, t in zip(self._backup, tensors)
        ):
            self._backup = [t.detach().clone() for t in tensors]
        else:
            torch._foreach_copy_(self._backup, [t.detach() for t in tensors])
        self._shown, self._view = tensors, view

    def _show(self, view: str) -> None:
        if view == self._view:  # the common case, kept cheap: no grad-mode switch
            return
        with torch.no_grad():
            self._switch(view)

    def _switch(self, view: str) -> None:
        if self._view != "train":
            torch._foreach_copy_(self._shown, self._backup)
            self._view, self._shown = "train", []
        if view == "perturbed":
            self._perturb()
        elif view == "eval":
            targets = self._eval_targets()
            if self.average is not None and self.average.tensors is not None:
                if len(targets) == len(self.average.tensors):
                    self._enter(targets, "eval")
                    torch._foreach_copy_(targets, self.average.tensors)
            if self.dropout_match is not None:
                self._match_dropout(targets)

    def _match_dropout(self, targets: list[Tensor]) -> None:
        """Rescale the evaluation weights shown to match dropout, measured once per step count."""
        match = self.dropout_match
        measure = match.step != self.steps and self._last_batch is not None
        if not measure and not match.keep:  # every eval forward passes here: keep it cheap
            return
        model = getattr(self.model, "_orig_mod", self.model)
        layers = weighted_layers(model, {id(p) for p in self._params()})
        if measure:
            self._hold = True
            cuda = sorted({t.device.index or 0 for t in targets if t.is_cuda})
            try:
                # The dropout samples must not move the user's RNG (the training trajectory).
                with torch.random.fork_rng(devices=cuda):
                    match.scales, match.keep = matched_scales(model, *self._last_batch, layers=layers)
                match.step = self.steps
            except Exception as e:  # noqa: BLE001 - the user's evaluation must go on
                # A model that cannot run a training batch in eval mode: evaluate it plainly.
                self.dropout_match = None
                warnings.warn(
                    f"deepopt: dropout-matched evaluation is off for this run: the model raised "
                    f"{type(e).__name__}: {e} on its last training batch in eval mode. Evaluation "
                    "uses the plain weights; pass dropout_match=False to activate() to silence this.",
                    stacklevel=2,
                )
                return
            finally:
                self._hold = False
        if match.keep:
            if self._view != "eval":
                self._enter(targets, "eval")
            match.apply_(layers)

    def _perturb(self) -> None:
        s = self.settings
        lr = float(self.param_groups[0]["lr"])
        max_lr = max(self._max_lr, lr)  # stored by _after_update: a skipped step leaves no trace
        rho = s.rho * (lr / max_lr if s.rho_follows_lr and max_lr > 0 else 1.0)
        params, dirs, sign = [], [], 1.0
        for p in self._params() if rho > 0 else []:
            d, d_sign = direction(self.optimizer.state.get(p, {}))
            if d is None:
                d, d_sign = self._last_grads.get(p), 1.0
            if d is not None:
                params.append(p)
                dirs.append(d)
                sign = d_sign
        noisy = self._params() if self.noise is not None else []
        if not params and not noisy:
            return
        # Noise is scaled by the clean weights: drawn before the momentum moves them.
        noise = self.noise.sample(noisy) if self.noise is not None else []
        self._enter(noisy or params, "perturbed")  # noisy, when set, holds every param
        if params:
            sign = abs(sign) if s.ascent else sign
            if s.adaptive:
                torch._foreach_add_(params, perturbation(dirs, rho, weights=params), alpha=sign)
            else:  # same maths as perturbation(), without allocating e
                torch._foreach_add_(params, dirs, alpha=sign * unit_scale(dirs, rho))
        if noisy:
            torch._foreach_add_(noisy, noise)

    # -- model hooks ---------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grad = torch.is_grad_enabled()
        if self._hold:
            # Two-pass SAM holds the views, but its first forward still starts a training
            # step: without this, step(closure) would never calibrate or match dropout.
            if self._sam_first_pass and grad and module.training:
                self._sam_first_pass = False
                self._start_training_forward(module, args, kwargs)
            return
        if not module.training:
            self._show("eval")
            return
        if grad:
            self._start_training_forward(module, args, kwargs)
        self._params_stale = True  # requires_grad may have changed since the last forward
        self._show("perturbed" if grad and self._perturbs else "train")
        if grad:
            self._snapshot_buffers()
        self._forward_ok = False

    def _start_training_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """What the first training forward of a step does, whichever way the step runs."""
        if self.calibrated is None:
            self._calibrate(module, args, kwargs)
        if self.settings.average_restart:
            self._restart_from_average()
        if self.dropout_match is not None:
            # An epoch's short last batch would make a noisy measurement: keep the one
            # before it (any training inputs will do; the weights measured are current).
            if self._last_batch is None or 2 * batch_size(args, kwargs) >= batch_size(*self._last_batch):
                self._last_batch = (args, kwargs)

    def _on_forward_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._forward_ok = True

    def _on_forward_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Registered with always_call: reached without _on_forward_done only if forward raised.
        if not self._forward_ok and self._view == "perturbed" and not self._hold:
            self._show("train")
        self._forward_ok = False

    def _on_state_dict(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        if not self._hold:
            self._show("train" if module.training else "eval")

    def _on_model_loaded(self, module: nn.Module, incompatible_keys: Any) -> None:
        # The loaded values are now the truth for whatever view was shown.
        self._view, self._shown = "train", []
        self._snapshot_taken = False
        if self._pending_train_values is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._eval_targets(), self._pending_train_values)
        elif self.average is not None:
            self.average.tensors = None  # new weights: the average restarts from them
        if self.dropout_match is not None and self._pending_train_values is None:
            self.dropout_match.step = -1  # new weights: measure again

    @torch.no_grad()
    def _restart_from_average(self) -> None:
        """At an LR change, continue training from the averaged weights (before this forward)."""
        lr = float(self.param_groups[0]["lr"])
        if self._last_lr is None or lr == self._last_lr or self.average is None:
            return
        self._last_lr = lr
        targets = self._eval_targets()
        if self.average.tensors is not None and len(targets) == len(self.average.tensors):
            self._show("train")
            torch._foreach_copy_(targets, self.average.tensors)

    @torch.no_grad()
    def _calibrate(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Measuring must not change the trajectory of a net that needs no calibration:
        # keep the RNG (dropout) and the BatchNorm running statistics as they were.
        held, self._hold = self._hold, True
        rng = torch.get_rng_state()
        buffers = list(module.buffers())
        saved = [b.clone() for b in buffers]
        try:
            # A torch.compile'd module is measured through its original module, eagerly.
            target = getattr(module, "_orig_mod", module)
            # None: the batch gave non-finite activations; decide on the next batch.
            self.calibrated = calibrate_(target, args, kwargs, self.settings.calibrate_threshold)
        finally:
            torch.set_rng_state(rng)
            for b, s in zip(buffers, saved):
                b.copy_(s)
            self._hold = held

    # -- checkpoints ---------------------------------------------------------------------
    def _train_values(self) -> list[Tensor]:
        """Training values of parameters and buffers, whatever view is shown."""
        shown = {id(t): i for i, t in enumerate(self._shown)}
        return [
            self._backup[shown[id(t)]].clone() if id(t) in shown else t.detach().clone()
            for t in self._eval_targets()
        ]

    def state_dict(self) -> dict:  # type: ignore[override]
        """The base optimizer's state dict plus a ``"deepopt"`` entry with deepopt's state."""
        state = self.optimizer.state_dict()
        state["deepopt"] = self._deepopt_state()
        return state

    def _deepopt_state(self) -> dict:
        params = self._params()
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "calibrated": self.calibrated,
            "max_lr": self._max_lr,
            "last_lr": self._last_lr,
            "average": None if self.average is None else self.average.state_dict(),
            "guard": None if self.guard is None else self.guard.state_dict(),
            "lookahead": None if self.lookahead is None else self.lookahead.state_dict(),
            "noise": None if self.noise is None else self.noise.state_dict(),
            "looksam": None if self.looksam is None else self.looksam.state_dict(),
            "dropout_match": None if self.dropout_match is None else self.dropout_match.state_dict(),
            "last_grads": [self._last_grads.get(p) for p in params] if self._last_grads else None,
            # model.state_dict() may hold the evaluation weights; resuming needs these.
            "train_values": self._train_values() if self._has_eval_view else None,
        }

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Load a state saved by :meth:`state_dict` (or a plain optimizer state dict)."""
        state_dict = dict(state_dict)
        deep = state_dict.pop("deepopt", None)
        # Checked before anything is loaded: a refused checkpoint leaves this optimizer as it was.
        check_state_version(deep)
        self.optimizer.load_state_dict(state_dict)
        if deep is not None:
            self._load_deepopt_state(deep)

    def _load_deepopt_state(self, deep: dict) -> None:
        self._show("train")
        self._snapshot_taken = False
        params = self._params()
        self.steps = int(deep["steps"])
        self.calibrated = deep["calibrated"] if self.settings.calibrate else False
        self._max_lr = float(deep["max_lr"])
        self._last_lr = deep.get("last_lr")
        if self.average is not None and deep["average"] is not None:
            self.average.load_state_dict(deep["average"])
        if self.guard is not None and deep["guard"] is not None:
            self.guard.load_state_dict(deep["guard"])
        if self.lookahead is not None and deep.get("lookahead") is not None:
            self.lookahead.load_state_dict(deep["lookahead"])
        if self.noise is not None and deep.get("noise") is not None:
            self.noise.load_state_dict(deep["noise"])
        if self.looksam is not None and deep.get("looksam") is not None:
            self.looksam.load_state_dict(deep["looksam"])
        if self.dropout_match is not None and deep.get("dropout_match") is not None:
            self.dropout_match.load_state_dict(deep["dropout_match"])
        grads = deep["last_grads"] or []
        self._last_grads = {p: g.clone() for p, g in zip(params, grads) if g is not None}
        values = deep["train_values"]
        if values is not None and self._has_eval_view:
            with torch.no_grad():
                torch._foreach_copy_(self._eval_targets(), values)
            self._pending_train_values = [v.clone() for v in values]

    # -- undo ----------------------------------------------------------------------------
    def detach(self) -> torch.optim.Optimizer:
        """Remove deepopt from the model (training weights shown) and return the base optimizer."""
        self._show("train")
        for h in self._handles:
            h.remove()
        self._handles = []
        hooks = [h for k, d in vars(self.model).items() if "hooks" in k and isinstance(d, dict) for h in d.values()]
        if not any(isinstance(h, _ModelHook) for h in hooks):  # another optimizer's may remain
            self.model.__dict__.pop("__getstate__", None)
        if getattr(self.optimizer, "_deepopt_wrapper", None) is self:
            del self.optimizer._deepopt_wrapper
        return self.optimizer


def check_state_version(deep: Any) -> None:
    """Refuse a ``"deepopt"`` state entry written in another format version."""
    version = deep.get("version") if isinstance(deep, dict) else None
    if deep is not None and version != STATE_VERSION:
        raise ValueError(
            f"optimizer state has deepopt format version {version!r}; this deepopt reads "
            f"version {STATE_VERSION}. Load it with the deepopt release that saved it, or "
            "load only the base optimizer state (drop the 'deepopt' key) to restart deepopt's state."
        )
