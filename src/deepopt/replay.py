"""Replay the user's own loss: a second pass for SAM in loops that pass no closure.

Two-pass SAM needs the gradient of the *same* loss at ``w + e``. A loop of the form
``loss.backward(); optimizer.step()`` never hands that loss to the optimizer, but it is
built in front of deepopt's eyes. :class:`LoopRecorder` watches one optimizer's loop
between two steps and, at the step, rebuilds a closure that computes exactly the loss the
user called ``backward()`` on, or says why it cannot:

* every ``backward()`` since the gradients were last cleared had, as its root, the loss of
  a training forward of the model recorded in that interval: the model's output itself
  (a scalar), a scalar held in its output (``out.loss``, ``out["loss"]``, ``out[1]``), or
  ``criterion(out, ...)`` for an ``nn.Module`` called with the output as its first
  argument; times or divided by constants (``loss / accumulation_steps``,
  ``scaler.scale(loss)``);
* nothing touched the gradients after the last backward but ``clip_grad_norm_``,
  ``clip_grad_value_`` (called through ``torch.nn.utils``), accelerate's
  ``Accelerator.clip_grad_norm_`` (the HF Trainer's) and ``GradScaler.unscale_``, which the
  replay repeats; the gradients' version counters prove it.

A loss with a penalty term, a functional loss, several outputs combined, ``backward`` with
``inputs=`` or ``create_graph=True``, or gradients changed some other way, fail the check:
there is no replay, and the caller says why.

The replay runs the recorded forwards in their order with the same arguments, so dropout
and other random draws continue from the state the user's pass left, as a second call of
an explicit closure would. Watching costs two identity checks per module call, and a
look at each gradient's version counter per ``backward()``.

To see ``backward()``, clipping and unscaling, :func:`watch` wraps
``torch.autograd.backward``, ``torch.nn.utils.clip_grad_norm_``/``clip_grad_value_`` and
``torch.amp.GradScaler.unscale_`` while a recorder is alive; each wrapper passes the call
through unchanged.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> recorder = LoopRecorder(model, lambda: list(model.parameters()))
    >>> criterion = torch.nn.CrossEntropyLoss()
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    >>> criterion(model(x), y).backward()
    >>> closure, what = recorder.replay()
    >>> what
    'loss = CrossEntropyLoss(model(...), ...)'
    >>> first = [p.grad.clone() for p in model.parameters()]
    >>> model.zero_grad(); _ = closure()
    >>> all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters()))
    True
    >>> recorder.close()
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .hooks import ModelHook

__all__ = ["LoopRecorder", "watch", "unwatch"]

_recorders: weakref.WeakSet = weakref.WeakSet()
_originals: dict[tuple[Any, str], Any] = {}
_replaying = False  # inside a replay: its own calls are not the user's
_inside = False  # inside a watched call (accelerate's clipping calls torch's)


# -- the wrappers around torch's functions -------------------------------------------------
def _targets() -> list[tuple[Any, str]]:
    from torch.nn.utils import clip_grad

    targets = [(torch.autograd, "backward"), (torch.nn.utils, "clip_grad_norm_"), (clip_grad, "clip_grad_norm_"),
               (torch.nn.utils, "clip_grad_value_"), (clip_grad, "clip_grad_value_"),
               (torch.amp.GradScaler, "unscale_")]
    accelerate = sys.modules.get("accelerate")  # the HF Trainer clips through it
    if accelerate is not None:
        targets.append((accelerate.Accelerator, "clip_grad_norm_"))
    return targets


def watch() -> None:
    """Wrap torch's ``backward``, gradient clipping and ``GradScaler.unscale_`` (idempotent)."""
    for owner, name in _targets():
        if (owner, name) in _originals:
            continue
        original = getattr(owner, name)
        _originals[(owner, name)] = original
        setattr(owner, name, _wrap(original, name))


def unwatch() -> None:
    """Put torch's own functions back (where nobody wrapped them again since)."""
    for (owner, name), original in list(_originals.items()):
        if getattr(getattr(owner, name), "__wrapped__", None) is original:
            setattr(owner, name, original)
        del _originals[(owner, name)]


def _wrap(original: Callable, name: str) -> Callable:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _inside
        if _replaying or _inside or not _recorders:  # a watched call inside one is part of it
            return original(*args, **kwargs)
        # A generator is used up once: keep its items for the replay.
        args = tuple(list(a) if isinstance(a, types.GeneratorType) else a for a in args)
        listening = [(r, r.before_call(name, args, kwargs)) for r in list(_recorders)]
        _inside = True
        try:
            result = original(*args, **kwargs)
        finally:
            _inside = False
        for r, untouched in listening:
            r.after_call(name, original, args, kwargs, untouched)
        return result

    return wrapper


def _forget(handle: Any) -> None:
    """A recorder was collected without :meth:`LoopRecorder.close`: remove its hook, and put
    torch's functions back if it was the last."""
    handle.remove()
    if not list(_recorders):
        unwatch()


class _EveryModuleHook:
    """The process-wide module forward hook of one recorder: holds it weakly, so a recorder
    nobody references is collected and its hook removed, and is never traced by torch.compile."""

    def __init__(self, recorder: LoopRecorder) -> None:
        self.recorder = weakref.ref(recorder)

    @torch._disable_dynamo
    def __call__(self, module: nn.Module, args: tuple, out: Any) -> None:
        recorder = self.recorder()
        if recorder is not None:
            recorder._any_forward(module, args, out)


# -- what a loss is built from -------------------------------------------------------------
def _find(out: Any, loss: Tensor) -> tuple | None:
    """Where ``loss`` sits in a model output: ``()`` (the output), an index, a key, a field."""
    if out is loss:
        return ()
    if isinstance(out, (tuple, list)):
        return next(((i,) for i, v in enumerate(out) if v is loss), None)
    if isinstance(out, Mapping):
        return next((("key", k) for k, v in out.items() if v is loss), None)
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return next((("attr", f.name) for f in dataclasses.fields(out) if getattr(out, f.name, None) is loss), None)
    return ("attr", "loss") if getattr(out, "loss", None) is loss else None


def _take(out: Any, path: tuple) -> Any:
    if not path:
        return out
    if path[0] == "key":
        return out[path[1]]
    if path[0] == "attr":
        return getattr(out, path[1])
    return out[path[0]]


def _constants(root: Tensor, losses: dict[int, Any]) -> tuple[Any, list] | None:
    """``(loss entry, [(op, constant), ...])`` if ``root`` is a recorded loss times/divided by constants."""
    node, ops = root.grad_fn, []
    while node is not None and id(node) not in losses:
        kind = type(node).__name__
        nexts = [n for n, _ in node.next_functions]
        if kind not in ("MulBackward0", "DivBackward0") or len(nexts) != 2 or (nexts[0] is None) == (nexts[1] is None):
            return None
        if nexts[1] is None:
            constant = node._saved_other
        elif kind == "MulBackward0":  # c * loss
            constant = node._saved_self
        else:
            return None  # c / loss
        if constant.requires_grad:
            return None
        ops.append((kind, constant))
        node = nexts[0] if nexts[1] is None else nexts[1]
    if node is None:
        return None
    return losses[id(node)], ops[::-1]


def _apply(loss: Tensor, ops: list) -> Tensor:
    for kind, c in ops:
        # A Python number was saved as a 0-dim float64 tensor: use it as a number again so
        # that type promotion (and so every bit of the result) is the user's.
        c = c.item() if c.dim() == 0 and c.dtype != loss.dtype else c
        loss = loss * c if kind == "MulBackward0" else loss / c
    return loss


def _scalars(out: Any) -> list[Tensor]:
    """The scalar tensors that require grad in a model output (a loss it returns)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        values = [getattr(out, f.name, None) for f in dataclasses.fields(out)]
    else:
        values = [getattr(out, "loss", None)]
    return [v for v in values if isinstance(v, Tensor)]


def _is_loss(t: Any) -> bool:
    return isinstance(t, Tensor) and t.dim() == 0 and t.requires_grad and t.grad_fn is not None


@dataclasses.dataclass(eq=False)
class _Forward:
    """One training forward of the model: its arguments, output and the criteria called on it."""

    args: tuple
    kwargs: dict
    out: Any = None
    criteria: list = dataclasses.field(default_factory=list)  # (module, other args, loss)


@dataclasses.dataclass(eq=False)
class _Pass:
    """How one ``backward()`` root was built: ``constants`` applied to ``criterion(out, *rest)``
    or to the scalar at ``path`` in the output."""

    forward: _Forward
    criterion: nn.Module | None
    rest: tuple
    path: tuple
    constants: list

    def loss(self, out: Any) -> Tensor:
        return self.criterion(out, *self.rest) if self.criterion is not None else _take(out, self.path)

    def describe(self) -> str:
        if self.criterion is not None:
            return f"{type(self.criterion).__name__}(model(...), ...)"
        if not self.path:
            return "model(...)"
        kind, key = (self.path + (None,))[:2] if self.path[0] in ("key", "attr") else ("index", self.path[0])
        return "model(...)" + {"key": f"[{key!r}]", "attr": f".{key}", "index": f"[{key}]"}[kind]


class LoopRecorder:
    """Watches one model's training loop between two optimizer steps; see the module docstring.

    Args:
        model: the model whose training forwards are recorded (hooks registered on it).
        params: returns the parameters whose gradients the step uses.
        pre_hook: register a forward pre-hook that calls :meth:`forward_started`; ``False``
            when the caller calls it (deepopt's optimizer, whose own pre-hook a launcher
            may call for a forward that started before activation).
    """

    def __init__(self, model: nn.Module, params: Callable[[], list[Tensor]], pre_hook: bool = True) -> None:
        self.model, self.params = model, params
        self._model_modules = {id(m) for m in model.modules()}
        self.clear()
        # ModelHooks: a pickled or copied model leaves them out (deepopt.hooks).
        self._handles = [
            model.register_forward_hook(ModelHook(self, "_forward_done")),
            nn.modules.module.register_module_forward_hook(_EveryModuleHook(self)),
        ]
        # The process-wide hook must not keep an unreferenced recorder (and its model) alive.
        weakref.finalize(self, _forget, self._handles[1])
        if pre_hook:
            self._handles.append(model.register_forward_pre_hook(ModelHook(self, "forward_started"), with_kwargs=True))
        _recorders.add(self)
        watch()

    def close(self) -> None:
        """Stop watching (remove the hooks; torch's functions come back with the last recorder)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        _recorders.discard(self)
        if not _recorders:
            unwatch()
        self.clear()

    def clear(self) -> None:
        """Forget what was recorded (after a step, or when the gradients were cleared)."""
        self.pending: list[_Forward] = []  # training forwards no backward went through yet
        self.passes: list[_Pass] = []  # one per backward(), in order
        self.after: list[tuple] = []  # gradient transforms since the last backward, to repeat
        self.problem: str | None = None  # why this interval cannot be replayed
        self.found_inf = False  # the last replay's unscale met an inf or NaN
        self._grads: list[tuple] = []  # (param, grad, version) as the last watched call left them

    # -- watching ------------------------------------------------------------------------------
    def forward_started(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward of the model starts (recorded if it is a training forward)."""
        if not _replaying and module.training and torch.is_grad_enabled():
            self.pending.append(_Forward(args, dict(kwargs)))

    def _forward_done(self, module: nn.Module, args: tuple, out: Any) -> None:
        # A forward deepopt runs inside the user's (calibration's) has grad disabled.
        if not _replaying and self.pending and self.pending[-1].out is None and torch.is_grad_enabled():
            self.pending[-1].out = out

    def _any_forward(self, module: nn.Module, args: tuple, out: Any) -> None:
        # Called for every module call in the process: cheap checks first.
        if _replaying or not args or not self.pending or id(module) in self._model_modules:
            return
        fwd = self.pending[-1]
        if args[0] is fwd.out and fwd.out is not None and _is_loss(out):
            fwd.criteria.append((module, args[1:], out))

    def _grad_state(self) -> list[tuple]:
        return [(p, p.grad, None if p.grad is None else p.grad._version) for p in self.params()]

    def _grads_as_left(self) -> bool:
        return all(p.grad is g and (g is None or g._version == v) for p, g, v in self._grads)

    def before_call(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Before a watched call: whether the gradients are as the last watched call left them."""
        untouched = self._grads_as_left()
        if name == "backward":
            if not untouched and all(p.grad is None for p in self.params()):
                # The gradients were cleared without a step (a skipped step, a discarded batch).
                self.passes, self.after, self.problem = [], [], None
            elif not untouched and self.passes and self.problem is None:
                self.problem = "the gradients were changed between two backward() calls"
            if self.problem is None:
                self._check_backward(args, kwargs)
        return untouched

    def after_call(self, name: str, original: Callable, args: tuple, kwargs: dict, untouched: bool) -> None:
        """After a watched call: note a transform of this optimizer's gradients, to repeat it."""
        if name != "backward" and self.passes:
            # GradScaler's unscale kernel leaves the version counters as they were: ask its
            # optimizer instead whether these gradients were unscaled.
            ours = self._owns(args[1]) if name == "unscale_" else not self._grads_as_left()
            if not ours:
                return  # another optimizer's gradients
            if not untouched and self.problem is None:
                self.problem = "the gradients were changed after backward() by something deepopt cannot repeat"
            self.after.append((name, original, args, kwargs))
        self._grads = self._grad_state()

    def _owns(self, optimizer: Any) -> bool:
        mine = {id(p) for p in self.params()}
        return any(id(p) in mine for g in optimizer.param_groups for p in g["params"])

    def _check_backward(self, args: tuple, kwargs: dict) -> None:
        tensors = args[0] if args else kwargs.get("tensors")
        grad = args[1] if len(args) > 1 else kwargs.get("grad_tensors")
        named = dict(zip(("retain_graph", "create_graph", "grad_variables", "inputs"), args[2:]), **kwargs)
        if isinstance(tensors, (tuple, list)) and len(tensors) == 1:
            tensors = tensors[0]
        if not isinstance(tensors, Tensor) or tensors.dim() != 0 or grad is not None or tensors.grad_fn is None:
            self.problem = "backward() was called on something other than one scalar loss"
        elif named.get("create_graph") or named.get("inputs") is not None:
            self.problem = "backward() was called with create_graph or inputs"
        else:
            self._resolve(tensors)

    def _resolve(self, root: Tensor) -> None:
        losses: dict[int, Any] = {}
        for fwd in self.pending:
            for module, rest, loss in fwd.criteria:
                losses[id(loss.grad_fn)] = (fwd, module, rest, ())
            for leaf in filter(_is_loss, _scalars(fwd.out)):
                losses.setdefault(id(leaf.grad_fn), (fwd, None, (), _find(fwd.out, leaf)))
        found = _constants(root, losses)
        if found is None:
            self.problem = ("the tensor given to backward() is not the model's own loss or criterion(model(x), y) "
                            "(times or divided by a constant): e.g. a penalty term, a functional loss or "
                            "several outputs combined")
            return
        (fwd, criterion, rest, path), constants = found
        self.passes.append(_Pass(fwd, criterion, rest, path, constants))
        self.after = []
        # The forwards up to this one are spent; later ones (if any) wait for their backward.
        self.pending = self.pending[self.pending.index(fwd) + 1:]

    # -- replaying -----------------------------------------------------------------------------
    def replay(self) -> tuple[Callable[[], Tensor] | None, str]:
        """``(closure, what it recomputes)``, or ``(None, why not)``, for the gradients now in
        ``.grad``. The closure leaves the gradients of the user's loss at the current weights
        in ``.grad`` (with the user's clipping and unscaling repeated) and returns the loss;
        :attr:`found_inf` then says whether its unscale met an inf or NaN."""
        if self.problem is not None:
            return None, self.problem
        if not self.passes:
            return None, "no backward() of a loss of a training forward of the model came before this step"
        if not self._grads_as_left():
            return None, ("the gradients were changed after backward() by something deepopt cannot repeat "
                          "(it repeats torch.nn.utils.clip_grad_norm_/clip_grad_value_ and GradScaler.unscale_)")
        passes, after, model = list(self.passes), list(self.after), self.model

        def closure() -> Tensor:
            global _replaying
            _replaying, loss = True, None
            try:
                for p in passes:
                    loss = p.loss(model(*p.forward.args, **p.forward.kwargs))
                    torch.autograd.backward(_apply(loss, p.constants))
                self.found_inf = False
                for name, original, args, kwargs in after:
                    if name == "unscale_":
                        self.found_inf |= _unscale_again(*args, **kwargs)
                    else:
                        original(*args, **kwargs)
            finally:
                _replaying = False
            return loss  # type: ignore[return-value]

        what = passes[0].describe()
        if any(p.constants for p in passes):
            what += " with constant factors"
        if len(passes) > 1:
            what += f", {len(passes)} backward() calls per step"
        return closure, f"loss = {what}"


def _unscale_again(scaler: Any, optimizer: Any) -> bool:
    """Unscale the replayed gradients as ``scaler.unscale_(optimizer)`` did the user's; an inf
    or NaN is added to the scaler's count so that ``scaler.update()`` lowers the scale."""
    inv_scale = scaler._scale.double().reciprocal().float()
    found = torch.full((), 0.0, dtype=torch.float32, device=scaler._scale.device)
    per_device = scaler._unscale_grads_(optimizer, inv_scale, found, False)
    seen = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    for device, f in per_device.items():
        if device in seen:
            seen[device].add_(f)
    return bool(sum(float(f.item()) for f in per_device.values()))
