"""On a GPU (skipped where none is present): every tensor deepopt makes lives on its
parameter's device, and each registered mechanism trains, evaluates and resumes there."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import deepopt
from deepopt.mechanisms import REGISTRY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


@pytest.mark.parametrize("cls", REGISTRY, ids=[c.name for c in REGISTRY])
def test_mechanism_state_lives_on_the_parameters_device(cls):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = deepopt.activate(model, opt, recipe="safe", mechanisms=[cls.example()])
    x, y = torch.randn(32, 8, device=device), torch.randint(0, 3, (32,), device=device)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        if cls.needs_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
    model.eval()
    with torch.no_grad():
        assert model(x).device == device
    state = opt.state_dict()["deepopt"]
    for t in tensors_in(state):
        assert t.device == device
    buf = io.BytesIO()
    torch.save(state, buf)
    assert buf.tell() > 0
