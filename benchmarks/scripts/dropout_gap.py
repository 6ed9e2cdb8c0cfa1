"""Why the seed's net 2 stays at chance in eval mode at 20 epochs (BENCHMARKS.md, section 3).

Net 2 has dropout with keep probability 0.3-0.5 on 10 of its 14 hidden layers. Prints,
at initialisation (seed 0, the first seed6 batch of 64 training images), the output std
of every conv/linear layer with dropout on (train mode, what training sees) and off
(eval mode, the deterministic signal). Given a seed6 checkpoint of net 2 (the runner's
``~/.cache/deepopt/partial/seed6-net2-classical-s0-e20.pt``, copied while the run goes),
also its test accuracy in eval mode and with one dropout sample (train mode), and how
many test images each mode puts into its most frequent class.

    python -m benchmarks.scripts.dropout_gap [CHECKPOINT] > benchmarks/results/net2-dropout-gap.txt
"""

import sys

import torch

from benchmarks.data import load_cifar10
from benchmarks.nets import build_net
from deepopt.mechanisms.calibrate import layer_output_stds, signal_ratio

torch.set_num_threads(1)
x, _, x_test, y_test = load_cifar10("../shared/data/cifar10-jpeg.tar")
torch.manual_seed(0)
model = build_net(2)
first = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:64]]
print("net 2, seed 0, at initialisation: output std of each conv/linear layer")
for mode in ("train", "eval"):
    stds = layer_output_stds(getattr(model, mode)(), (first,), {})
    print(f"  {mode:<5} (dropout {'on' if mode == 'train' else 'off'}): "
          + " ".join(f"{s:.2g}" for s in stds) + f"   signal ratio {signal_ratio(stds):.2g}")

if len(sys.argv) > 1:
    state = torch.load(sys.argv[1], weights_only=False)
    model.load_state_dict(state["model"])
    print(f"checkpoint after {len(state['test_acc'])} epochs (the run's eval-mode test acc "
          f"then: {state['test_acc'][-1]:.2f}%)")
    torch.manual_seed(0)  # the dropout sample
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(model, mode)()
            pred = torch.cat([model(x_test[i : i + 500]).argmax(1) for i in range(0, len(x_test), 500)])
            acc = 100.0 * (pred == y_test).float().mean().item()
            print(f"  {mode:<5}: test acc {acc:.2f}%, most frequent class gets "
                  f"{pred.bincount(minlength=10).max().item()} of {len(pred)} images")
