"""The seed's net 2 in its first steps, seed by seed (BENCHMARKS.md, section 3).

Replays the start of a classical seed6 run of net 2 exactly (the runner's initial weights,
data order, SGD settings and dropout draws) and prints, every ``EVERY`` steps, the mean
training loss since the last line, the share of units that are never positive on the
batch at each ReLU (dead for that batch, dropout on), and the std of the logits in eval
mode. Shows whether a seed trains in training mode at all.

With ``--force-calibration`` the net is activated with start-up calibration forced to
fire (``calibrate_threshold=0.99``, recipe ``safe``): does rescaling net 2 on the first
batch move a seed off its plateau?

    python -m benchmarks.scripts.net2_first_steps SEED [STEPS] [EVERY] [--force-calibration]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import deepopt
from benchmarks.data import load_cifar10
from benchmarks.nets import build_net
from benchmarks.train import BATCH_SIZE, LR, MOMENTUM, WEIGHT_DECAY

parser = argparse.ArgumentParser(description="Net 2's first training steps, per seed.")
parser.add_argument("seed", type=int)
parser.add_argument("steps", type=int, nargs="?", default=300)
parser.add_argument("every", type=int, nargs="?", default=25)
parser.add_argument("--force-calibration", action="store_true")
args = parser.parse_args()
seed, steps, every, force_calibration = args.seed, args.steps, args.every, args.force_calibration
torch.set_num_threads(1)
x, y, _, _ = load_cifar10("../shared/data/cifar10-jpeg.tar")
torch.manual_seed(seed)  # as benchmarks.train.run: weights, then the data order
model = build_net(2)
opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
if force_calibration:
    model, opt = deepopt.activate(model, opt, recipe="safe", calibrate_threshold=0.99)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
dead: dict[nn.Module, float] = {}


def record(module, _inp, out):
    dead[module] = (out.flatten(2) if out.dim() == 4 else out.unsqueeze(2)).amax((0, 2)).eq(0).float().mean().item()


for r in relus:
    r.register_forward_hook(record)
print(f"net 2, seed {seed}{', calibration forced' if force_calibration else ''}: step, mean loss, share of dead units per ReLU (train mode), eval logit std")
losses = []
for step in range(steps):
    idx = perm[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if (step + 1) % every == 0 or step + 1 == steps:
        model.eval()
        with torch.no_grad():
            logit_std = model(x[idx]).std().item()
        print(f"{step + 1:5d}  {sum(losses) / len(losses):.3f}  "
              + " ".join(f"{dead[r]:.2f}" for r in relus) + f"  {logit_std:.2g}", flush=True)
        losses = []
if force_calibration:
    print(f"calibration applied: {opt.calibrated}")
