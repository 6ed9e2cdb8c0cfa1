"""Zero-code activation: ``deepopt run -- python train.py ARGS`` (see :mod:`deepopt.cli`).

:func:`install` makes every optimizer built afterwards get deepopt while the script keeps
using its own optimizer object (``opt.step()``, ``opt.state_dict()``):

* each ``torch.optim.Optimizer`` is remembered when it is built;
* at the first forward of a module holding all of its parameters (the outermost module
  called: its hooks run first), ``deepopt.activate(module, optimizer)`` is called and one
  line goes to stderr;
* torch's global optimizer step hooks then run the wrapper's pre-update part (training
  weights shown, guard check; a skipped update runs the base step with no gradients, so it
  changes nothing) and post-update part around the script's own ``opt.step()``;
* the optimizer's ``state_dict()`` gains the ``"deepopt"`` entry and its
  ``load_state_dict()`` restores it (also when loaded before the first forward).

An optimizer first stepped with ``opt.step(closure)`` activates at the first forward
inside its closure. Whatever cannot act is said once, in one line: the divergence guard
on ``opt.step(closure)`` and two-pass SAM (the closure runs inside the base step, after
the hooks), an optimizer never activated, and a script that builds no optimizer at all
(said at its first backward, else at exit).

Limits: the forward that activates calibrates with its positional arguments only;
optimizers that are not ``torch.optim.Optimizer`` subclasses calling
``Optimizer.__init__`` are not seen. An explicit ``deepopt.activate(model, opt)`` in the
script takes precedence over the launcher.
"""

from __future__ import annotations

import atexit
import json
import os
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .hooks import say
from .optimizer import DeepOptimizer, check_state_version
from .recipes import resolve

__all__ = ["ENV", "install", "install_from_env", "uninstall"]

ENV = "DEEPOPT_RUN"

_config: dict[str, Any] | None = None
_pending: list[weakref.ref] = []  # optimizers built, not yet activated
_handles: list[Any] = []
_original_init: Any = None
_loaded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # deepopt state loaded early
_skipped: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # grads hidden for a skip
_closure_told: weakref.WeakSet = weakref.WeakSet()  # told what does not act on step(closure)
_zero_code_wrappers: weakref.WeakSet = weakref.WeakSet()  # the wrappers this launcher activated
_built = False  # whether the script built any optimizer
_told_none = False  # whether "no optimizer built" was said
_activating = False  # inside _activate (whose calibration runs forwards)
_autograd_backward = torch.autograd.backward  # torch's, restored at the first backward


def install(recipe: str = "default", enabled: bool = True, **overrides: Any) -> None:
    """Activate deepopt on every optimizer built from now on (see the module docstring).

    ``enabled=False`` installs nothing and prints ``deepopt: off (A/B twin run)``.
    """
    global _config, _original_init
    resolve(recipe, overrides)  # a typo fails here, before the script runs
    if not enabled:
        say("off (A/B twin run)")
        return
    if _config is not None:
        uninstall()
    _config = {"recipe": recipe, "overrides": dict(overrides)}
    _original_init = torch.optim.Optimizer.__init__
    original = _original_init

    def __init__(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if _config is not None and not isinstance(self, DeepOptimizer):
            _track(self)

    torch.optim.Optimizer.__init__ = __init__  # type: ignore[method-assign]
    # A script that updates its weights by hand (p.data.add_(...)) builds no optimizer:
    # torch has no hook on such an update, so the first backward is where it is said.
    # Tensor.backward calls torch.autograd.backward; the wrapper removes itself there.
    torch.autograd.backward = _first_backward
    atexit.register(_at_exit)
    _handles.extend([
        nn.modules.module.register_module_forward_pre_hook(_on_forward),
        register_optimizer_step_pre_hook(_on_step_pre),
        register_optimizer_step_post_hook(_on_step_post),
    ])


def uninstall() -> None:
    """Undo :func:`install` for optimizers built later (activated ones stay activated)."""
    global _config
    if _original_init is not None:
        torch.optim.Optimizer.__init__ = _original_init  # type: ignore[method-assign]
    if torch.autograd.backward is _first_backward:
        torch.autograd.backward = _autograd_backward
    atexit.unregister(_at_exit)
    for h in _handles:
        h.remove()
    _handles.clear()
    _pending.clear()
    _config = None


def install_from_env() -> None:
    """:func:`install` with the settings ``deepopt run`` puts in ``$DEEPOPT_RUN`` (JSON)."""
    cfg = json.loads(os.environ.get(ENV) or "{}")
    install(cfg.get("recipe", "default"), cfg.get("enabled", True), **cfg.get("overrides", {}))


def _first_backward(*args: Any, **kwargs: Any) -> Any:
    if torch.autograd.backward is _first_backward:  # once is enough: no cost on later backwards
        torch.autograd.backward = _autograd_backward
    if not _built and _config is not None:
        _tell_none("before the first backward")
    return _autograd_backward(*args, **kwargs)


def _tell_none(when: str) -> None:
    global _told_none
    if not _told_none:
        _told_none = True
        say(f"nothing activated: the script built no torch.optim optimizer {when} (deepopt acts "
            "through one; weights updated by hand, e.g. p.data.add_(...), train as plain PyTorch).")


def _at_exit() -> None:
    if _config is None:
        return
    if not _built:
        _tell_none("in its whole run")
    for ref in list(_pending):
        opt = ref()
        if opt is not None and "_deepopt_wrapper" not in opt.__dict__:
            say(f"not activated on {type(opt).__name__}: no module holding all its parameters "
                "was called while it existed.")
    _pending.clear()


def _track(opt: torch.optim.Optimizer) -> None:
    global _built
    _built = True
    _pending.append(weakref.ref(opt))
    opt.register_state_dict_post_hook(_on_state_dict)
    opt.register_load_state_dict_pre_hook(_on_load_pre)
    opt.register_load_state_dict_post_hook(_on_load_post)


def _zero_code(opt: torch.optim.Optimizer) -> DeepOptimizer | None:
    w = opt.__dict__.get("_deepopt_wrapper")
    return w if w is not None and w in _zero_code_wrappers else None


def _opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _on_forward(module: nn.Module, args: tuple) -> None:
    global _activating
    if not _pending or _activating:  # calibration's own forwards must not activate others
        return
    module_ids = None
    for ref in list(_pending):
        opt = ref()
        if opt is None or "_deepopt_wrapper" in opt.__dict__:  # gone, or activated explicitly
            _pending.remove(ref)
            continue
        if module_ids is None:
            module_ids = {id(p) for p in module.parameters()}
        params = _opt_params(opt)
        if params and all(id(p) in module_ids for p in params):
            _pending.remove(ref)
            _activating = True
            try:
                _activate(module, opt, params, args)
            finally:
                _activating = False


def _activate(module: nn.Module, opt: torch.optim.Optimizer, params: list, args: tuple) -> None:
    import deepopt

    assert _config is not None
    recipe, overrides = _config["recipe"], _config["overrides"]
    name, model_name = type(opt).__name__, type(module).__name__
    try:
        _, wrapper = deepopt.activate(module, opt, recipe=recipe, **overrides)
    except ValueError as e:
        say(f"not activated on {name} ({model_name}): {e}")
        return
    _zero_code_wrappers.add(wrapper)
    deep = _loaded.pop(opt, None)
    if deep is not None:
        wrapper.load_deepopt_state(deep)
    extra = "".join(f" {k}={v}" for k, v in overrides.items())
    n = sum(p.numel() for p in params)
    say(f"activated {name} on {model_name} ({len(params)} tensors, {n} parameters), recipe={recipe}{extra}")
    # The hooks just registered on the model miss this call's pre-hooks: run that one now.
    wrapper.forward_started(module, args, {})


def _closure(args: tuple, kwargs: dict) -> Any:
    return args[1] if len(args) > 1 else kwargs.get("closure")


def _drop_pending(opt: torch.optim.Optimizer, when: str) -> None:
    for ref in list(_pending):
        if ref() is opt:
            _pending.remove(ref)
            say(f"not activated on {type(opt).__name__}: no module holding all its parameters "
                f"was called {when}; call the model (not only its parts) before stepping, or add "
                "`model, optimizer = deepopt.activate(model, optimizer)` to the script.")


def _on_step_pre(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    # With a closure, the forward may come inside the step (LBFGS): it may activate there.
    if _pending and _closure(args, kwargs) is None:
        _drop_pending(opt, "before its first step")
    w = _zero_code(opt)
    if w is None or w.base_stepping:
        return
    if _closure(args, kwargs) is not None:  # grads come later, inside the base step
        w.show("train")
        return
    if not w.before_update(None):
        params = _opt_params(opt)
        _skipped[opt] = [p.grad for p in params]
        for p in params:
            p.grad = None  # the base step then changes nothing


def _on_step_post(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    if _pending:
        _drop_pending(opt, "before or inside its first step(closure)")
    w = _zero_code(opt)
    if w is None or w.base_stepping:
        return
    if _closure(args, kwargs) is not None and opt not in _closure_told:
        _closure_told.add(opt)
        for m in (m for m in w.mechanisms if m.name == "guard" or m.needs_closure):
            say(f"{m.label} does not act on {type(opt).__name__}.step(closure) under deepopt "
                "run (the closure runs inside torch's step, after deepopt's hook); add `model, optimizer "
                "= deepopt.activate(model, optimizer)` to the script for it.")
    grads = _skipped.pop(opt, None)
    if grads is not None:
        for p, g in zip(_opt_params(opt), grads):
            p.grad = g
        return
    w.after_update()


def _on_state_dict(opt: torch.optim.Optimizer, state: dict) -> dict:
    w = _zero_code(opt)
    if w is not None and "deepopt" not in state:
        state["deepopt"] = w.deepopt_state()
    return state


def _on_load_pre(opt: torch.optim.Optimizer, state: dict) -> dict | None:
    if "deepopt" not in state:
        return None
    state = dict(state)
    deep = state.pop("deepopt")
    check_state_version(deep)
    if opt.__dict__.get("_deepopt_wrapper") is None or _zero_code(opt) is not None:
        _loaded[opt] = deep
    return state


def _on_load_post(opt: torch.optim.Optimizer) -> None:
    w = _zero_code(opt)
    deep = _loaded.pop(opt, None) if w is not None else None
    if deep is not None:
        w.load_deepopt_state(deep)  # type: ignore[union-attr]
