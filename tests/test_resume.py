"""Resumption: a process killed after writing a checkpoint is resumed by a fresh process bit for
bit (every recipe); state dicts survive deepcopy, pickle and torch.save/torch.load(weights_only);
an old checkpoint format is refused with a clear message and nothing loaded; step hooks survive.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import deepopt
from conftest import data
from deepopt.checkpoint import training_state_dict
from deepopt.experimental import legacy_kwargs

TESTS = Path(__file__).resolve().parent
TOTAL, AT = 12, 5  # steps of the run; the checkpoint is written after step AT

# name: (activate overrides, use step(closure), save the checkpoint in eval mode)
RECIPES = {
    "default": ({"recipe": "default"}, False, False),
    "safe": ({"recipe": "safe"}, False, True),
    "thorough": ({"recipe": "thorough"}, True, True),
    # its SAM starts once the LR has halved (step 4, before the checkpoint), mid-way through its ramp
    "thorough_tail": ({"recipe": "thorough", "sam_lr_ceiling": 0.5}, True, True),
    "rho": ({"rho": 0.1, "rho_follows_lr": True}, False, False),
    "average": ({"average": "ema", "rho": 0.05}, False, True),
    "lookahead": ({"lookahead_k": 3, "average": "phase"}, False, False),
    "noise": ({"noise": 0.1}, False, False),
    "restart": ({"average": "ema", "ema_decay": 0.9, "average_restart": True, "average_every": 2}, False, True),
    "looksam": ({"recipe": "thorough", "sam_every": 3}, True, True),
    "sam_no_warmup": ({"recipe": "thorough", "sam_warmup": 0, "sam_lr_ceiling": 1.0}, True, False),
    "dropout_match": ({"dropout_match": True, "average": "ema"}, False, True),
}


def net() -> nn.Module:
    # BatchNorm buffers and dropout (RNG) both have to be resumed
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


# The recipes as deepopt 0.1 defined them, for the checkpoints it wrote (recipes change).
RECIPES_0_1 = {
    "default": {"recipe": "safe", "dropout_match": True, "average": "power", "average_width": 0.05,
                "average_follows_lr": True, "average_every": 4},
    "thorough": {"recipe": "safe", "sam_rho": 0.05, "sam_warmup": 1000, "dropout_match": True},
}


def build(name: str, seed: int = 0, version: int = 2):
    overrides = RECIPES[name][0]
    if version == 1 and overrides.get("recipe") in RECIPES_0_1:
        overrides = {**RECIPES_0_1[overrides["recipe"]], **{k: v for k, v in overrides.items() if k != "recipe"}}
    torch.manual_seed(seed)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    model, opt = deepopt.activate(model, opt, **legacy_kwargs(overrides))
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.5)
    return model, opt, sched


def train_steps(name, model, opt, sched, start, stop):
    """The user's loop for steps ``start..stop-1``, an evaluation pass at the end of step AT."""
    closure, save_in_eval = RECIPES[name][1], RECIPES[name][2]
    x, y = data("img", n=96)
    loss_fn = nn.functional.cross_entropy
    for i in range(start, stop):
        model.train()
        xb, yb = x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]
        if closure:
            def step_closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss
            opt.step(step_closure)
        else:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if i + 1 == AT:
            model.eval()
            with torch.no_grad():
                model(x[:16])
            if not save_in_eval:
                model.train()


def final_state(model) -> dict:
    model.train()
    out = {f"train.{k}": v for k, v in training_state_dict(model).items()}
    model.eval()
    out.update({f"eval.{k}": v.clone() for k, v in model.state_dict().items()})
    return out


def save_atomically(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def worker(mode: str, folder: str) -> None:
    """Run in a subprocess: ``train`` writes the checkpoints then trains on until killed;
    ``resume`` loads them into fresh objects and writes the final weights."""
    folder_path = Path(folder)
    if mode == "train":
        runs = {}
        for name in RECIPES:
            model, opt, sched = build(name)
            train_steps(name, model, opt, sched, 0, AT)
            save_atomically({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                             "rng": torch.get_rng_state(), "step": AT}, folder_path / f"{name}.pt")
            runs[name] = (model, opt, sched)
        print("READY", flush=True)
        while True:  # mid-run when the parent kills us
            for name, (model, opt, sched) in runs.items():
                train_steps(name, model, opt, sched, AT, TOTAL)
    else:
        results = {}
        for name in RECIPES:
            model, opt, sched = build(name, seed=123)  # other initial weights: all must come from the file
            ckpt = torch.load(folder_path / f"{name}.pt", weights_only=True)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            sched.load_state_dict(ckpt["sched"])
            torch.set_rng_state(ckpt["rng"])
            train_steps(name, model, opt, sched, ckpt["step"], TOTAL)
            results[name] = final_state(model)
        torch.save(results, folder_path / "resumed.pt")


def spawn(mode: str, folder: Path) -> subprocess.Popen:
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_resume; test_resume.worker({mode!r}, {str(folder)!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_killed_after_checkpoint_resumes_bit_for_bit_in_a_fresh_process(tmp_path):
    proc = spawn("train", tmp_path)
    try:
        line = proc.stdout.readline()  # blocks until the checkpoints are written (or the child died)
        assert line.strip() == "READY", proc.stderr.read()
        time.sleep(0.2)  # let it get into the next steps
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.pt" for n in RECIPES)

    resume = spawn("resume", tmp_path)
    _, err = resume.communicate(timeout=120)
    assert resume.returncode == 0, err
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)

    for name in RECIPES:  # the uninterrupted run, here
        model, opt, sched = build(name)
        train_steps(name, model, opt, sched, 0, TOTAL)
        reference = final_state(model)
        assert resumed[name].keys() == reference.keys()
        for k, v in reference.items():
            assert torch.equal(resumed[name][k], v), (name, k)


# -- serialisers ----------------------------------------------------------------------------
def torch_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


SERIALISERS = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": torch_roundtrip,
}


@pytest.mark.parametrize("serialiser", SERIALISERS)
@pytest.mark.parametrize("name", ["average", "thorough", "lookahead"])
def test_state_dicts_survive_every_serialiser(serialiser, name):
    model, opt, sched = build(name)
    train_steps(name, model, opt, sched, 0, AT)
    ckpt = SERIALISERS[serialiser]({"model": model.state_dict(), "opt": opt.state_dict(),
                                    "sched": sched.state_dict(), "rng": torch.get_rng_state()})
    model2, opt2, sched2 = build(name, seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        torch.set_rng_state(ckpt["rng"])  # dropout
        train_steps(name, m, o, s, AT, TOTAL)
    a, b = final_state(model), final_state(model2)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rho_with_adagrad_keeps_last_gradients_across_a_checkpoint():
    """Without a momentum buffer the perturbation follows the last gradient, saved in the state."""
    def make(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
        return deepopt.activate(model, torch.optim.Adagrad(model.parameters(), lr=0.05), rho=0.2)

    x, y = data(n=96)

    def steps(model, opt, start, stop):
        for i in range(start, stop):
            loss = nn.functional.cross_entropy(model(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8])
            opt.zero_grad()
            loss.backward()
            opt.step()

    model, opt = make(0)
    steps(model, opt, 0, 4)
    ckpt = torch_roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    assert ckpt["opt"]["deepopt"]["mechanisms"]["perturb"]["grads"] is not None
    model2, opt2 = make(1)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    steps(model, opt, 4, 8)
    steps(model2, opt2, 4, 8)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


# -- old checkpoints ------------------------------------------------------------------------
@pytest.mark.parametrize("version", [0, None, "0.1"])
def test_old_format_version_is_refused_clearly_and_nothing_is_loaded(version):
    model, opt, sched = build("average")
    train_steps("average", model, opt, sched, 0, 3)
    old = torch_roundtrip(opt.state_dict())
    if version is None:
        del old["deepopt"]["version"]  # a pre-versioning layout
    else:
        old["deepopt"]["version"] = version
    for state in old["state"].values():
        state["momentum_buffer"].fill_(7.0)
    old["param_groups"][0]["lr"] = 9.0
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=rf"deepopt format version {version!r}; this deepopt reads versions 1 to 2\. "
                                         r"Load it with the deepopt release that saved it"):
        opt.load_state_dict(old)
    after = opt.state_dict()
    assert after["param_groups"][0]["lr"] == before["param_groups"][0]["lr"]
    for k, s in after["state"].items():
        assert torch.equal(s["momentum_buffer"], before["state"][k]["momentum_buffer"])
    # ... and the remedy the message gives works: drop the 'deepopt' key
    del old["deepopt"]
    opt.load_state_dict(old)
    assert opt.param_groups[0]["lr"] == 9.0


# -- hooks ----------------------------------------------------------------------------------
def test_step_hooks_survive_a_state_round_trip():
    model, opt, sched = build("average")
    base = opt.optimizer
    calls = []
    base.register_step_pre_hook(lambda *a: calls.append("pre-base"))
    opt.register_step_pre_hook(lambda *a: calls.append("pre-wrapper"))
    opt.register_step_post_hook(lambda *a: calls.append("post-wrapper"))
    opt.register_load_state_dict_post_hook(lambda *a: calls.append("loaded"))
    train_steps("average", model, opt, sched, 0, 1)
    assert calls == ["pre-base", "pre-wrapper", "post-wrapper"]
    calls.clear()
    opt.load_state_dict(torch_roundtrip(opt.state_dict()))
    model.load_state_dict(torch_roundtrip(model.state_dict()))
    assert calls == ["loaded"]
    calls.clear()
    train_steps("average", model, opt, sched, 1, 3)
    assert calls == ["pre-base", "pre-wrapper", "post-wrapper"] * 2


def test_model_pickled_whole_is_plain_with_the_evaluation_weights_in_either_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  average="ema", ema_decay=0.5, rho=0.05)
    x, y = data()
    for _ in range(3):
        nn.functional.cross_entropy(model(x[:, :6]), y % 3).backward()
        opt.step()
        opt.zero_grad()
    train_state = training_state_dict(model)
    model.eval()
    model(x[:, :6])
    eval_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(eval_state["0.weight"], train_state["0.weight"])

    def saved_and_loaded(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        assert b"deepopt" not in buf.getvalue()
        buf.seek(0)
        with torch.serialization.safe_globals([nn.Sequential, nn.Linear, nn.BatchNorm1d, nn.ReLU]):
            return torch.load(buf)  # weights_only=True: only torch's globals allowed

    for training in (True, False):
        model.train(training)
        model(x[:, :6])  # a training forward puts the training weights back (and moves BatchNorm's)
        loaded = saved_and_loaded(model)
        assert loaded.training == training and not loaded._forward_pre_hooks
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in eval_state.items()), training
    model.train()
    twin = copy.deepcopy(model)  # a plain model too, which deepopt can activate afresh
    assert not twin._forward_pre_hooks and not twin._forward_hooks and "__getstate__" not in vars(twin)
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in eval_state.items())
    weights = [k for k in train_state if k.endswith("weight")]
    assert all(torch.equal(training_state_dict(model)[k], train_state[k]) for k in weights)
    deepopt.deactivate(model, opt)
    assert "__getstate__" not in vars(model)
    assert all(torch.equal(model.state_dict()[k], train_state[k]) for k in weights)  # left training


# A file written by deepopt 0.1 (state format version 1, tests/data/make_v1_checkpoints.py):
# today's deepopt resumes it onto the trajectory the old code took without interruption.
V1_CHECKPOINTS = TESTS / "data" / "v1_checkpoints.pt"


@pytest.mark.parametrize("name", ["default", "thorough", "rho", "lookahead", "noise", "restart", "looksam",
                                  "dropout_match"])
def test_version_1_checkpoint_resumes_onto_the_old_uninterrupted_trajectory(name):
    saved = torch.load(V1_CHECKPOINTS, weights_only=True)[name]
    assert saved["opt"]["deepopt"]["version"] == 1 and saved["overrides"] == RECIPES[name][0]
    model, opt, sched = build(name, seed=123, version=1)  # other initial weights: all must come from the file
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    torch.set_rng_state(saved["rng"])
    train_steps(name, model, opt, sched, AT, TOTAL)
    final = final_state(model)
    assert final.keys() == saved["final"].keys()
    for key, value in saved["final"].items():
        assert torch.equal(final[key], value), key
    assert opt.state_dict()["deepopt"]["version"] == deepopt.optimizer.STATE_VERSION
