"""The seed's net 2 in its first steps, seed by seed (BENCHMARKS.md, section 3).

Replays the start of a classical seed6 run of net 2 exactly (the runner's initial weights,
data order, SGD settings and dropout draws) and prints, every ``EVERY`` steps, the mean
training loss since the last line, the share of units that are never positive on the
batch at each ReLU (dead for that batch, dropout on), and the std of the logits in eval
mode. Shows whether a seed trains in training mode at all.

    python benchmarks/scripts/net2_first_steps.py SEED [STEPS] [EVERY]
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from deepopt.bench.data import load_cifar10
from deepopt.bench.nets import build_net
from deepopt.bench.train import BATCH_SIZE, LR, MOMENTUM, WEIGHT_DECAY

seed = int(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
every = int(sys.argv[3]) if len(sys.argv) > 3 else 25
torch.set_num_threads(1)
x, y, _, _ = load_cifar10("../shared/data/cifar10-jpeg.tar")
torch.manual_seed(seed)  # as deepopt.bench.train.run: weights, then the data order
model = build_net(2)
opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
dead: dict[nn.Module, float] = {}


def record(module, _inp, out):
    dead[module] = (out.flatten(2) if out.dim() == 4 else out.unsqueeze(2)).amax((0, 2)).eq(0).float().mean().item()


for r in relus:
    r.register_forward_hook(record)
print(f"net 2, seed {seed}: step, mean loss, share of dead units per ReLU (train mode), eval logit std")
losses = []
for step in range(steps):
    idx = perm[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if (step + 1) % every == 0:
        model.eval()
        with torch.no_grad():
            logit_std = model(x[idx]).std().item()
        print(f"{step + 1:5d}  {sum(losses) / len(losses):.3f}  "
              + " ".join(f"{dead[r]:.2f}" for r in relus) + f"  {logit_std:.2g}", flush=True)
        losses = []
