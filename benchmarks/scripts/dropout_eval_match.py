"""Evaluate dropout nets with rescaled weights: the plain form loses, the gated form ships.

Net 2 stays at chance in eval mode at 20 epochs although one dropout sample of it scores
25% (``dropout_gap.py``): with dropout off, the deep layers' outputs are several times
smaller than the ones training saw, so the learned biases swamp them. The candidate
changes only the weights that are evaluated: going through the conv/linear layers in
order, it scales each layer's weight and bias so that the layer's mean absolute output
in eval mode equals the one in train mode (one dropout sample, on 256 training images).
Layers with no dropout before them get a factor of 1.

Part 1 (given the net-2 checkpoint of ``dropout_gap.py``): net 2's eval-mode accuracy
on 5,000 training images and on the test set, as trained and as rescaled.
Part 2 (training data only): MNIST-1D MLPs with dropout (2 hidden layers of 100, drop
probability 0.2 and 0.5; 3,200 sequences to train, the other 800 to evaluate; SGD
momentum 0.9, weight decay 5e-4, LR 1e-2 divided by 10 at 30/60/80% of 30 epochs,
batch 64; 5 seeds): held-out accuracy as trained and as rescaled, at epochs 5, 15, 30,
and at the end the same on the 3,200 training sequences (could a gate on training
accuracy tell where the rescaling helps?).

Part 3: the gated form as it ships (``dropout_match`` in the default recipe): the net-2
checkpoint's test accuracy, and the MNIST-1D MLPs trained classically and activated
(same seed and data order), with how often the gate kept the rescaled weights; the same
for a small transformer encoder with dropout 0.1 (the usual transformer setting).

    python -m benchmarks.scripts.dropout_eval_match [CHECKPOINT] > benchmarks/results/dropout-eval-match.txt
"""

import copy
import sys

import torch
from torch import nn

from deepopt.datasets import load_mnist1d

torch.set_num_threads(1)


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def mean_abs_outputs(model: nn.Module, x: torch.Tensor, mode: str) -> list[float]:
    layers = weighted_layers(model)
    found = [0.0] * len(layers)

    def keep(k: int):
        return lambda module, args, out: found.__setitem__(k, out.abs().mean().item())

    hooks = [layer.register_forward_hook(keep(k)) for k, layer in enumerate(layers)]
    getattr(model, mode)()
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return found


def rescaled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose eval-mode layer outputs match its train-mode ones on ``x``."""
    copy_ = copy.deepcopy(model)
    with torch.random.fork_rng():  # the dropout sample must not move the caller's RNG
        target = mean_abs_outputs(copy_, x, "train")
    for k, layer in enumerate(weighted_layers(copy_)):
        scale = target[k] / mean_abs_outputs(copy_, x, "eval")[k]
        with torch.no_grad():
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)
    return copy_


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return 100.0 * (pred == y).float().mean().item()


def net2_part(checkpoint: str) -> None:
    from benchmarks.data import load_cifar10
    from benchmarks.nets import build_net

    x, y, x_test, y_test = load_cifar10("../shared/data/cifar10-jpeg.tar")
    model = build_net(2)
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    fixed = rescaled(model, x[perm[:256]])
    check = perm[-5000:]
    print("net 2, seed 0, classical run after 19 epochs: eval-mode accuracy")
    print(f"  5,000 training images: as trained {accuracy(model, x[check], y[check]):.2f}%, "
          f"rescaled {accuracy(fixed, x[check], y[check]):.2f}%")
    print(f"  test set:              as trained {accuracy(model, x_test, y_test):.2f}%, "
          f"rescaled {accuracy(fixed, x_test, y_test):.2f}%")
    print(f"  all 50,000 training images: as trained {accuracy(model, x, y):.2f}%, "
          f"rescaled {accuracy(fixed, x, y):.2f}%")


def mlp(drop: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(40, 100), nn.Dropout(drop), nn.ReLU(),
        nn.Linear(100, 100), nn.Dropout(drop), nn.ReLU(),
        nn.Linear(100, 10),
    )


def fit(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int):
    """SGD in batches of 64, LR / 10 at 30/60/80% of the epochs; yields (epoch, its data order)."""
    drops = [round(epochs * f) for f in (0.3, 0.6, 0.8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, drops, 0.1)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(perm), 64):
            batch = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        yield epoch, perm


def mnist1d_part(seeds: int = 5, epochs: int = 30, checkpoints: tuple[int, ...] = (5, 15, 30)) -> None:
    data = load_mnist1d()
    x_train, y_train = data["x"][:3200], data["y"][:3200]
    x_val, y_val = data["x"][3200:], data["y"][3200:]
    print("\nMNIST-1D MLP with dropout, held-out 800: accuracy as trained -> rescaled (difference)")
    for drop in (0.2, 0.5):
        diffs = {e: [] for e in checkpoints}
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = mlp(drop)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            cells = []
            for epoch, perm in fit(model, opt, x_train, y_train, seed, epochs):
                if epoch in checkpoints:
                    plain = accuracy(model, x_val, y_val)
                    fixed = accuracy(rescaled(model, x_train[perm[:256]]), x_val, y_val)
                    diffs[epoch].append(fixed - plain)
                    cells.append(f"ep {epoch}: {plain:.1f} -> {fixed:.1f}")
            fixed_model = rescaled(model, x_train[perm[:256]])
            cells.append(f"training set at ep {epochs}: {accuracy(model, x_train, y_train):.1f} -> "
                         f"{accuracy(fixed_model, x_train, y_train):.1f}")
            print(f"  drop {drop} seed {seed}: " + ", ".join(cells))
        print(f"  drop {drop} mean difference over {seeds} seeds: "
              + ", ".join(f"ep {e} {sum(d) / len(d):+.2f}" for e, d in diffs.items()))


def library_part(checkpoint: str | None, seeds: int = 5, epochs: int = 30) -> None:
    """The gated form as shipped (``dropout_match``, in the default recipe), on the same cases."""
    import deepopt

    print("\nThe gated form as shipped: deepopt.activate(model, opt) (default recipe, dropout_match on)")
    if checkpoint is not None:
        from benchmarks.data import load_cifar10
        from benchmarks.nets import build_net

        x, y, x_test, y_test = load_cifar10("../shared/data/cifar10-jpeg.tar")
        model = build_net(2)
        model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
        model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.0))
        first = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:64]
        nn.functional.cross_entropy(model(x[first]), y[first]).backward()  # one training batch seen
        acc = accuracy(model, x_test, y_test)
        print(f"  net 2 checkpoint: test accuracy in eval mode {acc:.2f}%, rescaled weights kept: "
              f"{opt.dropout_match.keep}")
    for drop in (0.2, 0.5):
        for seed in range(seeds):
            compare(f"MLP drop {drop}", lambda drop=drop: mlp(drop), seed, epochs)
    for seed in range(seeds):
        compare("transformer drop 0.1", TinyTransformer, seed, epochs)


class TinyTransformer(nn.Module):
    """A 2-layer pre-norm transformer encoder over MNIST-1D's 40 positions (dropout 0.1)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(1, width)
        self.position = nn.Parameter(torch.zeros(40, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.unsqueeze(-1)) + self.position).mean(1))


def compare(name: str, build, seed: int, epochs: int) -> None:
    """Classical vs ``deepopt.activate`` (same seed, data order): held-out accuracy, gate decisions."""
    import deepopt

    data = load_mnist1d()
    x_train, y_train = data["x"][:3200], data["y"][:3200]
    x_val, y_val = data["x"][3200:], data["y"][3200:]
    finals: list[float] = []
    kept = 0
    for activated in (False, True):
        torch.manual_seed(seed)
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if activated:
            model, opt = deepopt.activate(model, opt)
        for _ in fit(model, opt, x_train, y_train, seed, epochs):
            finals.append(accuracy(model, x_val, y_val))
            kept += bool(activated and opt.dropout_match.keep)
    print(f"  MNIST-1D {name} seed {seed}: held-out {finals[epochs - 1]:.1f} classical, "
          f"{finals[-1]:.1f} activated ({finals[-1] - finals[epochs - 1]:+.1f}); rescaled weights kept "
          f"after {kept} of {epochs} epochs; the same accuracy at every epoch: {finals[:epochs] == finals[epochs:]}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        net2_part(sys.argv[1])
    mnist1d_part()
    library_part(sys.argv[1] if len(sys.argv) > 1 else None)
