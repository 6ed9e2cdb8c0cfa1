"""Mixed precision, GradScaler, clipping, accumulation and torch.compile with deepopt."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import deepopt
from deepopt.checkpoint import training_state_dict

# average_every=1: the average folds in every step (the default recipe's 4 would leave these
# few-step runs' averages nearly empty), so the evaluation weights compared and the folds
# counted cover every step.
SETTINGS = {"rho": 0.1, "average": "ema", "ema_decay": 0.9, "average_every": 1}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def batch(i: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(n, 10, generator=g)
    return x, (x.sum(1) > 0).long() + (x[:, 0] > 1).long()


def activated(momentum: float = 0.9, **settings):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    return deepopt.activate(model, opt, **(settings or SETTINGS))


def weights(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Training weights and evaluation weights, leaving the model in train mode."""
    model.train()
    train = list(training_state_dict(model).values())
    model.eval()
    evals = [t.clone() for t in model.state_dict().values()]
    model.train()
    return {"train": train, "eval": evals}


def assert_same(a: dict, b: dict, exact: bool = False) -> None:
    for key in a:
        for x, y in zip(a[key], b[key]):
            if exact:
                assert torch.equal(x, y), key
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def bf16_loss(model: nn.Module, i: int) -> torch.Tensor:
    x, y = batch(i)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return nn.functional.cross_entropy(model(x), y)


# -- AMP ------------------------------------------------------------------------------------
def test_bf16_autocast_with_grad_scaler_equals_the_unscaled_run():
    scaled_model, scaled_opt = activated()
    scaler = torch.amp.GradScaler("cpu")
    plain_model, plain_opt = activated()
    for i in range(6):
        scaler.scale(bf16_loss(scaled_model, i)).backward()
        scaler.step(scaled_opt)
        scaler.update()
        scaled_opt.zero_grad()
        bf16_loss(plain_model, i).backward()
        plain_opt.step()
        plain_opt.zero_grad()
    assert scaled_opt.steps == plain_opt.steps == 6
    assert_same(weights(scaled_model), weights(plain_model))  # power-of-two scales unscale exactly


def snapshot_state(model: nn.Module, opt) -> dict:
    return {
        "shown": [p.detach().clone() for p in model.parameters()],  # w + e during the step
        "train": opt.views.train_values(opt.eval_targets()),
        "average": [t.clone() for t in opt.mechanism("average").tensors],
        "momentum": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "counters": (opt.steps, opt.mechanism("average").count, opt.mechanism("guard").skipped, opt.mechanism("guard").consecutive),
    }


def test_step_skipped_by_the_scaler_changes_nothing_and_equals_never_seeing_the_batch():
    def run(with_bad_batch: bool):
        model, opt = activated()
        scaler = torch.amp.GradScaler("cpu")
        for i in range(6):
            if i == 3 and with_bad_batch:
                loss = bf16_loss(model, 99) * float("inf")
                before = snapshot_state(model, opt)
                scale = scaler.get_scale()
                scaler.scale(loss).backward()
                scaler.step(opt)  # inf gradients: the scaler skips the step
                scaler.update()
                opt.zero_grad()
                after = snapshot_state(model, opt)
                assert scaler.get_scale() == scale / 2
                for key in before:
                    if key == "counters":
                        assert before[key] == after[key]
                    else:
                        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key])), key
            scaler.scale(bf16_loss(model, i)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return model, opt

    bad_model, bad_opt = run(True)
    good_model, good_opt = run(False)
    assert bad_opt.steps == good_opt.steps == 6
    assert_same(weights(bad_model), weights(good_model), exact=True)


def test_clip_grad_norm_between_backward_and_step_is_what_the_update_uses():
    """SGD without momentum: w_t - w_{t+1} = lr * clipped gradient, and the
    perturbation's last-gradient direction is the clipped one."""
    model, opt = activated(momentum=0.0, rho=0.1, average="ema")
    scaler = torch.amp.GradScaler("cpu")
    for i in range(4):
        scaler.scale(bf16_loss(model, i)).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        clipped = [p.grad.clone() for p in model.parameters()]
        before = opt.views.train_values(opt.eval_targets())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert norm > 0.05  # clipping was active
        after = opt.views.train_values(opt.eval_targets())
        for w0, w1, g in zip(before, after, clipped):
            torch.testing.assert_close(w0 - w1, 0.05 * g)
        for i, g in enumerate(clipped):
            assert torch.equal(opt.mechanism("perturb").grads[i], g)


def test_gradient_accumulation_applies_mechanisms_once_per_step():
    full_model, full_opt = activated()
    acc_model, acc_opt = activated()
    perturbations = []
    show = acc_opt.show

    def counted(view):
        was = acc_opt.views.current
        show(view)
        if view == "perturbed" != was:
            perturbations.append(acc_opt.views.current == "perturbed")

    acc_opt.show = counted
    for i in range(5):
        x, y = batch(i)
        nn.functional.cross_entropy(full_model(x), y).backward()
        full_opt.step()
        full_opt.zero_grad()
        for part in (slice(0, 8), slice(8, 16)):
            (nn.functional.cross_entropy(acc_model(x[part]), y[part]) / 2).backward()
        acc_opt.step()
        acc_opt.zero_grad()
    assert acc_opt.steps == acc_opt.mechanism("average").count == 5
    assert sum(perturbations) == 4  # once per step from the second step (momentum) on
    assert_same(weights(acc_model), weights(full_model))


# -- torch.compile --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compile_available() -> None:
    """Skip when torch.compile cannot run here (platform, Python version)."""
    try:
        torch._dynamo.reset()
        f = torch.compile(lambda t: t * 2, backend="eager")
        assert f(torch.ones(2)).sum() == 4
    except Exception as e:  # noqa: BLE001 - any failure means: no compile here
        pytest.skip(f"torch.compile unavailable: {e!r}")


def fresh_dynamo() -> dict:
    """Reset torch.compile's caches and counters; return the counters."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


def train_with_eval(model, opt, steps: int, start: int = 0, counters=None) -> list[tuple[int, int]]:
    """Train steps with an eval forward after each; after each step, (frames compiled,
    graphs compiled) so far."""
    seen = []
    for i in range(start, start + steps):
        model.train()
        x, y = batch(i)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            model(x)
        if counters is not None:
            seen.append((counters["frames"]["total"], counters["stats"]["unique_graphs"]))
    return seen


def eager_reference(steps: int) -> dict:
    model, opt = activated()
    train_with_eval(model, opt, steps)
    return weights(model)


@pytest.mark.compile
@pytest.mark.parametrize("where", ["compiled", "original"])
def test_compiled_model_trains_like_eager_without_recompiling(where, compile_available):
    """activate on the compiled module or on the original one: same weights as eager,
    and exactly the compiles torch.compile does without deepopt (train + eval graphs)."""
    # how often torch.compile compiles this loop without deepopt
    plain = mlp()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    baseline = train_with_eval(torch.compile(plain, backend="aot_eager"), plain_opt, 6, counters=fresh_dynamo())

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    counters = fresh_dynamo()
    compiled = torch.compile(model, backend="aot_eager")
    if where == "compiled":
        compiled, opt = deepopt.activate(compiled, opt, **SETTINGS)
    else:
        model, opt = deepopt.activate(model, opt, **SETTINGS)
    seen = train_with_eval(compiled, opt, 6, counters=counters)
    assert all(s == seen[0] for s in seen), seen  # nothing compiled after the first step
    assert [g for _, g in seen] == [g for _, g in baseline]  # the same graphs as without deepopt
    if where == "compiled":
        assert seen == baseline
    else:  # hooks inside the traced module: dynamo resumes after them, once per mode
        assert seen[0][0] <= 2 * baseline[0][0]
    assert_same(weights(compiled), eager_reference(6))


@pytest.mark.compile
def test_orig_mod_checkpoint_resumes_compiled_or_eager(compile_available):
    """A checkpoint of an activated compiled model (``_orig_mod.`` keys) resumes exactly,
    into a compiled model as saved, or into a plain one after stripping the prefix."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    reference = eager_reference(6)

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fresh_dynamo()
    compiled = torch.compile(model, backend="aot_eager")
    compiled, opt = deepopt.activate(compiled, opt, **SETTINGS)
    train_with_eval(compiled, opt, 3)  # ends in eval mode: the saved weights are the EMA
    buf = io.BytesIO()
    torch.save({"model": compiled.state_dict(), "opt": opt.state_dict()}, buf)

    def load() -> tuple[dict, dict]:  # each resume reads its own copy, as from a file
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        return ckpt["model"], ckpt["opt"]

    sd, opt_sd = load()
    assert all(k.startswith("_orig_mod.") for k in sd)

    # resume into a compiled model: the keys match as they are
    fresh = mlp()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh_c = torch.compile(fresh, backend="aot_eager")
    fresh_c, fresh_opt = deepopt.activate(fresh_c, fresh_opt, **SETTINGS)
    fresh_c.load_state_dict(sd)
    fresh_opt.load_state_dict(opt_sd)
    train_with_eval(fresh_c, fresh_opt, 3, start=3)
    assert_same(weights(fresh_c), reference)

    # resume into a plain model: strip the prefix; deepopt's own state has no keys
    plain_sd, opt_sd = load()
    consume_prefix_in_state_dict_if_present(plain_sd, "_orig_mod.")
    eager, eager_opt = activated()
    eager.load_state_dict(plain_sd)
    eager_opt.load_state_dict(opt_sd)
    train_with_eval(eager, eager_opt, 3, start=3)
    assert_same(weights(eager), reference)


RECOMPILE_SCRIPT = """
import sys, torch
from torch import nn
import deepopt
torch.set_num_threads(1)
for where in ("none", "compiled", "original"):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    compiled = torch.compile(model, backend="aot_eager")
    if where == "compiled":
        compiled, opt = deepopt.activate(compiled, opt, rho=0.1, average="ema")
    elif where == "original":
        model, opt = deepopt.activate(model, opt, rho=0.1, average="ema")
    print("RUN", where, file=sys.stderr, flush=True)
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    for step in range(5):
        print("STEP", step, file=sys.stderr, flush=True)
        compiled.train()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step(); opt.zero_grad()
        compiled.eval()
        with torch.no_grad():
            compiled(x)
"""


def names_deepopt(reason: str) -> bool:
    """Whether a recompile reason points at deepopt's code, wherever the checkout lives.

    File paths are dropped first (a venv inside a folder named ``deepopt`` is not deepopt),
    except those of deepopt's own source files.
    """
    source = os.path.dirname(os.path.abspath(deepopt.__file__))
    if source in reason:
        return True
    return "deepopt" in re.sub(r"\S*[/\\]\S*", "", reason)


def test_a_path_named_deepopt_is_not_deepopt():
    assert not names_deepopt("forward in /home/u/deepopt/.venv/lib/torch/nn/container.py:240 triggered")
    assert names_deepopt("guard failed: ___check_obj_id(L['self']._forward_pre_hooks[0].__self__, deepopt)")
    assert names_deepopt(f"_on_forward in {deepopt.__file__}:12")


@pytest.mark.compile
def test_torch_logs_recompiles_show_nothing_from_deepopt(compile_available):
    env = {**os.environ, "TORCH_LOGS": "recompiles", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RECOMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    runs: dict[str, list[tuple[int, str]]] = {}
    step = 0
    for line in proc.stderr.splitlines():
        if line.startswith("RUN "):
            current = runs.setdefault(line.split()[1], [])
        elif line.startswith("STEP "):
            step = int(line.split()[1])
        elif "Recompiling function" in line:
            current.append((step, line.split("Recompiling function")[1].strip()))
    assert set(runs) == {"none", "compiled", "original"}, proc.stderr[-2000:]
    for where, recompiles in runs.items():
        assert not any(names_deepopt(r) for _, r in recompiles), (where, recompiles)
        assert all(s == 0 for s, _ in recompiles), (where, recompiles)  # none per step
    assert runs["compiled"] == runs["none"]  # train/eval switch only
