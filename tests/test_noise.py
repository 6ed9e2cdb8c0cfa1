"""Random weight perturbation: noise scale, where the gradient is taken, global RNG untouched."""

from __future__ import annotations

import torch
from torch import nn

import deepopt
from deepopt.mechanisms.noise import WeightNoise, filter_noise


def test_noise_std_per_output_unit_follows_that_units_rms():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 20, 20, generator=g) * torch.tensor([0.1, 1.0, 10.0, 0.0]).view(4, 1, 1, 1)
    e = filter_noise([w], sigma=0.2, generator=g)[0]
    rms = w.flatten(1).pow(2).mean(1).sqrt()
    std = e.flatten(1).std(1)
    torch.testing.assert_close(std[:3] / rms[:3], torch.full((3,), 0.2), atol=0.02, rtol=0)
    assert torch.equal(e[3], torch.zeros_like(e[3]))  # a dead unit is not perturbed


def test_noise_is_invariant_to_rescaling_a_layer():
    w = torch.randn(5, 7)
    a = filter_noise([w], 0.1, torch.Generator().manual_seed(3))[0]
    b = filter_noise([w * 8.0], 0.1, torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(b, 8.0 * a)


def test_gradient_is_taken_at_w_plus_noise_and_update_applied_to_w():
    torch.manual_seed(0)
    model, ref = nn.Linear(4, 2), nn.Linear(4, 2)
    ref.load_state_dict(model.state_dict())
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), mechanisms=[WeightNoise(0.3)])
    expected_noise = WeightNoise(0.3, torch.initial_seed()).sample([p.detach() for p in ref.parameters()])
    x = torch.randn(8, 4)
    model(x).pow(2).mean().backward()
    w = [p.detach().clone() for p in ref.parameters()]
    with torch.no_grad():
        for p, e in zip(ref.parameters(), expected_noise):
            p.add_(e)
    ref(x).pow(2).mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    opt.step()
    for p, wi, q in zip(model.parameters(), w, ref.parameters()):
        torch.testing.assert_close(p.detach(), wi - 0.1 * q.grad)


def test_noise_never_moves_the_global_rng_and_eval_is_clean():
    def run(noise: float):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # average=None: "clean" eval is then the unperturbed training weights themselves
        model, opt = deepopt.activate(model, opt, average=None, mechanisms=[WeightNoise(noise)] if noise else [])
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
            opt.step(); opt.zero_grad()
        model.eval()
        w = [p.detach().clone() for p in model.parameters()]
        out = model(torch.ones(1, 3))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
        clean = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).eval()
        clean.load_state_dict(model.state_dict())
        torch.testing.assert_close(out, clean(torch.ones(1, 3)))
        return torch.rand(1)

    assert torch.equal(run(0.0), run(0.5))


def test_noise_state_round_trips_and_resumes_the_same_draws():
    noise = WeightNoise(0.1, seed=5)
    noise.sample([torch.ones(3, 3)])
    state = noise.state_dict()
    a = noise.sample([torch.ones(3, 3)])[0]
    other = WeightNoise(0.1, seed=99)
    other.load_state_dict(state)
    assert torch.equal(other.sample([torch.ones(3, 3)])[0], a)


def test_table_noise_has_the_unit_scales_and_changes_every_step():
    torch.manual_seed(0)
    w = torch.randn(3, 5000) * torch.tensor([[0.5], [2.0], [0.0]])
    noise = WeightNoise(0.2, seed=0)
    a, b = noise.sample([w])[0], noise.sample([w])[0]
    rms = w.pow(2).mean(1).sqrt()
    torch.testing.assert_close(a.std(1)[:2] / rms[:2], torch.full((2,), 0.2), atol=0.01, rtol=0)
    assert torch.equal(a[2], torch.zeros(5000))
    assert not torch.equal(a, b)
    assert abs(float(torch.corrcoef(torch.stack([a[:2].flatten(), b[:2].flatten()]))[0, 1])) < 0.05
