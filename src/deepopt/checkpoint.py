"""What a checkpoint holds: the evaluated weights in the model's, the training ones in the optimizer's.

The rule: once a mechanism gives the model evaluation weights (weight averaging,
dropout-matched evaluation), ``model.state_dict()`` holds the weights ``model.eval()``
computes with, in train mode as in eval mode. The training weights travel in
``optimizer.state_dict()["deepopt"]["train_values"]``. So the weights a script saves are
the weights whose validation loss decided to save them, and every resume that loads the
optimizer's state too is bit for bit the uninterrupted run, whatever the order of the loads.

What each way of saving gets:

* ``torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), ...})``, in
  either mode: "model" holds the evaluation weights; loading both (either order) resumes
  the training weights and the average exactly.
* A model-only checkpoint loaded to continue training: training continues from the
  evaluation weights it holds (the average restarts from them). deepopt says so once, in
  one line, at the first update after such a load.
* ``best = copy.deepcopy(model.state_dict())`` (or ``{k: v.clone() ...}``, or
  ``torch.save`` right away) after an evaluation: the evaluated weights;
  ``model.load_state_dict(best)`` at the end puts exactly those in the model, for
  evaluation and for saving. Like ``model.state_dict()`` in plain PyTorch, an uncopied
  ``model.state_dict()`` shares storage with the parameters and follows them: the next
  training forward, ``zero_grad()`` or ``step()`` puts the training weights back there.
* ``torch.save(model)`` and ``copy.deepcopy(model)``: a plain model (no deepopt hooks)
  holding the evaluation weights.
* A DDP- or ``torch.compile``-wrapped model: ``model.module.state_dict()`` and
  ``model._orig_mod.state_dict()`` follow the same rule as the wrapper's.
* Lightning ``ModelCheckpoint`` and ``Trainer.save_checkpoint``: ``checkpoint["state_dict"]``
  holds the evaluation weights, ``checkpoint["optimizer_states"]`` the training ones;
  ``fit(ckpt_path=...)`` resumes exactly.
* Hugging Face ``Trainer``: checkpoints and ``save_model()`` hold the evaluation weights,
  ``optimizer.pt`` the training ones; ``train(resume_from_checkpoint=...)`` resumes exactly.
* ``deepopt run``: as above; the script's ``optimizer.state_dict()`` gains the ``"deepopt"``
  entry.

:func:`training_state_dict` gives the training weights by name, for the rare script that
needs them (its own weight average fed from ``model.state_dict()``, as timm's
``ModelEmaV2`` does, now averages the evaluation weights).

Cost: a ``state_dict()`` in train mode puts the evaluation weights into the parameter
tensors (two copies of the trained tensors), and the next training forward copies the
training weights back (one more); nothing if they are already shown. A ``state_dict()``
between a training forward and its ``backward()`` therefore changes tensors autograd
saved, and ``backward()`` raises, as it did before whenever the forward was perturbed.

Example:
    >>> import torch, deepopt
    >>> model = torch.nn.Linear(2, 1)
    >>> model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.5), average="ema")
    >>> for _ in range(3):
    ...     model(torch.ones(4, 2)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
    >>> saved = {k: v.clone() for k, v in model.state_dict().items()}  # in train mode
    >>> _ = model.eval(); evaluated = {k: v.clone() for k, v in model.state_dict().items()}
    >>> all(torch.equal(saved[k], evaluated[k]) for k in saved)
    True
    >>> torch.equal(training_state_dict(model)["weight"], saved["weight"])  # trained apart
    False
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .distributed import reshard
from .hooks import ModelHook, _hook_dicts, has_model_hooks, plain_model_state, say
from .sharded_state import pack, unpack

if TYPE_CHECKING:
    from .optimizer import DeepOptimizer

__all__ = ["STATE_VERSION", "Resume", "saved_modules", "install", "uninstall", "show_saved", "model_loaded",
           "training_state_dict", "optimizer_state", "deepopt_state", "load_optimizer_state",
           "load_deepopt_state", "check_state_version"]

STATE_VERSION = 2  # 2: each mechanism's state under "mechanisms", by name


class Resume:
    """What makes loading a model and an optimizer in either order resume exactly.

    Attributes:
        train_values: the training values of the last optimizer state loaded, kept until
            the next update (a model load after it replaces the weights it put in).
        model_loaded: weights were loaded into the model since the last update.
        optimizer_loaded: a deepopt optimizer state was loaded since the last update.
        told: the one line about a model-only load was said.
    """

    def __init__(self) -> None:
        self.train_values: list[Tensor] | None = None
        self.model_loaded = False
        self.optimizer_loaded = False
        self.told = False

    def stepped(self, opt: DeepOptimizer) -> None:
        """After an update: say once if it continued from a model-only load's (evaluation) weights."""
        if self.model_loaded and not self.optimizer_loaded and not self.told and opt.has_eval_view:
            self.told = True
            say("training continues from the weights model.load_state_dict() loaded, without this "
                "optimizer's state: a checkpoint's model state holds deepopt's evaluation weights, so "
                "training goes on from those; load the optimizer's state_dict() too to resume the training "
                "weights exactly.")
        self.train_values, self.model_loaded, self.optimizer_loaded = None, False, False


def saved_modules(model: nn.Module) -> list[nn.Module]:
    """``model`` and the modules it wraps whole (DDP's ``.module``, ``torch.compile``'s ``._orig_mod``).

    Scripts save ``model.module.state_dict()``; the rule must hold there too.

    Example:
        >>> inner = torch.nn.Linear(2, 2)
        >>> saved_modules(torch.nn.DataParallel(inner))[1] is inner
        True
    """
    chain = [model]
    while True:
        inner = getattr(chain[-1], "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = chain[-1].module if isinstance(chain[-1], (nn.DataParallel, nn.parallel.DistributedDataParallel)) \
                else None
        if inner is None or any(inner is m for m in chain):
            return chain
        chain.append(inner)


def install(opt: DeepOptimizer) -> list[Any]:
    """Register the checkpoint hooks on ``opt.model`` and the modules it wraps; their handles.

    ``torch.save(module)`` and ``copy.deepcopy`` go through an instance ``__getstate__``
    that leaves every deepopt hook out (``deepopt.hooks.plain_model_state``), so the
    file loads where deepopt is not installed.
    """
    handles = []
    for module in saved_modules(opt.model):
        handles += [module.register_state_dict_pre_hook(ModelHook(opt, "_on_state_dict")),
                    module.register_load_state_dict_post_hook(ModelHook(opt, "_on_model_loaded"))]
        module.__dict__["__getstate__"] = functools.partial(plain_model_state, module)
    return handles


def uninstall(opt: DeepOptimizer) -> None:
    """Undo the ``__getstate__`` of :func:`install` where no activation's hooks remain."""
    for module in saved_modules(opt.model):
        if not has_model_hooks(module):  # another optimizer's may remain
            module.__dict__.pop("__getstate__", None)


def show_saved(opt: DeepOptimizer, module: nn.Module) -> None:
    """Before a ``state_dict()``: show the weights it must hold (the evaluation ones, in either mode)."""
    if opt.views.current == "eval":  # the common case after an evaluation: nothing to do
        return
    if not opt.has_eval_view:
        opt.show("train" if module.training else "eval")
        return
    # Dropout-matched evaluation may measure its factors now, with eval-mode forwards: the
    # modules in train mode are switched for that, each one's own flag put back after.
    training = [m for m in opt.model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        opt.show("eval")
    finally:
        for m in training:
            m.training = True


@torch.no_grad()
def model_loaded(opt: DeepOptimizer) -> None:
    """After ``model.load_state_dict``: the loaded values are the truth for whatever view was
    shown; after this optimizer's own state was loaded they give way to its training values."""
    opt.views.forget()
    resumed = opt.resume.train_values is not None
    if resumed:
        torch._foreach_copy_(opt.eval_targets(), opt.resume.train_values)
        reshard(opt._fsdp)  # FSDP2: the copies went into the local shards
    opt.resume.model_loaded = True
    for m in opt.mechanisms:
        m.on_weights_loaded(opt, resumed)


def _activations(model: nn.Module) -> list[Any]:
    """The optimizers activated on ``model`` or on a module inside it (their hooks are there)."""
    from .optimizer import DeepOptimizer  # not at the top: the optimizer imports this module

    owners: list[Any] = []
    for hooks in (d for m in model.modules() for d in _hook_dicts(m).values()):
        for hook in hooks.values():
            if (isinstance(hook, ModelHook) and isinstance(hook.owner, DeepOptimizer)
                    and all(hook.owner is not o for o in owners)):
                owners.append(hook.owner)
    return owners


def training_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with the training weights (copies), whatever view deepopt shows.

    The model is left as it is. For a model deepopt is not on, a copy of ``state_dict()``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> torch.equal(training_state_dict(model)["bias"], model.bias)
        True
    """
    owners = _activations(model)
    held = [o._held for o in owners]
    for o in owners:  # the live tensors, by name, without showing any view
        o._held = True
    try:
        live = model.state_dict(keep_vars=True)
    finally:
        for o, h in zip(owners, held):
            o._held = h
    trained: dict[int, Tensor] = {}
    for o in owners:
        targets = o.eval_targets()
        trained.update(zip(map(id, targets), o.views.train_values(targets)))
    return {k: trained[id(v)] if id(v) in trained else v.detach().clone() for k, v in live.items()}


# -- the optimizer's state (DeepOptimizer.state_dict and friends) ------------------------------
def optimizer_state(opt: DeepOptimizer) -> dict:
    """The base optimizer's state dict plus a ``"deepopt"`` entry (FSDP2: in the sharded layout)."""
    state = opt.optimizer.state_dict()
    state["deepopt"] = deepopt_state(opt)
    return pack(state, opt) if opt._fsdp else state


def deepopt_state(opt: DeepOptimizer) -> dict:
    """deepopt's part of the optimizer's state: counters, each mechanism's state by name."""
    return {
        "version": STATE_VERSION,
        "steps": opt.steps,
        "max_lr": opt.max_lr,
        "mechanisms": {m.name: m.state_dict() for m in opt.mechanisms},
        # model.state_dict() holds the evaluation weights; resuming needs these.
        "train_values": opt.views.train_values(opt.eval_targets()) if opt.has_eval_view else None,
    }


def load_optimizer_state(opt: DeepOptimizer, state_dict: dict) -> None:
    """Load what :func:`optimizer_state` returned (or a plain optimizer state dict)."""
    state_dict, deep = unpack(state_dict)
    # Checked before anything is loaded: a refused checkpoint leaves the optimizer as it was.
    check_state_version(deep)
    opt.optimizer.load_state_dict(state_dict)
    if deep is not None:
        load_deepopt_state(opt, deep)


def load_deepopt_state(opt: DeepOptimizer, deep: dict) -> None:
    """Load what :func:`deepopt_state` returned (or a version-1 entry)."""
    from .mechanisms import upgrade_state  # the registry knows the old layout

    deep = upgrade_state(deep)
    opt.show("train")
    opt.steps, opt.max_lr = int(deep["steps"]), float(deep["max_lr"])
    saved = deep["mechanisms"]
    for m in opt.mechanisms:
        if saved.get(m.name) is not None:
            m.load_state_dict(saved[m.name])
    values = deep["train_values"]
    if values is not None and opt.has_eval_view:
        with torch.no_grad():
            torch._foreach_copy_(opt.eval_targets(), values)
        opt.resume.train_values = [v.clone() for v in values]
        reshard(opt._fsdp)
    opt.resume.optimizer_loaded = True


def check_state_version(deep: Any) -> None:
    """Refuse a ``"deepopt"`` state entry written in a format this deepopt cannot read."""
    version = deep.get("version") if isinstance(deep, dict) else None
    if deep is not None and version not in (1, STATE_VERSION):
        raise ValueError(
            f"optimizer state has deepopt format version {version!r}; this deepopt reads "
            f"versions 1 to {STATE_VERSION}. Load it with the deepopt release that saved it, or "
            "load only the base optimizer state (drop the 'deepopt' key) to restart deepopt's state."
        )
