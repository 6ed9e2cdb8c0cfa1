"""How deepopt sits on the user's model: hooks that survive copies, and plain pickles.

``DeepOptimizer`` registers its model hooks as :class:`ModelHook` objects; pickling an
activated model (``torch.save(model)``, ``copy.deepcopy``) goes through
:func:`plain_model_state`, which leaves every deepopt hook out, so the file loads where
deepopt is not installed.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn

__all__ = ["say", "needs_closure", "ModelHook", "plain_model_state", "has_model_hooks"]


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


class ModelHook:
    """Callable stored in the model's hook dicts; inert once copied or unpickled.

    Copies of an activated model (``deepcopy``, ``pickle``) leave these hooks out
    (:func:`plain_model_state`); one copied some other way forgets its optimizer instead
    of dragging it (and its state) along.
    """

    def __init__(self, owner: Any, method: str) -> None:
        self.owner: Any = owner
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


def _hook_dicts(model: nn.Module) -> dict[str, dict]:
    return {k: d for k, d in vars(model).items() if "hooks" in k and isinstance(d, dict)}


def has_model_hooks(model: nn.Module) -> bool:
    """Whether some activation's hooks are still on ``model``."""
    return any(isinstance(h, ModelHook) for d in _hook_dicts(model).values() for h in d.values())


def plain_model_state(model: nn.Module) -> dict:
    """The pickled state of an activated ``model``: a plain model, no trace of deepopt.

    Its weights are those ``model.state_dict()`` gives, the evaluation weights (each
    optimizer activated on it puts its view in place, as before a ``state_dict()``).
    """
    hook_dicts = _hook_dicts(model)
    ours = {i for d in hook_dicts.values() for i, h in d.items() if isinstance(h, ModelHook)}
    for hook in list(hook_dicts.get("_state_dict_pre_hooks", {}).values()):
        if isinstance(hook, ModelHook):
            hook(model, "", False)
    state = type(model).__getstate__(model)
    state.pop("__getstate__", None)
    for name in hook_dicts.keys() & state.keys():  # keyed by hook id (with_kwargs, always_called too)
        state[name] = type(state[name])((i, h) for i, h in state[name].items() if i not in ours)
    return state
