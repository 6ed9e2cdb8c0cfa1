"""``deepopt demo``: the same network trained twice on MNIST-1D, classical and activated.

Both runs share the seed, the initial weights (one is a deep copy of the other), the
order of the mini-batches and the training loop (SGD with momentum 0.9, weight decay
5e-4, cross-entropy, learning rate divided by 10 at 50% and 75% of the epochs). The
only difference is one line, ``model, optimizer = deepopt.activate(model, optimizer)``.
The two runs are interleaved epoch by epoch (or, with several worker processes, run
side by side) so that background load on the machine slows both alike, which keeps the
overhead ratio honest.

The default network, ``deep``, is the seed benchmark's Net 4 carried over to 1-D: 20
plain conv layers with Xavier-uniform weights, zero biases and no BatchNorm. Its signal
vanishes through depth at initialisation, so classical SGD stays at or near chance
(10%; seed 2 creeps to about 30%); with deepopt's default
recipe, start-up calibration rescales the layers once on the first batch and the same
SGD loop trains it. On the other networks (``mlp``, ``cnn``, ``gru``)
the signal propagates and the default recipe trains exactly as classical does; its
average changes what ``eval()`` shows before the LR drops, and after the last drop its
window is a step or a few, so the final accuracies are equal or close (where it is the
iterate, deepopt says so in one line);
the summary printed under the table says which mechanism acted.

MNIST-1D (Greydanus 2020) is generated offline and deterministically by the
``mnist1d`` package (4,000 training and 1,000 test sequences of length 40, 10
classes) and cached under ``$DEEPOPT_CACHE`` or ``~/.cache/deepopt``.

Example::

    from deepopt.demo import run_demo, format_table
    summary = run_demo(net="mlp", epochs=2, limit=500, progress=False)
    print(format_table(summary))
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .datasets import cache_dir, load_mnist1d
from .demo_report import format_table, plot_curves
from .progress import progress_bar

__all__ = [
    "NETS",
    "LEARNING_RATES",
    "DEFAULT_NET",
    "DEFAULT_EPOCHS",
    "DEFAULT_SEEDS",
    "cache_dir",
    "load_mnist1d",
    "build_net",
    "train_pair",
    "run_demo",
    "format_table",
    "plot_curves",
    "parse_overrides",
    "add_arguments",
    "add_seeds_is_a_list",
    "run_from_args",
    "main",
]

NETS = ("deep", "mlp", "cnn", "gru")
# The default network: where deepopt's default recipe makes a visible difference. On
# networks whose signal propagates (mlp, cnn, gru) that recipe leaves training
# bit-identical; on the plain 20-layer "deep" net the signal vanishes at init, classical
# SGD stays at or near chance and start-up calibration makes it train.
DEFAULT_NET = "deep"
# Epochs per network: long enough for the classical run to converge (for "deep": for the
# calibrated run, which reaches 65% at 20 epochs, 78% at 30 and 90% at 40 on the
# validation split); the GRU is about 10x slower per epoch than mlp/cnn.
DEFAULT_EPOCHS = {"deep": 50, "mlp": 100, "cnn": 100, "gru": 60}
# Two seeds x two runs are four runs, one per core on a 2-core machine in two rounds:
# under 3 minutes on 2 AVX2 cores (a third seed adds a round, about 70 s there).
DEFAULT_SEEDS = 2
DEFAULT_BATCH = 128
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
# Peak learning rate of each network, chosen on a validation split carved out of the
# training set (never on the test set) for the classical run. "deep" stays at chance
# classically at every rate tried (0.002 to 0.02), so its rate is the one where the
# calibrated run did best on that split (3,200 train / 800 validation, 40 epochs, seeds
# 0-2: 0.005 -> 90%; 0.01 -> 81%, one seed at 64%; 0.02 collapsed to chance on one of
# two seeds); the seed benchmark's own Net 4 rate is 0.01.
LEARNING_RATES = {"deep": 0.005, "mlp": 0.4, "cnn": 0.2, "gru": 0.1}

# -- networks ----------------------------------------------------------------------------
class ConvNet(nn.Module):
    """The MNIST-1D paper's convolutional network (``ConvBase``): 3 convs of 25 channels + linear.

    Kernels 5, 3, 3, stride 2, padding 1: a 40-long input gives 25 x 5 features.
    """

    def __init__(self, channels: int = 25, length: int = 40, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        n = length
        for k in (5, 3, 3):
            n = (n + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * n, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.view(x.shape[0], 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


class DeepConvNet(nn.Module):
    """The MNIST-1D analogue of the seed benchmark's Net 4: a plain deep conv net.

    20 stride-1 ``Conv1d`` layers (kernel 3, padding 1) in 5 blocks of 4, of 16, 16,
    32, 32 and 64 channels, each block ending in a max-pool of 2 (``ceil_mode``, the
    seed's "same" pooling: 40 -> 20 -> 10 -> 5 -> 3 -> 2), ReLU after every conv, then
    a linear layer to the 10 logits. As in the seed (``seed6.md``): Glorot/Xavier-uniform
    weights, zero biases, no BatchNorm, no residual connections, no dropout. Narrower
    than Net 4 (16 to 64 channels instead of 16 to 256, no fc256 layer), for the CPU.

    With this init each conv+ReLU roughly halves the signal's variance, so at
    initialisation some layer's output std is about 1e-4 to 1e-3 times the first
    layer's: the gradients vanish and plain SGD stays at or near chance (10%), like
    Net 4 on CIFAR-10.
    """

    def __init__(
        self, widths: Sequence[int] = (16, 16, 32, 32, 64), per_block: int = 4,
        length: int = 40, classes: int = 10,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, n = 1, length
        for width in widths:
            for _ in range(per_block):
                layers.append(nn.Conv1d(c, width, 3, padding=1))
                c = width
            n = math.ceil(n / 2)
        self.convs = nn.ModuleList(layers)
        self.per_block = per_block
        self.linear = nn.Linear(c * n, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = x.view(x.shape[0], 1, x.shape[-1])
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if (i + 1) % self.per_block == 0:  # the seed pools before adding the bias: the
                h = nn.functional.max_pool1d(h, 2, ceil_mode=True)  # same, max commutes with it
            h = h.relu()
        return self.linear(h.flatten(1))


class GRUNet(nn.Module):
    """The MNIST-1D paper's recurrent network (``GRUBase``): a bidirectional GRU over the
    40 steps (one value per step), all hidden states flattened into a linear classifier."""

    def __init__(self, hidden: int = 6, length: int = 40, classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(2 * hidden * length, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x.view(x.shape[0], x.shape[-1], 1))
        return self.linear(out.flatten(1))


def build_net(name: str, length: int = 40, classes: int = 10) -> nn.Module:
    """One of :data:`NETS`, initialised from torch's global generator.

    * ``"deep"``: 20 plain conv layers, Xavier-uniform init, zero biases, no
      BatchNorm (:class:`DeepConvNet`, the seed benchmark's Net 4 in 1-D);
    * ``"mlp"``: 40 -> 100 -> 100 -> 10 with ReLU;
    * ``"cnn"``: the MNIST-1D paper's conv net (:class:`ConvNet`);
    * ``"gru"``: the paper's bidirectional GRU, hidden size 6 (:class:`GRUNet`).
    """
    if name == "deep":
        return DeepConvNet(length=length, classes=classes)
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(length, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, classes)
        )
    if name == "cnn":
        return ConvNet(length=length, classes=classes)
    if name == "gru":
        return GRUNet(length=length, classes=classes)
    raise ValueError(f"net={name!r} is unknown; choose one of {', '.join(NETS)}.")


# -- training ----------------------------------------------------------------------------
def _milestones(epochs: int) -> list[int]:
    return sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})


class _Run:
    """One training run: the model, its optimizer and schedule, and what it measured."""

    def __init__(
        self, model: nn.Module, lr: float, epochs: int, seed: int, activate: dict | None, closure: bool
    ) -> None:
        self.closure = closure
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        if activate is not None:
            import deepopt
            from deepopt.experimental import legacy_kwargs  # rows may hold 0.1's knobs

            model, opt = deepopt.activate(model, opt, **legacy_kwargs(activate))
        self.model, self.opt = model, opt
        self.sched = torch.optim.lr_scheduler.MultiStepLR(opt, _milestones(epochs), gamma=0.1)
        self.order = torch.Generator().manual_seed(seed)  # same data order for both runs
        self.test_acc: list[float] = []
        self.test_loss: list[float] = []
        self.train_loss: list[float] = []
        self.lr: list[float] = []
        self.seconds: list[float] = []

    def epoch(self, x: Tensor, y: Tensor, batch: int) -> None:
        start = time.perf_counter()
        self.lr.append(float(self.opt.param_groups[0]["lr"]))
        self.model.train()
        total, n = 0.0, 0
        perm = torch.randperm(len(x), generator=self.order)
        for i in range(0, len(x), batch):
            xb, yb = x[perm[i : i + batch]], y[perm[i : i + batch]]
            if self.closure:  # the step(closure) form, which lets exact SAM re-evaluate

                def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                    self.opt.zero_grad()
                    loss = nn.functional.cross_entropy(self.model(xb), yb)
                    loss.backward()
                    return loss

                loss = self.opt.step(closure)
            else:
                loss = nn.functional.cross_entropy(self.model(xb), yb)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
            total += float(loss.detach()) * len(yb)
            n += len(yb)
        self.sched.step()
        self.seconds.append(time.perf_counter() - start)
        self.train_loss.append(total / max(n, 1))

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> None:
        self.model.eval()  # with deepopt: the evaluation (averaged) weights, if any
        logits = self.model(x)
        self.test_loss.append(float(nn.functional.cross_entropy(logits, y)))
        self.test_acc.append(100.0 * float((logits.argmax(1) == y).float().mean()))
        self.model.train()

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "test_acc": self.test_acc,
            "test_loss": self.test_loss,
            "train_loss": self.train_loss,
            "lr": self.lr,
            "epoch_seconds": self.seconds,
        }
        if hasattr(self.opt, "mechanism"):  # a DeepOptimizer: what its mechanisms did
            calibration, guard = self.opt.mechanism("calibrate"), self.opt.mechanism("guard")
            out["calibrated"] = bool(getattr(calibration, "calibrated", False))
            out["skipped_steps"] = int(guard.skipped) if guard is not None else 0
        return out


def train_pair(
    data: dict[str, Tensor],
    *,
    net: str = DEFAULT_NET,
    epochs: int | None = None,
    seed: int = 0,
    recipe: str = "default",
    overrides: dict[str, Any] | None = None,
    lr: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train ``net`` classically and with deepopt from the same init and data order.

    Args:
        data: the tensors of :func:`load_mnist1d` (possibly subsetted).
        net: one of :data:`NETS`.
        epochs: passes over the training set; default :data:`DEFAULT_EPOCHS` of ``net``.
        seed: seeds the initial weights and the mini-batch order (shared by both runs).
        recipe: the deepopt recipe for the activated run.
        overrides: deepopt settings replacing the recipe's, e.g. ``{"rho": 0.05}``.
        lr: peak learning rate; default :data:`LEARNING_RATES` of ``net``.
        batch_size: mini-batch size.
        on_epoch: called after each epoch with ``(epoch, classical_acc, deepopt_acc)``.

    Both runs use the usual ``loss.backward(); optimizer.step()`` loop, or, when the
    settings ask for exact two-pass SAM (``budget > 1``, the ``thorough`` recipe),
    ``optimizer.step(closure)``, the form that SAM needs.

    Returns:
        ``{"classical": record, "deepopt": record}``, each record holding per-epoch
        lists ``test_acc`` (%), ``test_loss``, ``train_loss``, ``lr`` and ``epoch_seconds``;
        the deepopt record also says whether start-up calibration acted (``calibrated``),
        the signal ratio it tested on the first batch (``signal_ratio``: the most extreme
        layer-output std over the first layer's, at the shared initial weights) and how
        many steps the divergence guard skipped (``skipped_steps``).
    """
    lr = LEARNING_RATES[net] if lr is None else lr
    epochs = DEFAULT_EPOCHS[net] if epochs is None else epochs
    closure = _needs_closure(recipe, overrides)
    model, ratio = _initial_model(data, net, seed, batch_size)
    twin = copy.deepcopy(model)  # identical initial weights
    runs = {
        "classical": _Run(model, lr, epochs, seed, None, closure),
        "deepopt": _Run(twin, lr, epochs, seed, {"recipe": recipe, **(overrides or {})}, closure),
    }
    for epoch in range(epochs):
        for run in runs.values():  # interleaved: background load hits both alike
            run.epoch(data["x"], data["y"], batch_size)
            run.evaluate(data["x_test"], data["y_test"])
        if on_epoch is not None:
            on_epoch(epoch, runs["classical"].test_acc[-1], runs["deepopt"].test_acc[-1])
    records = {name: run.record() for name, run in runs.items()}
    records["deepopt"]["signal_ratio"] = ratio
    return records


def _needs_closure(recipe: str, overrides: dict[str, Any] | None) -> bool:
    """Exact two-pass SAM needs ``step(closure)``; both runs then use that form (for plain
    SGD it is the same computation as ``backward()`` then ``step()``)."""
    from deepopt.experimental import legacy_kwargs
    from deepopt.recipes import resolve

    kw = legacy_kwargs({"recipe": recipe, **(overrides or {})})
    extra = kw.pop("mechanisms", [])
    settings = resolve(kw.pop("recipe"), kw)
    return settings.budget > 1 or any(m.needs_closure for m in extra)


def _initial_model(data: dict[str, Tensor], net: str, seed: int, batch_size: int) -> tuple[nn.Module, float]:
    """The seeded initial network and the signal ratio calibration will test on it."""
    torch.manual_seed(seed)
    model = build_net(net, length=data["x"].shape[1])
    # What start-up calibration will measure: the first batch of the shared data order.
    first = torch.randperm(len(data["x"]), generator=torch.Generator().manual_seed(seed))[:batch_size]
    return model, _init_signal_ratio(model, data["x"][first])


def _init_signal_ratio(model: nn.Module, x: Tensor) -> float:
    """The ratio start-up calibration tests: the most extreme std(layer k) / std(layer 1)."""
    from deepopt.mechanisms.calibrate import layer_output_stds, signal_ratio

    rng = torch.get_rng_state()  # a forward pass without side effects on either run
    try:
        return float(signal_ratio(layer_output_stds(model, (x,), {})))
    finally:
        torch.set_rng_state(rng)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": float(statistics.fmean(values)),
        "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0,
    }


def _summarise(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    metrics = {
        "final_test_acc": lambda r: r["test_acc"][-1],
        "max_test_acc": lambda r: max(r["test_acc"]),
        "train_seconds": lambda r: sum(r["epoch_seconds"]),
    }
    for key, fn in metrics.items():
        c = [fn(s["classical"]) for s in per_seed]
        d = [fn(s["deepopt"]) for s in per_seed]
        out[key] = {
            "classical": _mean_std(c),
            "deepopt": _mean_std(d),
            "difference": _mean_std([b - a for a, b in zip(c, d)]),
        }
    c_time = sum(sum(s["classical"]["epoch_seconds"]) for s in per_seed)
    d_time = sum(sum(s["deepopt"]["epoch_seconds"]) for s in per_seed)
    out["overhead_ratio"] = d_time / c_time if c_time > 0 else math.nan
    return out


def _run_seeds(
    data: dict[str, Tensor], *, net: str, epochs: int, seeds: range, progress: bool, **kwargs: Any
) -> list[dict[str, dict[str, Any]]]:
    """Every seed's pair in this process, the two runs of a pair interleaved epoch by epoch."""
    per_seed = []
    with progress_bar(total=len(seeds) * epochs, unit="epoch", enabled=progress) as bar:
        for s in seeds:
            bar.set_description(f"deepopt demo: {net}, seed {s}")

            def tick(epoch: int, c: float, d: float) -> None:
                bar.set_postfix_str(f"test acc classical {c:.1f}% | deepopt {d:.1f}%")
                bar.update(1)

            per_seed.append(train_pair(data, net=net, epochs=epochs, seed=s, on_epoch=tick, **kwargs))
    return per_seed


_MODES = ("classical", "deepopt")
# A worker process's shared inputs, set once by ``_start_worker``.
_WORKER: dict[str, Any] = {}


def _start_worker(data: dict[str, Tensor], ticks: Any, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(data=data, ticks=ticks)


def _train_alone(
    mode: str, *, net: str, epochs: int, seed: int, recipe: str, overrides: dict[str, Any] | None,
    lr: float, batch_size: int,
) -> dict[str, Any]:
    """One run of a pair in a worker process: the same init, data order and loop as
    :func:`train_pair` gives it (the network is rebuilt from the seed, bit-identically)."""
    data, ticks = _WORKER["data"], _WORKER["ticks"]
    model, ratio = _initial_model(data, net, seed, batch_size)
    activate = {"recipe": recipe, **(overrides or {})} if mode == "deepopt" else None
    run = _Run(model, lr, epochs, seed, activate, _needs_closure(recipe, overrides))
    for _ in range(epochs):
        run.epoch(data["x"], data["y"], batch_size)
        run.evaluate(data["x_test"], data["y_test"])
        ticks.put((seed, mode, run.test_acc[-1]))
    record = run.record()
    if mode == "deepopt":
        record["signal_ratio"] = ratio
    return record


def _run_parallel(
    data: dict[str, Tensor], *, net: str, epochs: int, seeds: range, progress: bool, workers: int,
    threads: int, **kwargs: Any,
) -> list[dict[str, dict[str, Any]]]:
    """Every run (seed x {classical, deepopt}) as its own task on ``workers`` processes.

    The two runs of a seed are submitted one after the other, so they run side by side
    and share the machine's load alike; their results equal :func:`_run_seeds`'s.
    """
    import multiprocessing
    import queue
    from concurrent.futures import ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # no fork of a process holding OpenMP threads
    ticks = context.Queue()
    kwargs = {"net": net, "epochs": epochs, **kwargs}
    with ProcessPoolExecutor(workers, context, _start_worker, (data, ticks, threads)) as pool:
        futures = {(s, m): pool.submit(_train_alone, m, seed=s, **kwargs) for s in seeds for m in _MODES}
        last = {}
        with progress_bar(total=len(futures) * epochs, unit="epoch", enabled=progress) as bar:
            bar.set_description(f"deepopt demo: {net}, {len(futures)} runs on {workers} processes")
            pending = set(futures.values())
            while bar.n < bar.total:
                try:
                    s, mode, acc = ticks.get(timeout=0.2)
                except queue.Empty:
                    pending = wait(pending, timeout=0)[1]
                    if not pending:  # all finished or failed: no tick is coming
                        break
                    continue
                last[mode] = f"{mode} (seed {s}) {acc:.1f}%"
                bar.set_postfix_str(" | ".join(last[m] for m in _MODES if m in last))
                bar.update(1)
        return [{m: futures[s, m].result() for m in _MODES} for s in seeds]


def run_demo(
    *,
    net: str = DEFAULT_NET,
    epochs: int | None = None,
    seeds: int = DEFAULT_SEEDS,
    seed: int = 0,
    recipe: str = "default",
    overrides: dict[str, Any] | None = None,
    lr: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    threads: int | None = 1,
    workers: int = 1,
    limit: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
    validation: bool = False,
) -> dict[str, Any]:
    """Run the demo's paired training runs over ``seeds`` seeds; return everything measured.

    Args:
        net, epochs, recipe, overrides, lr, batch_size: see :func:`train_pair`.
        seeds: number of seeds (``seed``, ``seed + 1``, ...), each a paired run.
        seed: first seed.
        threads: ``torch.set_num_threads`` value while training (restored after);
            ``None`` keeps the current setting. With ``workers > 1``: per process.
        workers: processes training side by side; each run (a seed's classical or
            deepopt half) is one task. ``1`` trains in this process, the two runs of a
            pair interleaved epoch by epoch. The results are the same either way.
        limit: use only the first ``limit`` training and test examples (quick checks).
        cache: dataset cache directory (default :func:`cache_dir`).
        progress: show a tqdm progress bar (on stderr).
        validation: train on the first 80% of the training set and evaluate on the last
            20% instead of the test set (for choosing settings without the test set).

    Returns:
        A JSON-serialisable dict: ``"config"``, ``"seeds"`` (per-seed per-epoch
        records of both runs) and ``"summary"`` (means, standard deviations across
        seeds, paired differences deepopt - classical, and the overhead ratio).

    Raises:
        ValueError: unknown net/recipe/override or a non-positive count.
    """
    import deepopt
    from deepopt.recipes import resolve

    if net not in NETS:
        raise ValueError(f"net={net!r} is unknown; choose one of {', '.join(NETS)}.")
    epochs = DEFAULT_EPOCHS[net] if epochs is None else epochs
    checked = (("epochs", epochs), ("seeds", seeds), ("batch_size", batch_size), ("workers", workers))
    for name, value in checked:
        if value < 1:
            raise ValueError(f"{name}={value} is invalid: it must be >= 1.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} is invalid: it must be >= 1.")
    settings = resolve(recipe, dict(overrides or {}))  # fail before any training
    data = load_mnist1d(cache)
    if validation:  # the generator shuffles classes, so a tail slice is a fair split
        cut = len(data["x"]) * 4 // 5
        data = {"x": data["x"][:cut], "y": data["y"][:cut], "x_test": data["x"][cut:], "y_test": data["y"][cut:]}
    if limit is not None:
        data = {
            "x": data["x"][:limit], "y": data["y"][:limit],
            "x_test": data["x_test"][:limit], "y_test": data["y_test"][:limit],
        }
    lr = LEARNING_RATES[net] if lr is None else lr

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    workers = min(workers, 2 * seeds)
    common = {
        "net": net, "epochs": epochs, "seeds": range(seed, seed + seeds), "recipe": recipe,
        "overrides": overrides, "lr": lr, "batch_size": batch_size, "progress": progress,
    }
    try:
        if workers > 1:
            per_seed = _run_parallel(data, workers=workers, threads=used_threads, **common)
        else:
            per_seed = _run_seeds(data, **common)
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "config": {
            "dataset": "MNIST-1D (mnist1d default arguments, generated offline)",
            "train_size": len(data["x"]),
            "test_size": len(data["x_test"]),
            "evaluated_on": "validation (last 20% of the training set)" if validation else "test",
            "net": net,
            "epochs": epochs,
            "seeds": list(range(seed, seed + seeds)),
            "recipe": recipe,
            "overrides": dict(overrides or {}),
            "settings": settings.as_dict(),
            "optimizer": {"name": "SGD", "lr": lr, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
            "lr_milestones": _milestones(epochs),
            "batch_size": batch_size,
            "threads": used_threads,
            "workers": workers,
            "limit": limit,
            "deepopt_version": deepopt.__version__,
            "torch_version": torch.__version__,
        },
        "seeds": [{"seed": s, **r} for s, r in zip(range(seed, seed + seeds), per_seed)],
        "summary": _summarise(per_seed),
    }


# -- command line ------------------------------------------------------------------------
def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings into deepopt overrides (numbers, true/false, none, text).

    Example:
        >>> parse_overrides(["rho=0.05", "average=ema", "guard=false"])
        {'rho': 0.05, 'average': 'ema', 'guard': False}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not KEY=VALUE, e.g. rho=0.05 or average=ema.")
        out[key.strip()] = _value(value)
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset and container CPU sets
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class _SeedsIsAList(argparse.Action):
    """``--seeds`` where the option is the number of seeds: an error that names the fix."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        parser.error("--seeds is a list of seeds (as on the benchmarks: python -m benchmarks ablation, seed6, zoo); "
                     "here give the number of seeds with --num-seeds N (seeds SEED, SEED+1, ...)")


def add_seeds_is_a_list(parser: argparse.ArgumentParser) -> None:
    """Make ``--seeds`` an error naming ``--num-seeds`` on a command that counts seeds.

    ``--seeds`` means a list of seeds on every deepopt command; a count has its own name.
    """
    parser.add_argument("--seeds", nargs="*", action=_SeedsIsAList, help=argparse.SUPPRESS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``deepopt demo`` options to ``parser``."""
    from deepopt.recipes import RECIPES

    parser.add_argument(
        "--net", choices=NETS, default=DEFAULT_NET,
        help="network to train: deep (20 plain conv layers, Xavier-uniform init, zero biases, no "
        "BatchNorm: the seed benchmark's Net 4 in 1-D, whose signal vanishes at init, so it "
        "stays at or near chance classically and trains once deepopt's start-up calibration rescales "
        "it), mlp (40-100-100-10 ReLU), cnn (the MNIST-1D paper's 3-layer conv net) or gru "
        "(the paper's bidirectional GRU, hidden 6). On mlp, cnn and gru the default recipe "
        "trains as classical does and, under this demo's LR drops, ends at or near the same final "
        "accuracy (its average window shrinks to a step or a few after the last drop); try --recipe thorough "
        "there. Default: %(default)s.",
    )
    parser.add_argument(
        "--epochs", type=_positive, default=None,
        help="passes over the 4,000 training sequences; the learning rate drops 10x at 50%% "
        "and 75%% of them. Default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())
        + " (a gru epoch costs about 10x a cnn epoch, a deep one about 4x).",
    )
    parser.add_argument(
        "--num-seeds", dest="seeds", type=_positive, default=DEFAULT_SEEDS, metavar="N",
        help="number of seeds; with N > 1 the table shows mean ± std over seeds and the "
        "paired difference (deepopt - classical, same seed). Default: %(default)s.",
    )
    add_seeds_is_a_list(parser)
    parser.add_argument(
        "--seed", type=int, default=0,
        help="first seed (seeds are SEED, SEED+1, ...); it fixes the initial weights and "
        "the mini-batch order, shared by both runs. Default: %(default)s.",
    )
    parser.add_argument(
        "--recipe", choices=sorted(RECIPES), default="default",
        help="deepopt recipe for the activated run: default (about 1x cost), thorough "
        "(the default plus exact two-pass SAM once the LR has fallen to a tenth of its peak: both "
        "runs then call optimizer.step(closure); up to 2x cost) or "
        "safe (start-up calibration and divergence guard only). Default: %(default)s.",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="deepopt setting replacing the recipe's, repeatable, e.g. --set rho=0.05 "
        "--set average=ema (see deepopt.Settings for the fields).",
    )
    parser.add_argument(
        "--lr", type=float, default=None,
        help="peak learning rate of SGD (momentum 0.9, weight decay 5e-4); default: "
        + ", ".join(f"{k} {v:g}" for k, v in LEARNING_RATES.items()) + ".",
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=DEFAULT_BATCH, help="mini-batch size. Default: %(default)s."
    )
    parser.add_argument(
        "--out", default="runs/demo", metavar="DIR",
        help="output directory for demo_<net>.png (test-accuracy curves) and demo_<net>.json "
        "(config and per-epoch numbers). Default: %(default)s.",
    )
    parser.add_argument(
        "--threads", type=_positive, default=1,
        help="CPU threads for torch (torch.set_num_threads) in each worker process; these "
        "networks are small, so more processes help more than more threads. Default: %(default)s.",
    )
    parser.add_argument(
        "--workers", type=_positive, default=_usable_cores(),
        help="processes training side by side, one run (a seed's classical or deepopt "
        "half) each; the results are the same as with 1. Default: the usable CPU cores "
        "(%(default)s here).",
    )
    parser.add_argument(
        "--limit", type=_positive, default=None, metavar="N",
        help="use only the first N training and N test examples (quick checks and tests).",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar."
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``deepopt demo`` arguments: print the table, write PNG and JSON."""
    try:
        overrides = parse_overrides(args.overrides)
        result = run_demo(
            net=args.net, epochs=args.epochs, seeds=args.seeds, seed=args.seed, recipe=args.recipe,
            overrides=overrides, lr=args.lr, batch_size=args.batch_size, threads=args.threads,
            workers=args.workers, limit=args.limit, progress=args.progress,
        )
    except ValueError as e:
        print(f"deepopt demo: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_curves(result, out / f"demo_{args.net}.png")
    js = out / f"demo_{args.net}.json"
    js.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"curves: {png}\nnumbers: {js}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepopt.demo [options]``: the same as ``deepopt demo [options]``."""
    parser = argparse.ArgumentParser(prog="deepopt demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
