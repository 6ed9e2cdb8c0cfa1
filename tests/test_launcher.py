"""``deepopt run``: the user's unmodified script, deepopt activated on its optimizer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
if "--explicit" in sys.argv:
    import deepopt
    model, opt = deepopt.activate(model, opt)
x, y = torch.randn(64, 8), torch.randn(64, 2)
for i in range(6):
    xb = x.clone()
    if "--nan" in sys.argv and i == 3:
        xb[0, 0] = float("nan")
    loss = torch.nn.functional.mse_loss(model(xb), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, sys.argv[1])
print("checksum", repr(sum(float(p.detach().double().sum()) for p in model.parameters())))
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def run(*argv: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def deepopt_run(*argv: str, cwd) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "deepopt.cli", "run", *argv, cwd=cwd)


def checksum(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("checksum", 1)[1].strip()


def test_off_is_classical_and_default_equals_explicit_activate(script, tmp_path):
    plain = run(sys.executable, str(script), "a.pt", cwd=tmp_path)
    off = deepopt_run("--off", "--", "python", str(script), "b.pt", cwd=tmp_path)
    assert checksum(off) == checksum(plain)
    assert "deepopt: off (A/B twin run)" in off.stderr
    assert "deepopt" not in torch.load(tmp_path / "b.pt")["opt"]
    zero = deepopt_run("--", "python", str(script), "c.pt", cwd=tmp_path)
    explicit = run(sys.executable, str(script), "d.pt", "--explicit", cwd=tmp_path)
    assert checksum(zero) == checksum(explicit)
    assert "deepopt: activated SGD on Sequential (4 tensors, 178 parameters), recipe=default" in zero.stderr
    ckpt = torch.load(tmp_path / "c.pt")["opt"]
    assert ckpt["deepopt"]["steps"] == 6
    # The default recipe's state holds tensors (the average, the training values): compared bitwise.
    assert same(ckpt["deepopt"], torch.load(tmp_path / "d.pt")["opt"]["deepopt"])
    assert ckpt["deepopt"]["mechanisms"]["average"]["tensors"] is not None
    assert same(torch.load(tmp_path / "c.pt")["model"], torch.load(tmp_path / "d.pt")["model"])
    # Training is classical: the training weights (in the optimizer's state; "model" holds the
    # evaluation weights, deepopt.checkpoint) are the plain run's, bit for bit.
    assert same(ckpt["deepopt"]["train_values"], list(torch.load(tmp_path / "a.pt")["model"].values()))


def same(a, b) -> bool:
    """Equality of nested dicts/lists/tuples holding tensors, tensors compared bitwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_override_changes_the_run_and_script_without_python(script, tmp_path):
    plain = run(sys.executable, str(script), "a.pt", cwd=tmp_path)
    rho = deepopt_run("--set", "rho=0.1", "--", str(script), "e.pt", cwd=tmp_path)
    assert "recipe=default rho=0.1" in rho.stderr
    assert checksum(rho) != checksum(plain)


def test_nan_step_is_skipped_like_explicit(script, tmp_path):
    zero = deepopt_run("--", "python", str(script), "f.pt", "--nan", cwd=tmp_path)
    explicit = run(sys.executable, str(script), "g.pt", "--nan", "--explicit", cwd=tmp_path)
    plain = run(sys.executable, str(script), "h.pt", "--nan", cwd=tmp_path)
    assert checksum(zero) == checksum(explicit) != "nan"
    assert checksum(plain) == "nan"
    assert torch.load(tmp_path / "f.pt")["opt"]["deepopt"]["mechanisms"]["guard"]["skipped"] == 1


def test_bad_override_and_exit_status(script, tmp_path):
    bad = deepopt_run("--set", "nosuch=1", "--", str(script), "x.pt", cwd=tmp_path)
    assert bad.returncode == 2 and "nosuch" in bad.stderr
    failing = tmp_path / "fail.py"
    failing.write_text("import sys; sys.exit(3)\n")
    assert deepopt_run("--", "python", str(failing), cwd=tmp_path).returncode == 3


@pytest.mark.parametrize("body, said", [
    ("import torch\nprint(torch.ones(2).sum())\n",
     "deepopt: nothing activated: the script built no torch.optim optimizer in its whole run"),
    ("import torch\nw = torch.nn.Parameter(torch.ones(2))\nopt = torch.optim.SGD([w], lr=0.1)\n",
     "deepopt: not activated on SGD: no module holding all its parameters was called while it existed"),
])
def test_nothing_activated_is_said_at_exit(body, said, tmp_path):
    (tmp_path / "s.py").write_text(body)
    proc = deepopt_run("--", "python", "s.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("deepopt:")]
    assert len(lines) == 1 and lines[0].startswith(said), proc.stderr
