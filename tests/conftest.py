"""Shared tiny models, data and a training loop written the way a user writes one."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from deepopt.checkpoint import training_state_dict

torch.set_num_threads(1)

# tests/clients holds training scripts, run by tests/test_clients.py in their own processes:
# importing them (--doctest-modules imports every module) would train at import. A conftest
# of their own would shadow this one (both import as "conftest").
collect_ignore = ["clients", "data"]


def mlp(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3))


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(10, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TransformerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(10, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.proj(x)).mean(1))


def data(kind: str = "vec", n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = {"vec": (n, 10), "img": (n, 1, 6, 6), "seq": (n, 5, 10)}[kind]
    x = torch.randn(*shape, generator=g)
    y = (x.flatten(1).sum(1) > 0).long() + (x.flatten(1)[:, 0] > 1).long()
    return x, y


def train(model, optimizer, x, y, steps: int, loss_fn=nn.functional.cross_entropy, batch: int = 16,
          scheduler=None, closure: bool = False, start: int = 0):
    """The user's loop, untouched by deepopt. Returns per-step losses."""
    losses = []
    for i in range(steps):
        idx = torch.arange((start + i) * batch, (start + i + 1) * batch) % len(x)
        xb, yb = x[idx], y[idx]
        if closure:
            def step_closure(xb=xb, yb=yb):
                optimizer.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss
            loss = optimizer.step(step_closure)
        else:
            model.train()
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def params_of(model: nn.Module) -> list[torch.Tensor]:
    """The training weights in train mode, the evaluation weights in eval mode (copies)."""
    state = training_state_dict(model) if model.training else model.state_dict()
    return [t.detach().clone() for t in state.values()]


@pytest.fixture
def twin():
    """Two identical copies of a freshly seeded model factory."""
    def make(factory=mlp, seed: int = 0):
        torch.manual_seed(seed)
        m = factory()
        return m, copy.deepcopy(m)
    return make


def roundtrip(obj):
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_equal(a: dict, b: dict) -> None:
    """Two dicts of tensors hold the same keys and bitwise equal values."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
