"""``activate``: validate the user's objects and compose the mechanisms of a recipe."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .mechanisms import Mechanism, compose
from .optimizer import DeepOptimizer
from .recipes import resolve

__all__ = ["activate", "deactivate"]


def activate(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    recipe: str = "default",
    enabled: bool = True,
    mechanisms: Iterable[Mechanism] = (),
    **overrides: Any,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Turn deepopt on for ``model`` trained by ``optimizer``; return the objects to keep using.

    The user's loop stays as it is: ``loss.backward(); optimizer.step();
    optimizer.zero_grad()``, ``model.eval()`` to evaluate (with deepopt's evaluation
    weights), ``state_dict()`` to save. Schedulers built on the original optimizer
    before this call, or on the returned one after, both work.

    Args:
        model: the network (any ``nn.Module``, DDP-wrapped or not).
        optimizer: any ``torch.optim.Optimizer`` over (a subset of) ``model``'s parameters.
        recipe: ``"default"`` (about 1x cost), ``"thorough"`` (the default with
            ``budget=1.5``: exact two-pass SAM late in the run) or ``"safe"`` (calibration
            and guard only).
        enabled: ``False`` returns ``model`` and ``optimizer`` untouched, for A/B runs.
        mechanisms: mechanism objects to add, e.g. ``[deepopt.experimental.Lookahead(k=5)]``;
            one replaces the recipe's mechanism of the same name. Each serves one activation.
        **overrides: fields of :class:`deepopt.Settings` replacing the recipe's values,
            e.g. ``budget=1.5``, ``average="ema"``, ``ema_decay=0.999``.

    Returns:
        ``(model, optimizer)``: the same model (with hooks) and a
        :class:`~deepopt.optimizer.DeepOptimizer` sharing the optimizer's state.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``optimizer`` not an optimizer.
        ValueError: unknown recipe/override, out-of-range value, optimizer parameters
            that are not the model's, nothing to train, or a model sharded otherwise than by
            ``fully_shard`` on a 1-D mesh (the older ``FullyShardedDataParallel`` wrapper,
            tensor parallelism), or with a mechanism that cannot act on shards.

    Sharded training (FSDP2): apply ``torch.distributed.fsdp.fully_shard`` first, build the
    optimizer on the sharded parameters, then call ``activate`` (:mod:`deepopt.distributed`
    says how each mechanism acts on shards; :mod:`deepopt.sharded_state` how its state
    goes through ``torch.distributed.checkpoint``).

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model, opt = deepopt.activate(model, opt)
        >>> loss = model(torch.ones(2, 3)).pow(2).mean()
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> deepopt.activate(model, opt)[1] is opt  # activating twice is a no-op
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; pass the network "
            "itself, e.g. activate(model, optimizer)."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
            "build one first, e.g. torch.optim.SGD(model.parameters(), lr=0.1)."
        )
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}.")
    settings = resolve(recipe, overrides)  # validated even when disabled: typos surface in A/B runs
    chosen = compose(settings, mechanisms)
    if not enabled:
        return model, optimizer
    if isinstance(optimizer, DeepOptimizer):
        if optimizer.model is model:
            return model, optimizer
        raise ValueError(
            "optimizer is already activated for another model; pass the original optimizer "
            "of this model, or call deepopt.deactivate first."
        )
    existing = getattr(optimizer, "_deepopt_wrapper", None)
    if existing is not None:
        if existing.model is model:
            return model, existing
        raise ValueError("optimizer is already activated for another model; call deepopt.deactivate first.")
    _check_not_sharded(model, chosen)
    _check_params(model, optimizer)
    for m in chosen:
        if getattr(m, "_activated", False):
            raise ValueError(f"mechanisms: {m!r} already serves another activation; pass a new one.")
        m._activated = True  # type: ignore[attr-defined]
    wrapper = DeepOptimizer(optimizer, model, chosen, settings)
    optimizer._deepopt_wrapper = wrapper  # type: ignore[attr-defined]
    return model, wrapper


def deactivate(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Undo :func:`activate`: remove the hooks, show the training weights, return the base optimizer.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(3, 1)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model, opt = deepopt.activate(model, base)
        >>> deepopt.deactivate(model, opt)[1] is base
        True
    """
    if isinstance(optimizer, DeepOptimizer):
        return model, optimizer.detach()
    existing = getattr(optimizer, "_deepopt_wrapper", None)
    return model, (existing.detach() if existing is not None else optimizer)


def _check_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_params = {id(p) for p in model.parameters()}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    foreign = [p for p in opt_params if id(p) not in model_params]
    if foreign:
        raise ValueError(
            f"optimizer holds {len(foreign)} parameter(s) that are not model's parameters "
            f"(shapes {[tuple(p.shape) for p in foreign[:3]]}); build the optimizer from "
            "model.parameters() of the model you pass to activate."
        )
    if not any(p.requires_grad for p in opt_params):
        raise ValueError(
            "model has no trainable parameters in optimizer (all have requires_grad=False); "
            "unfreeze some parameters or pass the optimizer that trains them."
        )


def _sharding(model: nn.Module) -> str | None:
    """How ``model`` is sharded across ranks, or ``None``; imports nothing new."""
    # A model can only be sharded if the user imported the sharding API already.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kinds = [(getattr(fsdp, "FullyShardedDataParallel", None), "FullyShardedDataParallel (FSDP)"),
             (getattr(fsdp, "FSDPModule", None), "fully_shard (FSDP2)")]
    for module in model.modules():
        for cls, name in kinds:
            if cls is not None and isinstance(module, cls):
                return name
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()):
        return "DTensor parameters"
    return None


def _check_not_sharded(model: nn.Module, mechanisms: list[Mechanism]) -> None:
    """Let through unsharded models and ``fully_shard`` on a 1-D mesh with mechanisms that act on shards."""
    kind = _sharding(model)
    if kind is None:
        return
    if kind != "fully_shard (FSDP2)":
        raise ValueError(
            f"deepopt does not support this sharded model; it uses {kind}. Shard it with "
            "torch.distributed.fsdp.fully_shard (FSDP2) on a 1-D device mesh instead (supported: each "
            "mechanism acts on the local shards), or wrap it in torch.nn.parallel.DistributedDataParallel, "
            "or pass enabled=False."
        )
    meshes = {p.device_mesh.ndim for p in model.parameters() if hasattr(p, "device_mesh")}
    if meshes - {1}:
        raise ValueError(
            f"model is sharded by fully_shard on a {max(meshes)}-D device mesh (HSDP); deepopt supports a "
            "1-D mesh: fully_shard(model, mesh=init_device_mesh(device, (world_size,))), or pass enabled=False."
        )
    unsafe = [f"{m.label}: {m.unsafe_when_sharded}" for m in mechanisms if m.unsafe_when_sharded]
    if unsafe:
        raise ValueError(
            f"these mechanisms cannot act on a model sharded by fully_shard: {'; '.join(unsafe)}. Leave "
            "them out of mechanisms=[...] (the recipes' own mechanisms all act on shards)."
        )
