"""Training scripts written the way users write them, run unchanged three ways.

Each script in ``tests/clients/`` runs under ``deepopt run --off`` (plain PyTorch),
``deepopt run`` and with an explicit ``deepopt.activate`` (``DEEPOPT_CLIENT=activate``).
The default recipe leaves training unchanged on these healthy nets, so the training
weights must be bitwise equal all three ways, and what deepopt cannot do is said once,
in one ``deepopt:`` line. docs/integrations/works-with.md records the same.
"""

from __future__ import annotations

import gc
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepopt import cli, replay

CLIENTS = Path(__file__).parent / "clients"
GUARD_OFF = "the divergence guard is off for LBFGS: its step(closure) evaluates the closure itself"
NO_GUARD_ON_CLOSURE = "the divergence guard does not act on SGD.step(closure) under deepopt run"
NO_SAM = "budget=2.25 (two-pass SAM, rho 0.05) does not act on SGD.step(closure) under deepopt run"
IDLE = "after 15 steps this run trains and evaluates as it would without deepopt"
# budget 2.25: two passes on every step, so a few steps show whether SAM ran.
SAM_FLAGS = ("--recipe", "thorough", "--set", "budget=2.25")
SAM_RUNS = "budget=2.25 (two-pass SAM, rho 0.05) runs on this loop without a closure"
SAM_CANNOT = "budget=2.25 (two-pass SAM, rho 0.05) cannot run on this loop"

# script: (the deepopt lines of `deepopt run`, those of explicit activate), each a prefix
EXPECTED = {
    "word_lm.py": (["activated AdamW on RNNModel (6 tensors, 3026 parameters)"], []),
    "gpt.py": (["activated AdamW on GPT", "after 30 steps this run"], ["after 30 steps this run"]),
    "criterion.py": (["activated SGD on Sequential", IDLE], [IDLE]),
    "lbfgs.py": ([GUARD_OFF, "activated LBFGS on Sequence"], [GUARD_OFF]),
    "closure.py": (["activated SGD on Sequential", NO_GUARD_ON_CLOSURE], []),
    "hand_sgd.py": (["nothing activated: the script built no torch.optim optimizer before the first "
                     "backward"], []),
    "gan.py": (["activated Adam on Sequential (6 tensors", "activated Adam on Sequential (4 tensors"], []),
    "rl.py": (["activated Adam on Sequential"], []),
    "accumulate.py": (["activated SGD on Sequential"], []),
    "two_optimizers.py": (["activated SGD on Net (4 tensors", "activated Adam on Net (2 tensors"], []),
    "low_precision.py": (["activated SGD on Sequential", "activated SGD on Sequential"], []),
    "gpt_train.py": (["activated AdamW on GPT (28 tensors, 27168 parameters)"], []),
}


def deepopt_lines(stderr: str) -> list[str]:
    return [line.removeprefix("deepopt: ") for line in stderr.splitlines() if line.startswith("deepopt: ")]


_runs: dict[tuple, tuple[Path, list[str]]] = {}


def client(script: str, mode: str, capfd, tmp_path_factory, *flags: str) -> tuple[Path, list[str]]:
    """Run ``script`` once per test session in ``mode``: its output folder and ``deepopt:`` lines.

    Each run costs an interpreter start and torch's imports (about 3 s of CPU): the tests
    below share them.
    """
    key = (script, mode, flags)
    if key not in _runs:
        out = tmp_path_factory.mktemp(f"{Path(script).stem}-{mode}")
        _runs[key] = out, run_client(script, mode, out, capfd, *flags)
    return _runs[key]


def run_client(script: str, mode: str, out: Path, capfd, *flags: str) -> list[str]:
    """Run ``script`` writing into ``out``; return its ``deepopt:`` lines (it must succeed)."""
    env = {"OMP_NUM_THREADS": "1", "DEEPOPT_CLIENT": mode}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        capfd.readouterr()
        if mode == "activate":  # in this process: an interpreter start and torch's import less
            status = run_in_process(script, out)
        else:  # deepopt run itself, in this process: one interpreter start less per run
            off = ["--off"] if mode == "off" else []
            status = cli.main(["run", *off, *flags, "--", "python", str(CLIENTS / script), str(out)])
        stderr = capfd.readouterr().err
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert status == 0, stderr[-3000:]
    return deepopt_lines(stderr)


def run_in_process(script: str, out: Path) -> int:
    """``python SCRIPT OUT`` with explicit activation, run here as ``deepopt run`` runs it."""
    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(CLIENTS / script), str(out)], [str(CLIENTS)]
    try:
        runpy.run_path(str(CLIENTS / script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
        gc.collect()
        for recorder in list(replay._recorders):  # a script's SAM recorders die with it
            recorder.close()
    return 0


def assert_said(lines: list[str], expected: list[str]) -> None:
    assert len(lines) == len(expected), lines
    for line, prefix in zip(lines, expected):
        assert line.startswith(prefix), (line, prefix)


def training_weights(out: Path) -> dict:
    return torch.load(out / "weights.pt")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_client_trains_as_plain_pytorch_three_ways(script, capfd, tmp_path_factory):
    off, off_lines = client(script, "off", capfd, tmp_path_factory)
    assert off_lines == ["off (A/B twin run)"]
    run, run_lines = client(script, "run", capfd, tmp_path_factory)
    assert_said(run_lines, EXPECTED[script][0])
    plain = training_weights(off)
    assert_bitwise_equal(training_weights(run), plain)
    if script != "hand_sgd.py":  # no optimizer: nothing to activate explicitly
        explicit, explicit_lines = client(script, "activate", capfd, tmp_path_factory)
        assert_said(explicit_lines, EXPECTED[script][1])
        assert_bitwise_equal(training_weights(explicit), plain)


LOAD_WITHOUT_DEEPOPT = """
import sys
sys.modules["deepopt"] = None  # deepopt cannot be imported here: `import deepopt` raises
import torch
from torch import nn
from lm_model import RNNModel
for path, state_path in zip(sys.argv[1::2], sys.argv[2::2]):
    state = torch.load(state_path)
    with torch.serialization.safe_globals([RNNModel, nn.Dropout, nn.Embedding, nn.LSTM, nn.Linear]):
        safe = torch.load(path)  # weights_only=True, as the word language model reloads it
    full = torch.load(path, weights_only=False)
    for model in (safe, full):
        assert model.decoder.weight is model.encoder.weight
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert not model._forward_pre_hooks and not model._state_dict_pre_hooks
    print("loaded")
"""


def test_model_saved_whole_loads_where_deepopt_is_not_installed(capfd, tmp_path_factory):
    outs = [client("word_lm.py", mode, capfd, tmp_path_factory)[0] for mode in ("run", "activate")]
    for out in outs:
        assert b"deepopt" not in (out / "model.pt").read_bytes()
    # Each is compared with the state_dict() saved beside it, in the same (eval) mode.
    paths = [str(out / name) for out in outs for name in ("model.pt", "model_state.pt")]
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DEEPOPT, *paths], cwd=CLIENTS,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.split() == ["loaded", "loaded"], proc.stderr[-3000:]


def sam_note(script: str) -> str:
    """What the script's docstring says of SAM (its ``SAM:`` line)."""
    text = (CLIENTS / script).read_text()
    return next(line for line in text.splitlines() if line.startswith("SAM: "))


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_each_client_says_whether_sam_runs_and_deepopt_run_agrees(script, capfd, tmp_path_factory):
    """With ``recipe="thorough"`` the one SAM line matches the script's own ``SAM:`` note; where
    SAM runs, ``deepopt run --recipe thorough`` says the same and trains exactly as the explicit
    activation, and SAM changed training."""
    note = sam_note(script)
    os.environ.update(DEEPOPT_RECIPE="thorough", DEEPOPT_BUDGET="2.25")
    try:
        explicit, explicit_lines = client(script, "activate", capfd, tmp_path_factory, "thorough")
    finally:
        del os.environ["DEEPOPT_RECIPE"], os.environ["DEEPOPT_BUDGET"]
    said = [line for line in explicit_lines if "SAM" in line]
    if note.startswith("SAM: runs"):
        assert len(said) == 1 and said[0].startswith(SAM_RUNS), explicit_lines
        if "stops before" in note:
            return
        run, lines = client(script, "run", capfd, tmp_path_factory, *SAM_FLAGS)
        assert [line for line in lines if "SAM" in line] == said
        assert_bitwise_equal(training_weights(explicit), training_weights(run))
        off, _ = client(script, "off", capfd, tmp_path_factory)
        assert any(  # SAM changed training
            not torch.equal(a, b) for a, b in zip(training_weights(run)["model"].values(),
                                                  training_weights(off)["model"].values()))
    elif note.startswith("SAM: cannot run"):
        assert said and all(line.startswith(SAM_CANNOT) for line in said), explicit_lines  # one per optimizer
    elif note.startswith("SAM: under deepopt run, not on step(closure)"):
        assert said == []  # the explicit activation runs SAM through the closure
        _, lines = client(script, "run", capfd, tmp_path_factory, *SAM_FLAGS)
        assert [line for line in lines if "SAM" in line] == [
            NO_SAM + " (the closure runs inside torch's step, after deepopt's hook); add "
            "`model, optimizer = deepopt.activate(model, optimizer)` to the script for it."]
    else:  # no optimizer, or LBFGS: nothing about SAM beyond what the activation says
        assert all("two-pass SAM" not in line for line in said if "off for" not in line), explicit_lines

def test_best_checkpoint_model_is_the_model_whose_val_loss_was_logged(capfd, tmp_path_factory):
    """nanoGPT's idiom: evaluate, back to train(), save {"model", "optimizer"} on improvement; a
    separate script without deepopt loads "model" and must get the val loss that decided the save."""
    outs = {mode: client("gpt_train.py", mode, capfd, tmp_path_factory)[0] for mode in ("off", "run", "activate")}
    checkpoints = {mode: torch.load(out / "ckpt.pt", weights_only=True) for mode, out in outs.items()}
    proc = subprocess.run([sys.executable, str(CLIENTS / "gpt_sample.py"), *(str(o / "ckpt.pt") for o in outs.values())],
                          cwd=CLIENTS, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode, loss in zip(outs, proc.stdout.split()):
        assert float(loss) == checkpoints[mode]["best_val_loss"], mode  # bit for bit the logged metric
    for mode in ("run", "activate"):
        ckpt = checkpoints[mode]
        assert ckpt["iter_num"] == checkpoints["off"]["iter_num"]
        # the saved model is the averaged one, not the training weights (which the optimizer holds):
        # had "model" held the training weights, the loss above would not have been the logged one
        train_values = ckpt["optimizer"]["deepopt"]["train_values"]
        assert any(not any(torch.equal(v, t) for t in train_values) for v in ckpt["model"].values())
        assert any(not torch.equal(v, checkpoints["off"]["model"][k]) for k, v in ckpt["model"].items())
