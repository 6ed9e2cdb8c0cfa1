"""Does start-up calibration, forced on, move the seed's net 2 off its plateau? (BENCHMARKS.md, section 3)

Net 2 seed 1 never leaves a training loss of ln 10 in the seed benchmark, and calibration
does not fire on it (its signal does not vanish). This forces it to fire
(``calibrate_threshold=0.99``, recipe ``safe``) and replays the first ``STEPS`` steps of
the runner's seed (its initial weights and first epoch's data order), printing the mean
training loss of every 100 steps.

    python benchmarks/scripts/net2_forced_calibration.py SEED [STEPS]
"""

import sys

import torch
import torch.nn.functional as F

import deepopt
from deepopt.bench.data import load_cifar10
from deepopt.bench.nets import build_net
from deepopt.bench.train import BATCH_SIZE, LR, MOMENTUM, WEIGHT_DECAY

seed = int(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 782
torch.set_num_threads(1)
x, y, _, _ = load_cifar10("../shared/data/cifar10-jpeg.tar")
torch.manual_seed(seed)  # as deepopt.bench.train.run: weights, then the data order
model = build_net(2)
opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
model, opt = deepopt.activate(model, opt, recipe="safe", calibrate_threshold=0.99)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
print(f"net 2, seed {seed}, calibration forced: step, mean training loss of the last 100 steps")
losses = []
for step in range(steps):
    idx = perm[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if (step + 1) % 100 == 0 or step + 1 == steps:
        calibrated = opt.state_dict()["deepopt"]["calibrated"]
        print(f"{step + 1:5d}  {sum(losses) / len(losses):.3f}  calibrated={calibrated}", flush=True)
        losses = []
