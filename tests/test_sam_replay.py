"""Two-pass SAM in loops that pass no closure: deepopt replays the user's own loss.

The closure-free step must equal an explicit ``step(closure)`` SAM step bit for bit
wherever both compute the same loss, and a loss deepopt cannot prove is the user's gets
no SAM step at all, with one line saying why.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import deepopt
from deepopt.checkpoint import training_state_dict
from deepopt.experimental import TwoPassSAM


def sam_every_step() -> dict:
    """Two-pass SAM at full radius on every step (a fresh mechanism per activation)."""
    return {"mechanisms": [TwoPassSAM(0.05)]}
STEPS = 5


class WithLoss(nn.Module):
    """A network that computes its own loss, returned in the way ``style`` says."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))

    def forward(self, x, y):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        if self.style == "scalar":
            return loss
        if self.style == "tuple":  # GPT-style: logits, loss = model(x, y)
            return logits, loss
        if self.style == "dict":
            return {"logits": logits, "loss": loss}
        return Output(loss=loss, logits=logits)  # transformers-style: out.loss


@dataclasses.dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


def make(style: str | None) -> nn.Module:
    torch.manual_seed(0)
    if style is not None:
        return WithLoss(style)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def loss_of(model, style, x, y, criterion):
    if style is None:
        return criterion(model(x), y)
    out = model(x, y)
    return {"scalar": lambda: out, "tuple": lambda: out[1], "dict": lambda: out["loss"],
            "dataclass": lambda: out.loss}[style]()


def train(style, closure_free, accumulate=1, clip=None, settings=None, loss_fn=None):
    """The trained model's state and its SAM mechanism, after STEPS steps."""
    model = make(style)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model, opt = deepopt.activate(model, opt, **(settings or sam_every_step()))
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout

    def passes(xs, ys):
        for x, y in zip(xs, ys):
            loss = (loss_fn or loss_of)(model, style, x, y, criterion)
            loss = loss / accumulate if accumulate > 1 else loss
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        return loss

    for _ in range(STEPS):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        xs, ys = x.chunk(accumulate), y.chunk(accumulate)
        if closure_free:
            passes(xs, ys)
            opt.step()
            opt.zero_grad()
        else:
            def closure(xs=xs, ys=ys):
                opt.zero_grad()
                return passes(xs, ys)
            opt.step(closure)
    # The training weights and buffers (model.state_dict() holds the evaluation weights).
    return training_state_dict(model), opt.mechanism("sam")


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("style", [None, "scalar", "tuple", "dict", "dataclass"])
@pytest.mark.parametrize("accumulate, clip", [(1, None), (2, None), (1, 0.05), (2, 0.05)])
def test_closure_free_sam_equals_the_explicit_closure_bit_for_bit(style, accumulate, clip, capsys):
    explicit, sam_explicit = train(style, False, accumulate, clip)
    free, sam_free = train(style, True, accumulate, clip)
    assert sam_explicit.two_pass_steps == sam_free.two_pass_steps == STEPS
    assert_equal_states(free, explicit)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deepopt:")]
    assert len(lines) == 1 and "runs on this loop without a closure" in lines[0], lines


def test_sam_changes_the_trajectory():
    plain, _ = train(None, True, settings={"recipe": "default"})
    sam, _ = train(None, True)
    assert any(not torch.equal(plain[k], sam[k]) for k in plain if k.endswith("weight"))


def penalty(model, style, x, y, criterion):
    return criterion(model(x), y) + 1e-3 * sum(p.pow(2).sum() for p in model.parameters())


def functional(model, style, x, y, criterion):
    return nn.functional.cross_entropy(model(x), y)


def reshaped(model, style, x, y, criterion):
    return criterion(model(x).view(16 // 1, 3)[: len(y)], y)


def two_outputs(model, style, x, y, criterion):
    return criterion(model(x), y) + criterion(model(x + 1), y)


@pytest.mark.parametrize("loss_fn, reason", [
    (penalty, "is not the model's own loss"),
    (functional, "is not the model's own loss"),
    (reshaped, "is not the model's own loss"),
    (two_outputs, "is not the model's own loss"),
])
def test_a_loss_deepopt_cannot_prove_gets_no_sam_and_one_line(loss_fn, reason, capsys):
    free, sam = train(None, True, loss_fn=loss_fn)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deepopt:")]
    assert len(lines) == 1 and "cannot run on this loop" in lines[0] and reason in lines[0], lines
    assert "optimizer.step(closure)" in lines[0]
    assert sam.two_pass_steps == 0
    # ... and the run is the one-pass run (the default recipe's) exactly.
    default, _ = train(None, True, settings={"recipe": "default"}, loss_fn=loss_fn)
    assert_equal_states(free, default)


def test_gradients_changed_by_hand_get_no_sam(capsys):
    model = make(None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = deepopt.activate(model, opt, **sam_every_step())
    nn.CrossEntropyLoss()(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
    for p in model.parameters():
        p.grad.mul_(0.5)  # a transform deepopt cannot repeat
    opt.step()
    assert opt.mechanism("sam").two_pass_steps == 0
    assert "cannot repeat" in capsys.readouterr().err


def test_a_failing_replay_leaves_the_training_weights_and_the_buffers():
    model = make(None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = deepopt.activate(model, opt, **sam_every_step())
    calls = {"n": 0}

    def bomb(module, args):
        calls["n"] += torch.is_grad_enabled()  # calibration measures without grad
        if calls["n"] == 2 and torch.is_grad_enabled():  # the replay's forward
            raise RuntimeError("boom")

    model.register_forward_pre_hook(bomb)
    nn.CrossEntropyLoss()(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert_equal_states(model.state_dict(), before)
    assert opt.steps == 0


def test_deactivate_puts_torch_functions_back():
    import gc

    from deepopt import replay

    gc.collect()
    for recorder in list(replay._recorders):  # earlier tests' optimizers, still referenced
        recorder.close()
    original = torch.autograd.backward
    model = make(None)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), **sam_every_step())
    assert torch.autograd.backward is not original and torch.autograd.backward.__wrapped__ is original
    deepopt.deactivate(model, opt)
    del opt
    assert torch.autograd.backward is original and not replay._originals


class InfOnCall(nn.Module):
    """Identity, except that its ``bad``-th forward with grad enabled returns inf."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, x):
        self.calls += torch.is_grad_enabled()
        return x * float("inf") if self.calls == self.bad and torch.is_grad_enabled() else x


def amp_loop(model, opt, scaler, steps, dtype=torch.float16, inf_batch=None):
    """The mixed-precision loop of the torch.amp docs, with clipping; what each step did."""
    criterion, gen, done = nn.CrossEntropyLoss(), torch.Generator().manual_seed(1), []
    for step in range(steps):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        if step == inf_batch:
            x[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        with torch.autocast("cpu", dtype=dtype):
            loss = criterion(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        done.append(not all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
    return done


def test_fp16_grad_scaler_loop_runs_sam_and_a_skipped_step_leaves_no_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  **sam_every_step())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    updated = amp_loop(model, opt, scaler, 6, inf_batch=3)
    assert updated == [True, True, True, False, True, True]  # the scaler skipped step 3 whole
    assert opt.mechanism("sam").two_pass_steps == opt.steps == 5
    assert scaler.get_scale() == 2.0**15
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_inf_in_the_second_pass_skips_the_step_and_lowers_the_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), InfOnCall(bad=4), nn.Linear(16, 3))
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  **sam_every_step())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    updated = amp_loop(model, opt, scaler, 3)  # calls 1, 2: step 0; 3, 4: step 1 (replay inf)
    assert updated == [True, False, True]
    assert opt.steps == 2 and opt.views.current == "train"
    assert scaler.get_scale() == 2.0**15  # the scaler heard of the inf


def test_bf16_autocast_runs_sam():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), **sam_every_step())
    criterion = nn.CrossEntropyLoss()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = criterion(model(torch.randn(8, 5)), torch.randint(0, 3, (8,)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.mechanism("sam").two_pass_steps == 3
