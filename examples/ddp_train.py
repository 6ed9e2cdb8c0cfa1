"""Data-parallel training with deepopt: DistributedDataParallel, gloo, CPU, tiny synthetic data.

Run with::

    torchrun --nproc_per_node=2 examples/ddp_train.py

Each rank trains on its share of every global batch; DDP averages the gradients, so the
momentum (and with it deepopt's perturbation), the updates and the weight average are the
same on every rank. Start-up calibration measures the global batch. The script checks
at the end that both the training and the evaluation weights are bitwise equal across ranks.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import deepopt


def main(steps: int = 20, global_batch: int = 32) -> None:
    """Train a small MLP on a fixed synthetic task with DDP + deepopt; print on rank 0."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    if global_batch % world:
        raise SystemExit(f"global batch {global_batch} must be divisible by {world} ranks")
    per_rank = global_batch // world

    torch.manual_seed(0)  # same init everywhere (DDP also broadcasts rank 0's weights)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    model = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    # activate after (or before) wrapping: both work.
    model, optimizer = deepopt.activate(model, optimizer, rho=0.05, average="ema", ema_decay=0.9)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * global_batch, 20, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4

    for step in range(steps):
        lo = step * global_batch + rank * per_rank  # this rank's share of the global batch
        xb, yb = x[lo:lo + per_rank], y[lo:lo + per_rank]
        model.train()
        loss = nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)

    model.eval()  # evaluation weights (the EMA)
    with torch.no_grad():
        acc = (model(x[:512]).argmax(1) == y[:512]).float().mean().item()
    eval_weights = torch.cat([t.flatten().float() for t in model.state_dict().values()])
    model.train()
    train_weights = torch.cat([p.detach().flatten() for p in model.parameters()])

    mine = torch.cat([train_weights, eval_weights])
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    agree = all(torch.equal(mine, other) for other in everyone)
    if rank == 0:
        print(f"eval accuracy {acc:.3f}; weights bitwise equal on all {world} ranks: {agree}", flush=True)
    dist.barrier()  # no rank tears gloo down while another still finishes the all_gather
    dist.destroy_process_group()
    # Leave without running C++ static destructors: under load a gloo thread still joinable
    # at interpreter exit aborts the process ("terminate called without an active
    # exception") after all the work is done, a known race in torch's gloo teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if agree else 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=32)
    a = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("launch with: torchrun --nproc_per_node=2 examples/ddp_train.py")
    main(a.steps, a.global_batch)
