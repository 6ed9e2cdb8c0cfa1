"""Why full-radius SAM leaves the seed's net 6 at chance (BENCHMARKS.md, section 1).

Trains net 6 (seed6 protocol: SGD lr 1e-2, momentum 0.9, wd 5e-4, batch 64) for the
first STEPS steps with exact SAM (reference ``sam_step``) and prints the training loss
and the fraction of active ReLUs in the last hidden layer. Training data only.

    python -m benchmarks.scripts.sam_collapse SEED RHO STEPS [WARMUP]
    python -m benchmarks.scripts.sam_collapse 1 0.05 200 > benchmarks/results/sam-collapse-net6-s1.txt
"""

import sys

import torch
import torch.nn.functional as F

from benchmarks.data import load_cifar10
from benchmarks.nets import build_net
from benchmarks.train import sam_step

torch.set_num_threads(1)
seed, rho, steps = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
warmup = int(sys.argv[4]) if len(sys.argv) > 4 else 0
x, y, _, _ = load_cifar10("../shared/data/cifar10-jpeg.tar")
torch.manual_seed(seed)
model = build_net(6)
opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
print(f"net 6, seed {seed}, SAM rho {rho}, warm-up {warmup} steps (rho 0 = plain SGD)")
for i in range(steps):
    idx = order[i * 64:(i + 1) * 64]
    xb, yb = x[idx], y[idx]
    if rho > 0:
        loss = sam_step(model, opt, xb, yb, rho * min(1.0, (i + 1) / warmup) if warmup else rho)
    else:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
    if i % 20 == 0:
        with torch.no_grad():
            h = xb.flatten(1)
            for m in linears[:-1]:
                h = torch.relu(m(h))
        print(f"step {i:4d}  loss {loss.item():.4f}  last hidden layer active {(h > 0).float().mean():.3f}")
