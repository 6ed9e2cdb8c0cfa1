"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``): what mechanisms need of it.

Under ``fully_shard`` every parameter is a ``DTensor`` whose rank-local part, a slice of
rows, lives in FSDP's sharded storage; FSDP all-gathers the full weights for a forward
and reduce-scatters the gradients. deepopt acts on the local parts only:

* elementwise state (an average, the saved training weights of a view) is kept per shard,
  so it costs one shard's copy per rank, and a view is swapped shard by shard with no
  full gather (:func:`local_tensors`);
* a norm over the whole model (SAM's radius) sums the local squares and all-reduces them
  (:func:`global_norm`); a yes/no decision (the guard's) is all-reduced so that every
  rank takes it alike (:func:`all_ranks`);
* after deepopt rewrites sharded weights, FSDP modules still holding gathered weights
  (the root keeps them from a forward until its backward) free them (:func:`reshard`),
  so the next forward gathers what deepopt wrote.

Every helper is a no-op, importing nothing, for a model that is not sharded.

Example:
    >>> import torch
    >>> from deepopt.distributed import local_tensors, global_norm, all_ranks
    >>> t = [torch.tensor([3.0]), torch.tensor([4.0])]
    >>> local_tensors(t) is t, global_norm(t).item(), all_ranks(True)
    (True, 5.0, True)
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["is_dtensor", "sharded", "local_tensors", "global_norm", "all_ranks", "fsdp_modules", "reshard"]


def _dtensor_type() -> Any:
    # A tensor can only be a DTensor if the user imported the DTensor API already.
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded parameter, gradient...).

    Example:
        >>> is_dtensor(torch.ones(1))
        False
    """
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def sharded(tensors: list[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor.

    Example:
        >>> sharded([torch.ones(1)]), sharded([])
        (False, False)
    """
    cls = _dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """Each DTensor's rank-local part (the tensor FSDP gathers from); other tensors as they are.

    The local part is the DTensor's own storage, not a copy: writing into it (under
    ``torch.no_grad()``) changes the sharded parameter. ``tensors`` itself is returned when
    none is a DTensor.

    Example:
        >>> t = [torch.ones(2)]
        >>> local_tensors(t)[0] is t[0]
        True
    """
    cls = _dtensor_type()
    if cls is None or not any(isinstance(t, cls) for t in tensors):
        return tensors
    # _local_tensor, not to_local(): to_local() with grad enabled makes a new autograd view.
    return [t._local_tensor if isinstance(t, cls) else t for t in tensors]


def _group(tensors: list[Tensor]) -> Any:
    """The process group a DTensor among ``tensors`` is sharded over (its 1-D mesh)."""
    cls = _dtensor_type()
    for t in tensors:
        if cls is not None and isinstance(t, cls):
            mesh = t.device_mesh
            if mesh.ndim != 1:
                raise ValueError(
                    f"deepopt supports fully_shard on a 1-D device mesh; this parameter is on a {mesh.ndim}-D "
                    "mesh (HSDP or tensor parallel). Shard over one mesh dimension, or pass enabled=False."
                )
            return mesh.get_group()
    return None


@torch.no_grad()
def global_norm(tensors: list[Tensor], like: list[Tensor] | None = None) -> Tensor:
    """The L2 norm of all ``tensors`` together, over every rank's shard when they are DTensors.

    Sharded: the local parts' squared norms are summed and all-reduced over the shards'
    process group (one collective of one float), so every rank gets the whole model's norm.
    ``like``: DTensors whose sharding ``tensors`` (local parts computed from them) share.

    Example:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    if not tensors:
        return torch.zeros(())
    group = _group(like if like is not None else tensors)
    parts = local_tensors(tensors)
    norms = [n for n in torch._foreach_norm([t for t in parts if t.numel()])] or [parts[0].new_zeros(())]
    if group is None:
        return torch.linalg.vector_norm(torch.stack(norms))
    squares = torch.stack(norms).double().square().sum()
    dist.all_reduce(squares, group=group)
    return squares.sqrt().to(norms[0].dtype)


def all_ranks(ok: bool, tensors: list[Tensor] | None = None) -> bool:
    """``ok`` on every rank: one all-reduce (MIN) when ``tensors`` are sharded, else ``ok`` itself.

    A decision taken per shard (the guard's: are my gradients finite?) must be the same on
    all ranks, or their optimizer steps, and with them the shards, drift apart.

    Example:
        >>> all_ranks(False), all_ranks(True, [torch.ones(1)])
        (False, True)
    """
    group = _group(tensors or [])
    if group is None:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` (FSDP2) was applied to, in module order.

    Example:
        >>> fsdp_modules(torch.nn.Linear(2, 2))
        []
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def reshard(modules: list[nn.Module]) -> None:
    """Free the gathered weights of FSDP2 ``modules`` (from :func:`fsdp_modules`) where held.

    FSDP2's root keeps the weights it gathered for a forward until its backward (and after
    a forward without one, e.g. in evaluation), and does not gather again while it holds
    them; after deepopt rewrites the shards this makes the next forward gather them.
    No-op for an empty list.

    Example:
        >>> reshard([])
    """
    for m in modules:
        m.reshard()  # type: ignore[operator]
