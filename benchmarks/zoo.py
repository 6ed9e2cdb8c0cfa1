"""``python -m benchmarks zoo``: the training setups users run, small enough for seconds each.

The seed benchmark and the MNIST-1D suite train under step-drop schedules only, where
any weight average is worth about nothing by construction (the schedule already
averages). The zoo spans what people really run: no schedule, StepLR, cosine to zero,
OneCycle, warm-up + linear decay, ReduceLROnPlateau and the seed's drops; SGD, momentum
and Nesterov, Adam, AdamW, RMSprop; MLPs, plain and BatchNorm CNNs, residual nets, a
GRU and an LSTM, Transformer encoders with dropout, regression MLPs; cross-entropy,
label smoothing, BCE, MSE and a loss with a penalty term; data shipped offline
(MNIST-1D, scikit-learn's bundled sets) and a CIFAR-10 subset when ``--data`` is given.

Every setup has a train, a validation and a test split (fixed, generator seed 0).
Settings are chosen on ``split == "val"`` rows only; figures are reported from the
``"test"`` rows. One run trains once per (setup, seed) and writes a row per mode and
split:

* ``classical``: the user's loop as written. Evaluation-only candidates (weight
  averages, see :data:`OBSERVERS`) ride on the same trajectory: the training weights
  are bit-identical by construction, so each is paired with classical exactly, and its
  ``sec_per_step`` is the classical step plus its own measured update;
* modes that change training (``deepopt`` through :func:`deepopt.activate`, the exact
  SAM peer, ``deepopt:{"budget": 1.5}``) are runs of their own, on the same seed and data
  order;
* ``classical-x{b}`` (``b >= 1``): classical with its step budget multiplied by ``b`` and its
  schedule stretched to the new length (:func:`stretched_budget`), the user's alternative
  to spending ``b`` times the compute on deepopt (BENCHMARKS.md, section 5.1).

The metric is higher-is-better in points: accuracy in % for classification, and
``R^2`` in % (100 (1 - MSE / variance of the targets)) for regression; the language model
(``task="lm"``) is scored in bits per character, lower is better (each row says which in
``higher_is_better``). The setups marked ``headroom`` (still improving at the end of their
budget) are run by name only.

Example (shell)::

    python -m benchmarks zoo --seeds 0 1 2 3 4            # the offline setups
    python -m benchmarks zoo --data ../shared/data/cifar10-jpeg.tar --setups cifar-cnn-sgdm-const
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepopt.experimental import legacy_kwargs
from deepopt.mechanisms.average import WeightAverage, average_, power_gamma

__all__ = ["SETUPS", "OBSERVERS", "Setup", "load_data", "run_setup", "main"]

DEFAULT_OUT = "benchmarks/results/zoo.jsonl"
DEFAULT_COST = "benchmarks/results/zoo-cost.jsonl"

# -- data ------------------------------------------------------------------------------


def _split(n: int, val: float, test: float | None) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_val = int(round(val * n))
    n_test = 0 if test is None else int(round(test * n))
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def _standardized(parts: dict[str, Tensor], regression: bool) -> dict[str, Tensor]:
    """Features (and regression targets) standardized with the training split's statistics."""
    mean, std = parts["x"].mean(0), parts["x"].std(0).clamp_min(1e-6)
    out = {k: (v - mean) / std if k.startswith("x") else v for k, v in parts.items()}
    if regression:
        ym, ys = parts["y"].mean(), parts["y"].std()
        out.update({k: (v - ym) / ys for k, v in parts.items() if k.startswith("y")})
    return out


def _sklearn(name: str) -> dict[str, Tensor]:
    from sklearn import datasets

    if name == "friedman1":
        x, y = datasets.make_friedman1(n_samples=2000, noise=1.0, random_state=0)
    else:
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    regression = name in ("diabetes", "friedman1")
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.float32 if regression else torch.int64)
    tr, va, te = _split(len(y), 0.2, 0.2)
    parts = {"x": x[tr], "y": y[tr], "x_val": x[va], "y_val": y[va], "x_test": x[te], "y_test": y[te]}
    return _standardized(parts, regression)


def _mnist1d() -> dict[str, Tensor]:
    from deepopt.datasets import load_mnist1d

    d = load_mnist1d()
    tr, va, _ = _split(len(d["y"]), 0.2, None)
    return {"x": d["x"][tr], "y": d["y"][tr], "x_val": d["x"][va], "y_val": d["y"][va],
            "x_test": d["x_test"], "y_test": d["y_test"]}


def _cifar(path: str | None, train: int = 5000, val: int = 1000, test: int = 2000) -> dict[str, Tensor]:
    if path is None:
        raise FileNotFoundError("the CIFAR-10 setups need --data PATH (e.g. ../shared/data/cifar10-jpeg.tar)")
    from .data import load_cifar10_uint8, standardize

    x, y, xt, yt = load_cifar10_uint8(path)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)[: train + val].numpy()
    test_idx = torch.randperm(len(yt), generator=g)[:test].numpy()
    y, yt = torch.from_numpy(y), torch.from_numpy(yt)
    tr, va = order[:train], order[train:]
    return {"x": standardize(x[tr]), "y": y[tr], "x_val": standardize(x[va]), "y_val": y[va],
            "x_test": standardize(xt[test_idx]), "y_test": yt[test_idx]}


def _noisy_tabular(noise: float = 0.2) -> dict[str, Tensor]:
    """A 4-class synthetic table (scikit-learn's ``make_classification``, fixed seed) whose
    training labels are ``noise`` flipped to another class; validation and test labels clean."""
    from sklearn import datasets

    x, y = datasets.make_classification(n_samples=4000, n_features=20, n_informative=10, n_redundant=5,
                                        n_classes=4, n_clusters_per_class=2, flip_y=0.0, random_state=0)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    tr, va, te = _split(len(y), 0.2, 0.2)
    y_train = y[tr].clone()
    g = torch.Generator().manual_seed(0)
    flip = torch.rand(len(y_train), generator=g) < noise
    y_train[flip] = (y_train[flip] + torch.randint(1, 4, (int(flip.sum()),), generator=g)) % 4
    parts = {"x": x[tr], "y": y_train, "x_val": x[va], "y_val": y[va], "x_test": x[te], "y_test": y[te]}
    return _standardized(parts, regression=False)


#: Characters of the language-model corpus: ASCII, every other character as 127.
VOCAB = 128


def corpus_text() -> str:
    """Python's documentation topics (``pydoc_data.topics``, shipped with CPython: ~465k
    characters of the language reference in English), in sorted topic order."""
    import pydoc_data.topics as topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics))


def _chars(context: int = 64) -> dict[str, Tensor]:
    """Non-overlapping windows of ``context + 1`` characters of :func:`corpus_text`, split
    80/10/10 by window (generator seed 0); ``x`` a window's first ``context`` characters,
    ``y`` the next character at each position."""
    ids = torch.tensor([min(ord(c), VOCAB - 1) for c in corpus_text()], dtype=torch.int64)
    n = len(ids) // (context + 1)
    windows = ids[: n * (context + 1)].view(n, context + 1)
    tr, va, te = _split(n, 0.1, 0.1)
    return {"x": windows[tr, :-1], "y": windows[tr, 1:], "x_val": windows[va, :-1], "y_val": windows[va, 1:],
            "x_test": windows[te, :-1], "y_test": windows[te, 1:]}


_DATA_CACHE: dict[str, dict[str, Tensor]] = {}


def load_data(name: str, cifar: str | None = None) -> dict[str, Tensor]:
    """One dataset as ``x, y, x_val, y_val, x_test, y_test`` tensors (fixed splits)."""
    if name not in _DATA_CACHE:
        if name == "mnist1d":
            _DATA_CACHE[name] = _mnist1d()
        elif name == "cifar10":
            _DATA_CACHE[name] = _cifar(cifar)
        elif name == "noisy4":
            _DATA_CACHE[name] = _noisy_tabular()
        elif name == "pydoc-chars":
            _DATA_CACHE[name] = _chars()
        else:
            _DATA_CACHE[name] = _sklearn(name)
    return _DATA_CACHE[name]


# -- networks --------------------------------------------------------------------------


def mlp(n_in: int, n_out: int, width: int = 128, depth: int = 2, dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(width, n_out))


class Conv1dNet(nn.Module):
    """Three stride-2 convs (optionally with BatchNorm) and a linear head, for 40-long signals."""

    def __init__(self, bn: bool, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for k in (5, 3, 3):
            layers += [nn.Conv1d(c, channels, k, stride=2, padding=1, bias=not bn)]
            layers += [nn.BatchNorm1d(channels)] if bn else []
            layers += [nn.ReLU()]
            c = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * 5, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.view(len(x), 1, -1)).flatten(1))


class ResBlock(nn.Module):
    def __init__(self, conv: Callable[..., nn.Module], norm: Callable[[int], nn.Module], c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(c, c, 3, padding=1, bias=False), norm(c), nn.ReLU(),
                                  conv(c, c, 3, padding=1, bias=False), norm(c))

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.body(x)).relu()


class ResNet(nn.Module):
    """A stem conv, two residual blocks with BatchNorm, global average pool, linear head."""

    def __init__(self, dims: int, in_channels: int, channels: int = 32, classes: int = 10,
                 stem_stride: int = 1) -> None:
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        pool = nn.MaxPool1d(2) if dims == 1 else nn.MaxPool2d(2)
        self.dims, self.in_channels = dims, in_channels
        self.net = nn.Sequential(
            conv(in_channels, channels, 3, stride=stem_stride, padding=1, bias=False), norm(channels), nn.ReLU(),
            ResBlock(conv, norm, channels), pool, ResBlock(conv, norm, channels),
        )
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 1:
            x = x.view(len(x), 1, -1)
        h = self.net(x)
        return self.head(h.flatten(2).mean(2))


class Conv2dNet(nn.Module):
    """conv-pool-conv-pool (optionally BatchNorm) and a linear head, for small images."""

    def __init__(self, in_channels: int, side: int, bn: bool, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn),
                    *([nn.BatchNorm2d(cout)] if bn else []), nn.ReLU(), nn.MaxPool2d(2)]
        self.in_channels, self.side = in_channels, side
        self.features = nn.Sequential(*block(in_channels, width), *block(width, 2 * width))
        self.head = nn.Linear(2 * width * (side // 4) ** 2, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(len(x), self.in_channels, self.side, self.side)
        return self.head(self.features(x).flatten(1))


class RNNNet(nn.Module):
    """A GRU or LSTM over the signal (``chunk`` values per step), last hidden state -> linear."""

    def __init__(self, kind: str, hidden: int = 32, chunk: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.chunk = chunk
        self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(chunk, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.view(len(x), -1, self.chunk))
        return self.head(out[:, -1])


class TransformerNet(nn.Module):
    """Tokens of ``patch`` values, a learned position embedding, a 2-layer encoder with dropout."""

    def __init__(self, length: int, patch: int, d: int = 32, classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, d)
        self.pos = nn.Parameter(torch.zeros(1, length // patch, d))
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.reshape(len(x), -1, self.patch)) + self.pos
        return self.head(self.encoder(h).mean(1))


class ViT(nn.Module):
    """A small vision transformer: 4x4 patches of a 32x32 image, a pre-norm encoder, mean pool."""

    def __init__(self, d: int = 48, depth: int = 2, heads: int = 4, patch: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(3, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (32 // patch) ** 2, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(h)).mean(1))


class CharLM(nn.Module):
    """A causal character-level transformer (pre-norm, learned positions): logits per position."""

    def __init__(self, vocab: int = VOCAB, d: int = 48, depth: int = 2, heads: int = 4, context: int = 64,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, context, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.pos[:, :t]
        return self.head(self.norm(self.encoder(h, mask=self.mask[:t, :t], is_causal=True)))


def crop_flip(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random ``pad``-pixel crop (zero padding) and horizontal flip of a batch, with torch ops."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    i = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    j = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = i[:, None] + torch.arange(h)
    cols = j[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]


def seed_net6() -> nn.Module:
    from .nets import build_net

    return build_net(6)


# -- losses and schedules --------------------------------------------------------------


def cross_entropy(out: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    return F.cross_entropy(out, y)


def label_smoothing(out: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    return F.cross_entropy(out, y, label_smoothing=0.1)


def bce(out: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    return F.binary_cross_entropy_with_logits(out.squeeze(1), y.float())


def next_char(out: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    """Cross-entropy of every position's next character (a language model's loss)."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def mse(out: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    return F.mse_loss(out.squeeze(1), y)


def mse_l1(out: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    """MSE plus an L1 penalty on the weight matrices (a regularizer written into the loss)."""
    penalty = sum(p.abs().sum() for n, p in model.named_parameters() if p.dim() > 1)
    return F.mse_loss(out.squeeze(1), y) + 1e-4 * penalty


def schedule(kind: str, opt: torch.optim.Optimizer, steps: int, epochs: int) -> Any:
    """The LR scheduler ``kind`` over ``steps`` optimizer steps (``epochs`` epochs)."""
    lr = opt.param_groups[0]["lr"]
    if kind == "none":
        return None
    if kind == "step":  # x0.3 every third of the run, stepped per batch
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, steps // 3), gamma=0.3)
    if kind == "drops":  # the seed protocol's shape: /10 at 30, 60 and 80% of the run
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(f * steps) for f in (0.3, 0.6, 0.8)], gamma=0.1)
    if kind == "multistep":  # /10 at 50 and 75%
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[steps // 2, 3 * steps // 4], gamma=0.1)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    if kind == "warmup-linear":  # 10% linear warm-up, then linear decay to zero
        warm = max(1, steps // 10)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    if kind == "warmup-cosine":  # 10% linear warm-up, then cosine to zero
        warm = max(1, steps // 10)
        def factor(s: int) -> float:
            if s < warm:
                return (s + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if kind == "plateau":  # stepped per epoch on the training loss (never the val split)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=max(1, epochs // 10))
    raise ValueError(f"schedule {kind!r} is unknown")


def tail_share(kind: str, steps: int, epochs: int, train_loss: list[float] | None = None,
               ceiling: float = 0.1) -> float:
    """The share of a run's steps whose LR is at most ``ceiling`` times the largest so far.

    Replays schedule ``kind`` on a dummy optimizer (``"plateau"`` on the run's per-epoch
    ``train_loss``): where SAM limited to the low-LR tail takes its second pass.

    Example:
        >>> tail_share("none", 100, 10), round(tail_share("cosine", 1000, 10), 2)
        (0.0, 0.2)
    """
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = schedule(kind, opt, steps, epochs)
    per_epoch, peak, tail = max(1, steps // epochs), 0.0, 0
    for i in range(steps):
        lr = opt.param_groups[0]["lr"]
        peak = max(peak, lr)
        tail += lr <= ceiling * peak
        if sched is not None and kind != "plateau":
            opt.step()  # (no gradient: nothing moves) keeps the scheduler's order warning away
            sched.step()
        elif kind == "plateau" and (i + 1) % per_epoch == 0 and train_loss:
            sched.step(train_loss[min((i + 1) // per_epoch, len(train_loss)) - 1])
    return tail / steps


@dataclass(frozen=True)
class Setup:
    """One training setup: data, network, loss, optimizer, schedule and budget."""

    name: str
    family: str
    data: str
    net: Callable[[], nn.Module]
    optimizer: Callable[[Any], torch.optim.Optimizer]
    schedule: str
    loss: Callable[[Tensor, Tensor, nn.Module], Tensor]
    epochs: int
    batch_size: int = 64
    task: str = "classification"  # "classification" | "binary" | "regression" | "lm"
    eval_points: int = 4  # evaluate the averages at this many evenly spaced epochs
    notes: str = ""
    #: training-batch augmentation ``augment(x, generator)`` (its own generator, seeded per run)
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None
    #: one of the setups with headroom added for the compute frontier (issue 42): not in
    #: the default ``--setups``, whose figures stay those of the 19 setups
    headroom: bool = False


def _sgd(lr: float, momentum: float = 0.0, nesterov: bool = False, wd: float = 0.0):
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)


def _adam(lr: float):
    return lambda p: torch.optim.Adam(p, lr=lr)


def _adamw(lr: float, wd: float = 0.01):
    return lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=wd)


def _rmsprop(lr: float):
    return lambda p: torch.optim.RMSprop(p, lr=lr)


_SETUPS = [
    Setup("digits-mlp-adam-none", "MLP", "digits", lambda: mlp(64, 10), _adam(1e-3), "none",
          cross_entropy, 30, 32),
    Setup("digits-cnnbn-sgd-none", "CNN + BatchNorm", "digits", lambda: Conv2dNet(1, 8, bn=True),
          _sgd(0.05), "none", cross_entropy, 20, 32),
    Setup("digits-transformer-adam-none", "Transformer", "digits",
          lambda: TransformerNet(64, 8), _adam(1e-3), "none", cross_entropy, 30, 32),
    Setup("mnist1d-mlp-sgdm-step", "MLP", "mnist1d", lambda: mlp(40, 10), _sgd(0.02, 0.9), "step",
          cross_entropy, 30),
    Setup("mnist1d-mlpdrop-sgd-none", "MLP", "mnist1d", lambda: mlp(40, 10, 256, dropout=0.2),
          _sgd(0.05), "none", cross_entropy, 40),
    Setup("mnist1d-cnn-adamw-cosine", "CNN", "mnist1d", lambda: Conv1dNet(bn=False), _adamw(3e-3),
          "cosine", cross_entropy, 30),
    Setup("mnist1d-cnnbn-nesterov-onecycle", "CNN + BatchNorm", "mnist1d", lambda: Conv1dNet(bn=True),
          _sgd(0.1, 0.9, nesterov=True, wd=5e-4), "onecycle", label_smoothing, 20),
    Setup("mnist1d-resnet-sgdm-multistep", "ResNet", "mnist1d", lambda: ResNet(1, 1),
          _sgd(0.05, 0.9, wd=5e-4), "multistep", cross_entropy, 15),
    Setup("mnist1d-gru-adam-plateau", "RNN", "mnist1d", lambda: RNNNet("gru"), _adam(3e-3), "plateau",
          cross_entropy, 20),
    Setup("mnist1d-lstm-rmsprop-none", "RNN", "mnist1d", lambda: RNNNet("lstm"), _rmsprop(2e-3), "none",
          cross_entropy, 20),
    Setup("mnist1d-transformer-adamw-warmup", "Transformer", "mnist1d", lambda: TransformerNet(40, 4),
          _adamw(2e-3), "warmup-linear", cross_entropy, 25),
    Setup("breast-mlp-rmsprop-none", "MLP (binary)", "breast_cancer", lambda: mlp(30, 1, 64),
          _rmsprop(1e-3), "none", bce, 40, 32, task="binary"),
    Setup("breast-mlp-sgdm-cosine", "MLP (binary)", "breast_cancer", lambda: mlp(30, 1, 64),
          _sgd(0.01, 0.9), "cosine", bce, 40, 32, task="binary"),
    Setup("diabetes-mlp-adam-none", "MLP regression", "diabetes", lambda: mlp(10, 1, 64), _adam(1e-3),
          "none", mse_l1, 60, 32, task="regression"),
    Setup("friedman-mlp-sgdm-cosine", "MLP regression", "friedman1", lambda: mlp(10, 1), _sgd(0.01, 0.9),
          "cosine", mse_l1, 40, 32, task="regression"),
    Setup("friedman-mlp-adamw-onecycle", "MLP regression", "friedman1", lambda: mlp(10, 1), _adamw(3e-3),
          "onecycle", mse, 40, 32, task="regression"),
    Setup("cifar-cnn-sgdm-none", "CNN", "cifar10", lambda: Conv2dNet(3, 32, bn=False, width=16),
          _sgd(0.01, 0.9), "none", cross_entropy, 8),
    Setup("cifar-resnet-adam-cosine", "ResNet", "cifar10", lambda: ResNet(2, 3, 16, stem_stride=2),
          _adam(2e-3), "cosine", label_smoothing, 8),
    Setup("cifar-seednet6-sgdm-drops", "seed protocol (net 6)", "cifar10", seed_net6,
          _sgd(0.01, 0.9, wd=5e-4), "drops", cross_entropy, 20,
          notes="the seed benchmark's net 6, optimizer, weight decay, schedule shape and batch "
          "size, on a 5k-image subset"),
    # -- setups with headroom (issue 42): still improving at the end of their budget --
    Setup("cifar-resnet-aug-sgdm-cosine", "ResNet + augmentation", "cifar10", lambda: ResNet(2, 3, 16, stem_stride=2),
          _sgd(0.05, 0.9, nesterov=True, wd=5e-4), "cosine", cross_entropy, 8, augment=crop_flip, headroom=True,
          notes="random 4-pixel crop and horizontal flip (torch ops), 5k-image subset"),
    Setup("cifar-vit-adamw-warmcos", "ViT + augmentation", "cifar10", lambda: ViT(48, 2), _adamw(1e-3, 0.05),
          "warmup-cosine", cross_entropy, 5, augment=crop_flip, headroom=True,
          notes="4x4 patches, 2 pre-norm layers of width 48, crop and flip, 5k-image subset"),
    Setup("pydoc-charlm-adamw-warmcos", "char-level LM", "pydoc-chars", lambda: CharLM(d=48), _adamw(2e-3, 0.01),
          "warmup-cosine", next_char, 2, 32, task="lm", headroom=True,
          notes="Python's pydoc topics (shipped with CPython), 64-character windows; metric bits per "
          "character, lower is better"),
    Setup("noisy4-mlp-sgdm-none", "MLP (noisy labels)", "noisy4", lambda: mlp(20, 4, 256, depth=3),
          _sgd(0.05, 0.9), "none", cross_entropy, 40, headroom=True,
          notes="make_classification, 4 classes, 20% of the training labels flipped (val/test clean)"),
]

#: The zoo's setups by name.
SETUPS: dict[str, Setup] = {s.name: s for s in _SETUPS}


# -- evaluation-only candidates (weight averages on the classical trajectory) -----------


class Observer:
    """An average of the training weights (and float buffers), folded in after each step."""

    def __init__(self, model: nn.Module, steps_per_epoch: int) -> None:
        self.tensors: list[Tensor] | None = None
        self.count = 0
        self.max_lr = 0.0
        self.steps_per_epoch = steps_per_epoch

    def weight(self, lr: float) -> float:
        raise NotImplementedError

    def update(self, model: nn.Module, lr: float, xb: Tensor | None = None) -> None:
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        self.count += 1
        self.max_lr = max(self.max_lr, lr)
        if self.tensors is None:
            self.tensors = [t.clone() for t in current]
            return
        average_(self.tensors, current, self.weight(lr))

    def eval_model(self, model: nn.Module, scratch: nn.Module) -> nn.Module:
        with torch.no_grad():
            for t, a in zip((*scratch.parameters(), *scratch.buffers()), self.tensors):
                t.copy_(a)
        return scratch


class Shipped(Observer):
    """deepopt's own :class:`~deepopt.mechanisms.average.WeightAverage`, folded every step.

    The same code ``deepopt.activate(average=...)`` runs, so a candidate screened here is
    the mechanism that ships (``tests/test_zoo.py`` checks the two bit for bit).
    """

    def __init__(self, model: nn.Module, steps_per_epoch: int, **average: Any) -> None:
        super().__init__(model, steps_per_epoch)
        self.average = WeightAverage(**average)

    def update(self, model: nn.Module, lr: float, xb: Tensor | None = None) -> None:
        self.max_lr = max(self.max_lr, lr)
        self.average.update([t.detach() for t in (*model.parameters(), *model.buffers())], lr=lr,
                            max_lr=self.max_lr)
        self.tensors = self.average.tensors


class LrWeightedPower(Observer):
    """Power-function EMA over LR-weighted time: each iterate weighs by its LR (schedule-free's rule)."""

    def __init__(self, model: nn.Module, steps_per_epoch: int, sigma_rel: float) -> None:
        super().__init__(model, steps_per_epoch)
        self.gamma = power_gamma(sigma_rel)
        self.tau = 0.0  # LR-weighted step count

    def weight(self, lr: float) -> float:
        if self.max_lr <= 0:
            return 0.0
        tau0, self.tau = self.tau, self.tau + lr / self.max_lr
        if self.tau <= 0:
            return 0.0
        return 1.0 - (tau0 / self.tau) ** (self.gamma + 1.0)


class Lawa(Observer):
    """Uniform average of the last ``k`` epoch-end weights (LAWA, Kaddour 2022)."""

    def __init__(self, model: nn.Module, steps_per_epoch: int, k: int = 5) -> None:
        super().__init__(model, steps_per_epoch)
        self.k, self.snapshots = k, []

    def update(self, model: nn.Module, lr: float, xb: Tensor | None = None) -> None:
        self.count += 1
        if self.tensors is not None and self.count % self.steps_per_epoch:
            return
        snap = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
        if self.tensors is None:  # before the first epoch ends: the first iterate
            self.tensors = snap
            return
        self.snapshots = [*self.snapshots, snap][-self.k:]
        self.tensors = [
            torch.stack([s[i] for s in self.snapshots]).float().mean(0).to(last.dtype)
            if last.is_floating_point() else last.clone()
            for i, last in enumerate(snap)
        ]


class SwaUtilsEma(Observer):
    """Peer: ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(0.999)``."""

    def __init__(self, model: nn.Module, steps_per_epoch: int) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        super().__init__(model, steps_per_epoch)
        self.avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)

    def update(self, model: nn.Module, lr: float, xb: Tensor | None = None) -> None:
        self.avg.update_parameters(model)

    def eval_model(self, model: nn.Module, scratch: nn.Module) -> nn.Module:
        return self.avg.module


class EmaPytorch(Observer):
    """Peer: ``ema_pytorch.EMA`` with its defaults (a bench-only extra)."""

    def __init__(self, model: nn.Module, steps_per_epoch: int) -> None:
        from ema_pytorch import EMA

        super().__init__(model, steps_per_epoch)
        self.ema = EMA(model)

    def update(self, model: nn.Module, lr: float, xb: Tensor | None = None) -> None:
        self.ema.update()

    def eval_model(self, model: nn.Module, scratch: nn.Module) -> nn.Module:
        return self.ema.ema_model


class PreciseBN(Observer):
    """Another observer's weights, with BatchNorm statistics recomputed for them (Wu & Johnson 2021).

    The statistics are the plain mean and variance over the last ``batches`` training inputs,
    computed at the averaged weights; nets without BatchNorm evaluate as the inner observer.
    """

    def __init__(self, inner: Observer, batches: int = 16) -> None:
        self.inner, self.batches, self.inputs = inner, batches, []

    def update(self, model: nn.Module, lr: float, xb: Tensor | None = None) -> None:
        self.inner.update(model, lr)
        if xb is not None:
            self.inputs = [*self.inputs, xb][-self.batches:]

    def eval_model(self, model: nn.Module, scratch: nn.Module) -> nn.Module:
        net = self.inner.eval_model(model, scratch)
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return net
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        was = net.training
        net.train()
        with torch.no_grad():
            for xb in self.inputs:
                net(xb)
        net.train(was)
        for m, mom in zip(norms, saved):
            m.momentum = mom
        return net


#: Evaluation-only candidates and peers: name -> (factory(model, steps_per_epoch), settings).
OBSERVERS: dict[str, tuple[Callable[[nn.Module, int], Observer], dict]] = {
    "peer-ema-swa-utils": (SwaUtilsEma, {"peer": "torch.optim.swa_utils", "decay": 0.999, "use_buffers": True}),
    "peer-ema-pytorch": (EmaPytorch, {"peer": "ema_pytorch.EMA", "defaults": True}),
    "ema-0.999": (lambda m, s: Shipped(m, s, kind="ema", decay=0.999), {"average": "ema", "ema_decay": 0.999}),
    "ema-0.999-lrwin": (lambda m, s: Shipped(m, s, kind="ema", decay=0.999, follows_lr=True),
                        {"average": "ema", "ema_decay": 0.999,
                                                               "window_follows_lr": True}),
    "power-0.05": (lambda m, s: Shipped(m, s, kind="power", width=0.05), {"average": "power", "sigma_rel": 0.05}),
    "power-0.10": (lambda m, s: Shipped(m, s, kind="power", width=0.10), {"average": "power", "sigma_rel": 0.10}),
    "power-0.20": (lambda m, s: Shipped(m, s, kind="power", width=0.20), {"average": "power", "sigma_rel": 0.20}),
    "power-0.05-lrwin": (lambda m, s: Shipped(m, s, kind="power", width=0.05, follows_lr=True),
                         {"average": "power", "sigma_rel": 0.05, "window_follows_lr": True}),
    "power-0.10-lrwin": (lambda m, s: Shipped(m, s, kind="power", width=0.10, follows_lr=True),
                         {"average": "power", "sigma_rel": 0.10, "window_follows_lr": True}),
    "power-0.10-lrweights": (lambda m, s: LrWeightedPower(m, s, 0.10),
                             {"average": "power", "sigma_rel": 0.10, "weights": "lr"}),
    "lawa-5": (lambda m, s: Lawa(m, s, 5), {"average": "lawa", "k": 5, "every": "epoch"}),
    "power-0.05-lrwin-precisebn": (lambda m, s: PreciseBN(Shipped(m, s, kind="power", width=0.05,
                                                                  follows_lr=True)),
                                   {"average": "power", "sigma_rel": 0.05, "window_follows_lr": True,
                                    "bn": "recomputed on the last 16 training batches"}),
}


# -- training --------------------------------------------------------------------------


def _metric(model: nn.Module, x: Tensor, y: Tensor, task: str) -> float:
    """Accuracy in % (classification, binary), ``R^2`` in % (regression): higher is better;
    bits per character (``"lm"``): lower is better (:func:`higher_is_better`)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + 1024]) for i in range(0, len(x), 1024)])
    model.train(was)
    if task == "lm":
        return F.cross_entropy(out.flatten(0, 1), y.flatten()).item() / math.log(2)
    if task == "classification":
        return 100.0 * (out.argmax(1) == y).float().mean().item()
    if task == "binary":
        return 100.0 * ((out.squeeze(1) > 0).long() == y).float().mean().item()
    err = (out.squeeze(1) - y).pow(2).mean().item()
    return 100.0 * (1.0 - err / y.var(unbiased=False).item())


def higher_is_better(task: str) -> bool:
    """Whether a larger metric is better: all tasks but the language model's bits per character."""
    return task != "lm"


def stretch_of(mode: str) -> float:
    """The step-budget factor of a mode: ``b`` for ``classical-x{b}``, else 1.

    Example:
        >>> stretch_of("classical-x1.5"), stretch_of("classical"), stretch_of("deepopt")
        (1.5, 1.0, 1.0)
    """
    if mode.startswith("classical-x"):
        try:
            b = float(mode[len("classical-x"):])
        except ValueError:
            b = float("nan")
        if not (math.isfinite(b) and b >= 1.0):
            raise ValueError(f"mode {mode!r}: the stretch must be a number >= 1, e.g. classical-x1.5")
        return b
    return 1.0


def stretched_budget(setup: Setup, n: int, stretch: float = 1.0) -> tuple[int, int, int, int]:
    """``(steps per epoch, steps, epochs run, schedule epochs)`` of ``setup`` on ``n`` training
    examples with its step budget multiplied by ``stretch``.

    The steps are ``round(stretch * steps)`` (the last epoch may be partial); the schedule
    is built for that many steps, so every length in it scales with them (milestones,
    cosine period, OneCycle total, StepLR step size, warm-up), and ReduceLROnPlateau's
    patience with the schedule epochs, ``round(stretch * epochs)``.

    Example:
        >>> s = SETUPS["mnist1d-mlp-sgdm-step"]
        >>> stretched_budget(s, 3200), stretched_budget(s, 3200, 1.25)
        ((50, 1500, 30, 30), (50, 1875, 38, 38))
    """
    per_epoch = n // setup.batch_size  # the last short batch is dropped: equal steps
    steps = int(round(stretch * per_epoch * setup.epochs))
    return per_epoch, steps, -(-steps // per_epoch), int(round(stretch * setup.epochs))


def _activate_kwargs(mode: str) -> tuple[dict | None, bool]:
    """``deepopt.activate`` keyword arguments of a training mode, and whether it uses a closure."""
    if mode == "classical" or mode.startswith("classical-x"):
        stretch_of(mode)  # a malformed stretch fails here, before any training
        return None, False
    if mode == "deepopt":
        return {}, False
    if mode == "peer-sam":  # exact SAM, rho 0.05 (Foret et al.), two passes every step
        return {"recipe": "safe", "sam_rho": 0.05}, True
    if mode.startswith("deepopt:"):  # e.g. deepopt:{"average": "ema"} or deepopt:{"budget": 1.5}
        kwargs = json.loads(mode.split(":", 1)[1])
        return kwargs, _needs_closure(kwargs)
    raise ValueError(f"mode {mode!r} is unknown: classical, classical-x{{b}}, deepopt, peer-sam or "
                     "deepopt:{{json overrides}}")


def _needs_closure(kwargs: dict) -> bool:
    """Whether a mode drives ``optimizer.step(closure)``: a budget above 1 (two-pass SAM on part
    of the steps), a mechanism that acts only through a closure, or (rows of deepopt 0.1-0.2)
    a ``sam_rho`` above 0 in the resolved settings."""
    if float(kwargs.get("budget", 1.0)) > 1.0:
        return True
    if any(getattr(m, "needs_closure", False) for m in _activation(kwargs).get("mechanisms", [])):
        return True
    resolved = _resolved(kwargs)
    return float(resolved.get("budget", 1.0) or 1.0) > 1.0 or float(resolved.get("sam_rho", 0.0) or 0.0) > 0


def run_setup(setup: Setup, seed: int, mode: str, data: dict[str, Tensor],
              observers: dict[str, tuple] | None = None) -> list[dict]:
    """Train ``setup`` once on ``seed``; the rows of ``mode`` (and of ``observers`` if classical).

    ``classical-x{b}`` is classical with its step budget multiplied by ``b`` and its schedule
    stretched to the new length (:func:`stretched_budget`): the same seed, initial weights
    and data order, so its first steps are those of ``classical``'s (``x1`` is ``classical``).
    """
    import deepopt

    torch.manual_seed(seed)
    model = setup.net()
    base = setup.optimizer(model.parameters())
    n = len(data["y"])
    per_epoch, steps, epochs, sched_epochs = stretched_budget(setup, n, stretch_of(mode))
    sched = schedule(setup.schedule, base, steps, sched_epochs)
    kwargs, closure = _activate_kwargs(mode)
    opt = base
    if kwargs is not None:
        model, opt = deepopt.activate(model, base, **_activation(kwargs))
        if kwargs.get(ANNOUNCE):
            opt.total_steps = steps
    observers = (observers or {}) if mode == "classical" else {}
    obs = {name: make(model, per_epoch) for name, (make, _) in observers.items()}
    with torch.random.fork_rng():  # the scratch net's init must not move the RNG of dropout
        scratch = setup.net() if obs else None
    obs_seconds = dict.fromkeys(obs, 0.0)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed)
    curves: dict[str, dict[str, list]] = {m: {"val": [], "test": []} for m in [mode, *obs]}
    train_loss: list[float] = []
    step_seconds = cpu_seconds = 0.0
    done = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=order_gen)
        total = 0.0
        in_epoch = min(per_epoch, steps - done)
        for b in range(in_epoch):
            idx = perm[b * setup.batch_size:(b + 1) * setup.batch_size]
            xb, yb = data["x"][idx], data["y"][idx]
            if setup.augment is not None:
                xb = setup.augment(xb, aug_gen)
            t0, c0 = time.perf_counter(), time.process_time()
            if closure:
                def closure_fn(xb=xb, yb=yb):
                    opt.zero_grad(set_to_none=True)
                    loss = setup.loss(model(xb), yb, model)
                    loss.backward()
                    return loss
                loss = opt.step(closure_fn)
            else:
                loss = setup.loss(model(xb), yb, model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            lr = float(base.param_groups[0]["lr"])  # the LR this step used
            if sched is not None and setup.schedule != "plateau":
                sched.step()
            step_seconds += time.perf_counter() - t0
            cpu_seconds += time.process_time() - c0
            for name, o in obs.items():
                t1 = time.perf_counter()
                o.update(model, lr, xb)
                obs_seconds[name] += time.perf_counter() - t1
            total += float(loss.detach())
        done += in_epoch
        train_loss.append(total / in_epoch)
        if setup.schedule == "plateau":
            sched.step(train_loss[-1])
        last = epoch == epochs - 1
        for split in ("val", "test"):
            x, y = data[f"x_{split}"], data[f"y_{split}"]
            curves[mode][split].append(_metric(model, x, y, setup.task))
            for name, o in obs.items():
                score = None
                every = max(1, setup.epochs // setup.eval_points)
                if last or (epoch + 1) % every == 0:
                    with torch.random.fork_rng():  # evaluating a candidate leaves training as it was
                        score = _metric(o.eval_model(model, scratch), x, y, setup.task)
                curves[name][split].append(score)
    if not math.isfinite(train_loss[-1]):
        print(f"  {setup.name} seed {seed} {mode}: training loss {train_loss[-1]}", file=sys.stderr)
    resolved = None if kwargs is None else _resolved(kwargs)
    sam = opt.mechanism("sam") if hasattr(opt, "mechanism") else None
    two_pass = getattr(sam, "two_pass_steps", 0)  # steps that took SAM's second pass
    rows = []
    for name in curves:
        settings = (observers[name][1] if name in obs else (_activate_kwargs(mode)[0] or {}))
        sps = (step_seconds + obs_seconds.get(name, 0.0)) / steps
        row = {
            "setup": setup.name, "seed": seed, "mode": name, "settings": settings,
            "resolved": resolved if name == mode else None, "trajectory": mode, "split": "",
            "final": None, "per_epoch": None, "train_loss": train_loss,
            "sec_per_step": sps, "steps": steps, "epochs": epochs,
            "task": setup.task, "family": setup.family, "schedule": setup.schedule,
            "optimizer": type(base).__name__, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "stretch": stretch_of(mode),
            "cpu_sec_per_step": (cpu_seconds + obs_seconds.get(name, 0.0)) / steps,
            "higher_is_better": higher_is_better(setup.task),
            "two_pass_share": two_pass / steps if name == mode else 0.0,
        }
        for split in ("val", "test"):
            rows.append({**row, "split": split, "final": curves[name][split][-1], "per_epoch": curves[name][split]})
    return rows


def measure_cost(setup: Setup, mode: str, data: dict[str, Tensor], steps: int = 240, block: int = 20) -> dict:
    """CPU time per step of ``mode`` against classical, in alternating blocks in this process.

    Wall-clock times of separate runs on a shared machine differ by the load of the moment
    (up to 2x here); alternating blocks timed with the process's CPU clock see the same
    load, so their ratio is the mechanism's cost. The first block of each is a warm-up.
    """
    import deepopt

    from .overhead import alternating_ms

    kwargs, closure = _activate_kwargs(mode)
    runs = []
    for activated in (False, True):
        torch.manual_seed(0)
        model = setup.net()
        opt = base = setup.optimizer(model.parameters())
        if activated and kwargs is not None:
            model, opt = deepopt.activate(model, base, **_activation(kwargs))
        runs.append((model, opt))
    gen = torch.Generator().manual_seed(0)

    def stepper(model: nn.Module, opt: torch.optim.Optimizer, two_pass: bool) -> Callable[[int], None]:
        def one_step(i: int) -> None:
            idx = torch.randint(len(data["y"]), (setup.batch_size,), generator=gen)
            xb, yb = data["x"][idx], data["y"][idx]

            def loss_and_grad():
                opt.zero_grad(set_to_none=True)
                loss = setup.loss(model(xb), yb, model)
                loss.backward()
                return loss

            if two_pass:
                opt.step(loss_and_grad)
            else:
                loss_and_grad()
                opt.step()
        return one_step

    base_ms, mode_ms = alternating_ms(stepper(*runs[0], False), stepper(*runs[1], closure),
                                      steps=steps, block=block)
    return {"setup": setup.name, "mode": mode, "ms_per_step_classical": base_ms, "ms_per_step": mode_ms,
            "ratio": mode_ms / base_ms, "steps": steps, "threads": torch.get_num_threads(),
            "resolved": None if kwargs is None else _resolved(kwargs), "torch": torch.__version__}


def budget_cost(setup: Setup, mode: str, budget: float, data: dict[str, Tensor], prices: dict[str, dict]) -> dict:
    """The cost of ``deepopt:{"budget": b}`` against classical from two timed step prices.

    A budget run takes SAM's second pass on a share of its steps chosen as it goes (the last
    share of a run that announces its length, else the low-LR tail, never more than the
    share ``b`` buys, :func:`_budget_accounting`): a block median of its first steps would
    miss them. So the one-pass step (``deepopt``, budget 1) and the two-pass step (the largest
    budget: every step) are each timed against classical in alternating blocks
    (:func:`measure_cost`), and the row's ``ratio`` is the cost of spending the budget in
    full, ``(1 - share) * one + share * two``; a run's own cost is ``(1 - s) * one + s * two``
    with ``s`` its ``two_pass_share`` (in its rows).
    """
    top, share = _budget_accounting(budget)
    for key, m in (("one", "deepopt"), ("two", 'deepopt:{"budget": ' + f"{top:g}" + "}")):
        if key not in prices:
            prices[key] = measure_cost(setup, m, data)
    one, two = prices["one"]["ratio"], prices["two"]["ratio"]
    return {"setup": setup.name, "mode": mode, "ms_per_step_classical": prices["one"]["ms_per_step_classical"],
            "ms_per_step": prices["one"]["ms_per_step"] * (1 - share) + prices["two"]["ms_per_step"] * share,
            "ratio": (1 - share) * one + share * two, "ratio_one_pass": one, "ratio_two_pass": two,
            "budget": budget, "steps": prices["one"]["steps"], "threads": torch.get_num_threads(),
            "resolved": _resolved(_activate_kwargs(mode)[0] or {}), "torch": torch.__version__}


def _budget_accounting(budget: float) -> tuple[float, float]:
    """The library's largest budget (two passes on every step) and the share of two-pass steps
    ``budget`` buys: ``(2, b - 1)`` as ``budget`` first landed, ``(2.25, (b - 1) / 1.25)`` since."""
    from deepopt.mechanisms import budget as accounting

    top = float(getattr(accounting, "TWO_PASS_COST", 2.0))
    sam = accounting.BudgetSAM(budget)
    return top, float(getattr(sam, "share", budget - 1.0))


def _experimental(kwargs: dict) -> list:
    """The mechanisms of a mode's ``"experimental"`` entry: ``[{"class": "SwitchAverage", **args}]``."""
    import deepopt.experimental as experimental

    out = []
    for e in kwargs.get("experimental", []):
        cls = getattr(experimental, e.get("class", ""), None)
        if not isinstance(cls, type):
            raise ValueError(f"experimental class {e.get('class')!r} is unknown: use one of "
                             f"{', '.join(n for n in experimental.__all__ if n[0].isupper())}.")
        out.append(cls(**{k: v for k, v in e.items() if k != "class"}))
    return out


#: A mode key of the zoo's own (not a setting): the loop tells deepopt the run's length in
#: steps (``optimizer.total_steps = steps``), as the Lightning and Trainer callbacks do.
ANNOUNCE = "announce_length"


def _activation(kwargs: dict) -> dict:
    """``deepopt.activate`` keyword arguments of a mode's settings (0.1 knobs and experimental classes)."""
    kw = legacy_kwargs({k: v for k, v in kwargs.items() if k not in ("experimental", ANNOUNCE)})
    extra = _experimental(kwargs)
    return {**kw, "mechanisms": [*kw.get("mechanisms", []), *extra]} if extra else kw


def _resolved(kwargs: dict) -> dict:
    """What the recipe of ``deepopt.activate(**kwargs)`` meant when this ran (recipes change)."""
    from deepopt.recipes import resolve

    kw = _activation(kwargs)  # knobs that left the settings: a mechanism, maybe another recipe
    overrides = {k: v for k, v in kw.items() if k not in ("recipe", "mechanisms")}
    return resolve(kw.get("recipe", "default"), overrides).as_dict()


# -- runner ----------------------------------------------------------------------------


def finished(path: Path) -> set[tuple[str, int, str]]:
    """``(setup, seed, mode)`` with both split rows in ``path`` (a cut-off last line is ignored)."""
    splits: dict[tuple[str, int, str], set[str]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            splits.setdefault((r["setup"], r["seed"], r["mode"]), set()).add(r["split"])
    return {k for k, v in splits.items() if v >= {"val", "test"}}


def _planned(args: argparse.Namespace) -> Iterator[tuple[Setup, int, str, dict]]:
    done = finished(Path(args.out))
    observers = {k: v for k, v in OBSERVERS.items() if k in args.observers}
    for setup in (SETUPS[s] for s in args.setups):
        for seed in args.seeds:
            for mode in args.modes:
                missing = {k: v for k, v in observers.items() if (setup.name, seed, k) not in done}
                if mode == "classical" and ((setup.name, seed, mode) not in done or missing):
                    yield setup, seed, mode, missing
                elif mode != "classical" and (setup.name, seed, mode) not in done:
                    yield setup, seed, mode, {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks zoo",
        description="Train the zoo's setups (classical and each mode, paired by seed) and append "
        "one JSON row per (setup, seed, mode, split) to --out; finished rows are skipped.",
    )
    p.add_argument("--setups", nargs="+",
                   default=[s for s in SETUPS if SETUPS[s].data != "cifar10" and not SETUPS[s].headroom],
                   choices=list(SETUPS), metavar="NAME",
                   help="setups to run (default: every offline one; the cifar-* setups need --data). "
                   f"Choices: {', '.join(SETUPS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], metavar="SEED",
                   help="seeds to run (default: 0 1 2 3 4)")
    p.add_argument("--modes", nargs="+", default=["classical"], metavar="MODE",
                   help="training modes: classical (with the evaluation-only candidates riding on "
                   "it), deepopt (the default recipe), peer-sam, or deepopt:JSON for overrides "
                   "(default: classical)")
    p.add_argument("--observers", nargs="*", default=list(OBSERVERS), metavar="NAME",
                   help=f"evaluation-only candidates on the classical runs (default: all). "
                   f"Choices: {', '.join(OBSERVERS)}")
    p.add_argument("--data", default=None, help="CIFAR-10 source for the cifar-* setups")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results file (default: {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--cost", action="store_true",
                   help="instead of training, time each training mode against classical in alternating "
                   f"blocks (CPU clock) and append a row per setup and mode to {DEFAULT_COST}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the zoo (see the module docstring); returns the exit status."""
    from tqdm import tqdm

    from .train import append_row

    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    for m in args.modes:
        _activate_kwargs(m)  # unknown modes fail before any training
    unknown = sorted(set(args.observers) - set(OBSERVERS))
    if unknown:
        print(f"python -m benchmarks zoo: unknown observer(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.cost:
        return _cost_main(args)
    if "peer-ema-pytorch" in args.observers and importlib.util.find_spec("ema_pytorch") is None:
        args.observers.remove("peer-ema-pytorch")
        print("python -m benchmarks zoo: peer-ema-pytorch left out: ema-pytorch is not installed "
              "(pip install -e \".[bench]\")", file=sys.stderr)
    plan = list(_planned(args))
    if not plan:
        print(f"python -m benchmarks zoo: every planned run is in {args.out}")
        return 0
    bar = tqdm(plan, desc="zoo", unit="run", disable=None)
    for done_runs, (setup, seed, mode, observers) in enumerate(bar, 1):
        bar.set_postfix_str(f"{setup.name} s{seed} {mode}")
        try:
            data = load_data(setup.data, args.data)
        except FileNotFoundError as e:
            print(f"python -m benchmarks zoo: skipping {setup.name}: {e}", file=sys.stderr)
            continue
        done = finished(Path(args.out))
        t0 = time.perf_counter()
        rows = run_setup(setup, seed, mode, data, observers)
        for row in rows:
            if (row["setup"], row["seed"], row["mode"]) not in done:
                append_row(args.out, row)
        if bar.disable:  # no terminal: a line per run instead of a bar
            final = next(r["final"] for r in rows if r["mode"] == mode and r["split"] == "test")
            print(f"zoo {done_runs}/{len(plan)}: {setup.name} seed {seed} {mode}: test {final:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


def _cost_main(args: argparse.Namespace) -> int:
    from .train import append_row

    out = Path(args.out if args.out != DEFAULT_OUT else DEFAULT_COST)
    done = set()
    if out.is_file():
        done = {(r["setup"], r["mode"]) for r in map(json.loads, out.read_text().splitlines())}
    for setup in (SETUPS[s] for s in args.setups):
        prices: dict[str, dict] = {}  # a setup's one- and two-pass step prices, timed once
        for mode in (m for m in args.modes if not m.startswith("classical")):  # classical-x{b}: b
            if (setup.name, mode) in done:
                continue
            try:
                data = load_data(setup.data, args.data)
            except FileNotFoundError as e:
                print(f"python -m benchmarks zoo: skipping {setup.name}: {e}", file=sys.stderr)
                break
            budget = float((_activate_kwargs(mode)[0] or {}).get("budget", 1.0))
            if budget > 1.0:
                row = budget_cost(setup, mode, budget, data, prices)
            else:
                row = measure_cost(setup, mode, data)
            append_row(out, row)
            print(f"cost {setup.name} {mode}: {row['ratio']:.2f}x "
                  f"({row['ms_per_step_classical']:.2f} -> {row['ms_per_step']:.2f} ms/step)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
