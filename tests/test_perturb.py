"""Sharpness-aware perturbation: maths, where the gradient is taken, restore by copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepopt
from conftest import bn_cnn, data, mlp, params_of, train
from deepopt.experimental import TwoPassSAM
from deepopt.mechanisms.perturb import MomentumPerturbation, direction, perturbation


def test_perturbation_matches_hand_computation():
    d = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    e = perturbation(d, rho=0.5)
    torch.testing.assert_close(e[0], torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(e[1], torch.tensor([[0.4]]))


def test_adaptive_perturbation_matches_asam_formula():
    d, w = [torch.tensor([1.0, 2.0])], [torch.tensor([0.99, -1.99])]
    t = w[0].abs() + 0.01  # [1, 2]
    expected = 0.3 * t * t * d[0] / torch.linalg.vector_norm(t * d[0])
    torch.testing.assert_close(perturbation(d, 0.3, weights=w)[0], expected)


def test_zero_direction_gives_zero_perturbation():
    assert torch.equal(perturbation([torch.zeros(3)], rho=1.0)[0], torch.zeros(3))


def test_direction_reads_sgd_and_adam_buffers():
    assert direction({"momentum_buffer": torch.ones(1)})[1] == -1.0
    assert direction({"exp_avg": torch.ones(1), "exp_avg_sq": torch.ones(1)})[0] is not None
    assert direction({"square_avg": torch.ones(1)}) == (None, 0.0)


@pytest.mark.parametrize("ascent, sign", [(False, -1.0), (True, 1.0)])
def test_gradient_is_taken_at_w_plus_or_minus_rho_unit_momentum(ascent, sign):
    """One linear layer: the 2nd step's gradient equals the gradient at w -/+ rho m/||m||."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    ref = nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    rho = 0.3
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  mechanisms=[MomentumPerturbation(rho, ascent=ascent)])
    x = torch.randn(8, 4)
    model(x).pow(2).mean().backward()
    opt.step(); opt.zero_grad()
    w = [p.detach().clone() for p in model.parameters()]
    m = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.cat([t.flatten() for t in m]))
    with torch.no_grad():
        for p_ref, wi, mi in zip(ref.parameters(), w, m):
            p_ref.copy_(wi + sign * rho * mi / norm)
    ref(x).pow(2).mean().backward()
    model(x).pow(2).mean().backward()
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)
    # ...and the update is applied to w, not to the perturbed point
    opt.step()
    buf = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    for p, wi, b in zip(model.parameters(), w, buf):
        torch.testing.assert_close(p.detach(), wi - 0.1 * b)


def test_restore_is_by_copy_bitwise():
    torch.manual_seed(0)
    model = mlp()
    model, opt = deepopt.activate(model, torch.optim.Adam(model.parameters(), lr=1e-3), rho=0.7)
    x, y = data()
    train(model, opt, x, y, steps=3)
    before = params_of(model)
    model(x)  # perturbs
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    after = params_of(model)  # state_dict observes: perturbation removed
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_eval_sees_unperturbed_weights_and_train_resumes():
    torch.manual_seed(0)
    model = mlp()
    # average=None: eval then shows the unperturbed training weights themselves
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.5,
                                  average=None)
    x, y = data()
    train(model, opt, x, y, steps=3)
    w = [p.detach().clone() for p in model.parameters()]
    model(x)  # training forward: perturbed
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), w))
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    torch.testing.assert_close(out, torch.func.functional_call(model, dict(zip(
        [n for n, _ in model.named_parameters()], w)), (x,)))
    model.train()
    train(model, opt, x, y, steps=2)


def test_forward_that_raises_leaves_model_unperturbed():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.explode = False

        def forward(self, x):
            out = self.lin(x)
            if self.explode:
                raise RuntimeError("user error")
            return out

    model = Boom()
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.5)
    x = torch.randn(4, 3)
    model(x).sum().backward(); opt.step(); opt.zero_grad()
    w = [p.detach().clone() for p in model.parameters()]
    model.explode = True
    try:
        model(x)
    except RuntimeError:
        pass
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


def test_two_pass_sam_matches_reference_and_keeps_bn_stats():
    torch.manual_seed(0)
    model = bn_cnn()
    ref = bn_cnn()
    ref.load_state_dict(model.state_dict())
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), guard=False,
                                  mechanisms=[TwoPassSAM(0.05)])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = data("img", n=16)
    loss_fn = nn.functional.cross_entropy

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    # reference SAM by hand: grad at w, e = rho g/||g||, grad at w+e (BN stats of pass 1 only)
    loss_fn(ref(x), y).backward()
    bn_stats = [b.clone() for b in ref.buffers()]
    g = [p.grad.clone() for p in ref.parameters()]
    norm = torch.linalg.vector_norm(torch.cat([t.flatten() for t in g]))
    w = [p.detach().clone() for p in ref.parameters()]
    with torch.no_grad():
        for p, gi in zip(ref.parameters(), g):
            p.add_(0.05 * gi / norm)
    ref_opt.zero_grad()
    loss_fn(ref(x), y).backward()
    with torch.no_grad():
        for p, wi in zip(ref.parameters(), w):
            p.copy_(wi)
        for b, s in zip(ref.buffers(), bn_stats):
            b.copy_(s)
    ref_opt.step()
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert torch.equal(model[1].running_mean, ref[1].running_mean)


def test_sam_warmup_ramps_the_radius_step_by_step():
    # warmup=4 at rho 0.2: step 0 uses radius 0.05 and step 1 radius 0.1. A run that
    # switches a plain (no warm-up) SAM's radius by hand between the steps must match.
    x, y = data("img", n=16)
    loss_fn = nn.functional.cross_entropy

    def run(radii, rho, warmup):
        torch.manual_seed(0)
        model = bn_cnn()
        model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                      mechanisms=[TwoPassSAM(rho, warmup)])
        for i, rho in enumerate(radii):
            if rho is not None:  # stands in for the ramp: a fresh setting per step
                opt.mechanism("sam").rho = rho

            def closure(i=i):
                opt.zero_grad()
                loss = loss_fn(model(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8])
                loss.backward()
                return loss
            opt.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    warmed = run([None, None], 0.2, 4)
    by_hand = run([0.05, 0.1], 0.2, 0)
    full = run([None, None], 0.2, 0)
    assert all(torch.equal(a, b) for a, b in zip(warmed, by_hand))
    assert not all(torch.equal(a, b) for a, b in zip(warmed, full))


def test_lr_ceiling_perturbs_only_in_the_low_lr_tail():
    """With lr_ceiling=0.1 the gradient is taken at w until the LR falls to a tenth of its peak, then at w - e."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    model, opt = deepopt.activate(model, opt, recipe="safe", calibrate=False,
                                  mechanisms=[MomentumPerturbation(0.3, lr_ceiling=0.1)])
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    at_w = nn.Linear(4, 1)
    perturbed = []
    for lr in [1.0, 0.5, 0.2, 0.1, 0.05]:
        opt.param_groups[0]["lr"] = lr
        at_w.load_state_dict(model.state_dict())  # the training weights, before the forward
        at_w.zero_grad()
        at_w(x).pow(2).mean().backward()
        model(x).pow(2).mean().backward()
        perturbed.append(not torch.equal(model.weight.grad, at_w.weight.grad))
        opt.step(); opt.zero_grad()
    # the first step has no momentum yet; 0.5 and 0.2 lie above the ceiling
    assert perturbed == [False, False, False, True, True]
    with pytest.raises(ValueError, match="lr_ceiling=0 is invalid"):
        MomentumPerturbation(0.1, lr_ceiling=0)
