"""What watching the loop costs: ``recipe="thorough"`` outside its SAM window against the default.

Until the LR falls to a tenth of its peak, ``thorough`` takes one pass per step like the
default, but its SAM mechanism records the loop (deepopt.replay: a model forward hook, a
global module forward hook, wrappers around backward/clipping). Here the LR stays constant, so
no SAM step runs: the difference in time per step is the recording alone. A CNN like the
seed's net 6 and an MLP, batch 64, on random data, one thread, ``repeats`` alternating runs.

Run: python -m benchmarks.scripts.replay_cost > benchmarks/results/replay/replay-cost.txt
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import deepopt


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10))


def mlp() -> nn.Module:
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(256, 256), nn.ReLU())], nn.Linear(256, 10))


def seconds_per_step(build, shape, recipe: str | None, steps: int = 60) -> float:
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if recipe is not None:
        model, opt = deepopt.activate(model, opt, recipe=recipe)
    criterion = nn.CrossEntropyLoss()
    x, y = torch.randn(64, *shape), torch.randint(0, 10, (64,))
    for i in range(steps + 10):
        if i == 10:
            start = time.perf_counter()
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - start) / steps


def main(repeats: int = 5) -> None:
    torch.set_num_threads(1)
    for name, build, shape in (("cnn (net-6-like)", cnn, (3, 32, 32)), ("mlp 6x256", mlp, (256,))):
        times = {r: [] for r in (None, "default", "thorough")}
        for _ in range(repeats):
            for recipe in times:
                times[recipe].append(seconds_per_step(build, shape, recipe))
        base = statistics.median(times[None])
        print(f"{name}: plain {base * 1e3:.2f} ms/step; " + "; ".join(
            f"{r} {statistics.median(t) / base:.3f}x" for r, t in times.items() if r is not None)
              + f" (median of {repeats}, no SAM step: constant LR)")


if __name__ == "__main__":
    main()
