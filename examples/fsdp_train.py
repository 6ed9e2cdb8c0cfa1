"""Sharded training with deepopt: FSDP2 (``fully_shard``), gloo, CPU, tiny synthetic data.

Run with::

    torchrun --nproc_per_node=2 examples/fsdp_train.py

Each rank holds a shard of every weight and trains on its share of every global batch.
deepopt acts on the shards: the weight average is kept per shard (one shard's copy per
rank), the evaluation view is swapped shard by shard, the divergence guard's decision is
all-reduced, calibration measures the full activations. Halfway, the run is checkpointed
with ``torch.distributed.checkpoint`` (deepopt's state rides in the optimizer's state,
sharded like the parameters) and resumed in a fresh model and optimizer; the script checks
that the resumed run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import deepopt


def build(mesh):
    """Model sharded with fully_shard, then the optimizer, then deepopt (in this order)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return deepopt.activate(model, optimizer, average="ema", ema_decay=0.9, average_every=1)


def train(model, optimizer, x, y, steps: range, per_rank: int, rank: int) -> None:
    global_batch = per_rank * dist.get_world_size()
    for step in steps:
        lo = step * global_batch + rank * per_rank  # this rank's share of the global batch
        model.train()
        loss = nn.functional.cross_entropy(model(x[lo:lo + per_rank]), y[lo:lo + per_rank])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)


def evaluated(model) -> torch.Tensor:
    """The evaluation weights, gathered: what a full-state-dict export gives in eval mode."""
    model.eval()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    model.train()
    return torch.cat([t.flatten() for t in full.values()])


def main(steps: int = 20, global_batch: int = 32) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    if global_batch % world:
        raise SystemExit(f"global batch {global_batch} must be divisible by {world} ranks")
    per_rank = global_batch // world
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * global_batch, 20, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4

    # The uninterrupted run.
    model, optimizer = build(mesh)
    train(model, optimizer, x, y, range(steps), per_rank, rank)
    model.eval()  # evaluation weights (the average), computed shard by shard
    with torch.no_grad():
        acc = (model(x[:512]).argmax(1) == y[:512]).float().mean().item()
    reference = evaluated(model)

    # Half the run, a DCP checkpoint, a fresh model and optimizer resuming it.
    path = tempfile.mkdtemp() if rank == 0 else None
    shared = [path]
    dist.broadcast_object_list(shared)
    model, optimizer = build(mesh)
    train(model, optimizer, x, y, range(steps // 2), per_rank, rank)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=shared[0])
    model, optimizer = build(mesh)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=shared[0])
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    train(model, optimizer, x, y, range(steps // 2, steps), per_rank, rank)
    same = torch.equal(evaluated(model), reference)
    if rank == 0:
        print(f"eval accuracy {acc:.3f}; resumed run equals the uninterrupted one: {same}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # As in ddp_train.py: leave without C++ static destructors (a known race in gloo's teardown).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if same else 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=32)
    a = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("launch with: torchrun --nproc_per_node=2 examples/fsdp_train.py")
    main(a.steps, a.global_batch)
