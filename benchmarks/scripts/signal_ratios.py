"""Signal ratio at initialisation of the seed's six nets: where start-up calibration acts.

For each net and seed, the most extreme ``std(layer k) / std(first layer)`` over the
linear and conv layers on the first training batch of ``python -m benchmarks`` (batch 64,
seed6 data order), train mode. Calibration rescales a net only when this ratio is
below ``calibrate_threshold`` (1e-3) or above its inverse; elsewhere the default recipe
leaves training bit-identical to classical. Training data only.

    python -m benchmarks.scripts.signal_ratios > benchmarks/results/signal-ratios.txt
"""

import torch

from benchmarks.data import load_cifar10
from benchmarks.nets import build_net
from deepopt.mechanisms.calibrate import layer_output_stds, signal_ratio
from deepopt.recipes import Settings

torch.set_num_threads(1)
x, _, _, _ = load_cifar10("../shared/data/cifar10-jpeg.tar")
threshold = Settings().calibrate_threshold
print(f"signal ratio at init (calibration acts below {threshold:g} or above {1 / threshold:g})")
print("net  seed 0     seed 1     seed 2     calibrated")
for net in range(1, 7):
    ratios = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = build_net(net).train()
        first = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:64]
        ratios.append(signal_ratio(layer_output_stds(model, (x[first],), {})))
    acts = ["yes" if not threshold <= r <= 1 / threshold else "no" for r in ratios]
    print(f"{net:<4} " + " ".join(f"{r:.2e}  " for r in ratios) + " " + "/".join(acts))
