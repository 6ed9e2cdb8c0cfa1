"""deepopt's optimizer state in a layout ``torch.distributed.checkpoint`` keeps and shards.

``torch.distributed.checkpoint.state_dict.get_state_dict`` keeps only ``"state"`` and
``"param_groups"`` of an optimizer's state dict, so a top-level ``"deepopt"`` entry would
not survive it. Under FSDP2 (``fully_shard``) :meth:`DeepOptimizer.state_dict` therefore
writes deepopt's state where it does survive:

* every per-parameter tensor of it (an average's, the training weights behind the
  evaluation view, a last gradient) joins that parameter's optimizer state, under
  ``"deepopt:<path>"``, as a DTensor sharded like the parameter: ``dcp.save`` writes one
  shard per rank, and a resume on as many ranks reads each rank's shard back;
* the rest (counters, buffers' tensors, which FSDP2 does not shard) goes under
  ``param_groups[0]["deepopt"]``, each per-parameter list replaced by a marker saying
  which parameters' states hold it.

:func:`unpack` reads this layout back, and the plain one (a top-level ``"deepopt"``), so
either kind of checkpoint loads.

Example:
    >>> import torch
    >>> state = {"state": {}, "param_groups": [{"params": [0]}], "deepopt": {"steps": 3}}
    >>> unpack(state)[1]
    {'steps': 3}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .distributed import is_dtensor, local_tensors

__all__ = ["PREFIX", "pack", "unpack"]

#: The key prefix of deepopt's entries in a parameter's optimizer state.
PREFIX = "deepopt:"
_MARK = "__deepopt_per_param__"


def _aligned(node: Any, shapes: list[torch.Size]) -> bool:
    """Whether ``node`` is a list whose first ``len(shapes)`` items are per-parameter tensors (or None)."""
    n = len(shapes)
    if not isinstance(node, (list, tuple)) or n == 0 or len(node) < n:
        return False
    head = node[:n]
    return any(isinstance(t, Tensor) for t in head) and all(
        t is None or (isinstance(t, Tensor) and t.shape == s) for t, s in zip(head, shapes)
    )


@torch.no_grad()
def _like(local: Tensor, param: Tensor) -> Tensor:
    """``local`` as a DTensor sharded like ``param`` (sharing its memory), or as it is."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def pack(state: dict, opt: Any) -> dict:
    """Move ``state["deepopt"]`` into ``state``'s per-parameter entries and first param group.

    Args:
        state: what the base optimizer's ``state_dict()`` returned, plus ``"deepopt"``.
        opt: the :class:`~deepopt.DeepOptimizer` (its groups and trainable parameters).
    """
    state = dict(state)
    deep = state.pop("deepopt")
    per_param = {k: dict(v) for k, v in state["state"].items()}  # never the live optimizer's dicts
    params = opt.params()
    shapes = [t.shape for t in local_tensors(params)]
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    slots = [index[id(p)] for p in params]

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if not _aligned(node, shapes):
            return node
        for p, slot, t in zip(params, slots, node):
            if t is not None:
                per_param.setdefault(slot, {})[PREFIX + path] = _like(t, p)
        return {_MARK: path, "slots": slots, "rest": list(node[len(params):])}

    packed = walk(deep, "")
    state["state"] = per_param
    state["param_groups"] = [dict(g) for g in state["param_groups"]]
    state["param_groups"][0]["deepopt"] = packed
    return state


def unpack(state_dict: dict) -> tuple[dict, dict | None]:
    """The base optimizer's part of ``state_dict`` and deepopt's state (``None`` if absent).

    Reads a plain state dict (top-level ``"deepopt"``) and one written by :func:`pack`, also
    after ``get_state_dict`` renamed its parameters to their qualified names.
    """
    state_dict = dict(state_dict)
    if "deepopt" in state_dict:
        return state_dict, state_dict.pop("deepopt")
    groups = state_dict.get("param_groups") or []
    packed = next((g["deepopt"] for g in groups if isinstance(g, dict) and "deepopt" in g), None)
    if packed is None:
        return state_dict, None
    state_dict["param_groups"] = [{k: v for k, v in g.items() if k != "deepopt"} for g in groups]
    keys = [k for g in groups for k in g["params"]]  # slot i of pack() is the i-th saved parameter
    state = {k: dict(v) for k, v in state_dict.get("state", {}).items()}

    def walk(node: Any) -> Any:
        if isinstance(node, dict) and _MARK in node:
            path = PREFIX + node[_MARK]
            values = [state.get(keys[slot], {}).pop(path, None) for slot in node["slots"]]
            values = [v._local_tensor if is_dtensor(v) else v for v in values]
            return values + list(node["rest"])
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    deep = walk(packed)
    for k, v in list(state.items()):  # leftovers of a deepopt that saved more than this one reads
        for name in [n for n in v if isinstance(n, str) and n.startswith(PREFIX)]:
            del v[name]
        if not v:
            del state[k]
    state_dict["state"] = state
    return state_dict, deep
