"""The seed6 training loop on a tiny synthetic dataset, and the result rows."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks.train import append_row, current_settings, evaluate, finished, milestones, run

ROW_KEYS = {
    "net",
    "mode",
    "seed",
    "epochs",
    "test_acc",
    "final_test_acc",
    "max_test_acc",
    "train_loss",
    "sec_per_epoch",
    "cpu_sec_per_epoch",
    "settings",
    "torch",
    "git_commit",
    "cpu",
    "threads",
}


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.Tensor, ...]:
    """256 train / 128 test random images whose class is learnable (a mean shift)."""
    g = torch.Generator().manual_seed(123)
    y = torch.randint(0, 10, (384,), generator=g)
    x = torch.randn(384, 3, 32, 32, generator=g) + 0.3 * (y.view(-1, 1, 1, 1) - 4.5) / 4.5
    return x[:256], y[:256], x[256:], y[256:]


def test_row_and_determinism(tiny: tuple[torch.Tensor, ...]) -> None:
    a = run(5, "classical", 0, 2, tiny, progress=False)
    b = run(5, "classical", 0, 2, tiny, progress=False)
    assert set(a) == ROW_KEYS
    assert (a["net"], a["mode"], a["seed"], a["epochs"]) == (5, "classical", 0, 2)
    assert len(a["test_acc"]) == len(a["train_loss"]) == 2
    assert a["final_test_acc"] == a["test_acc"][-1] and a["max_test_acc"] == max(a["test_acc"])
    assert all(0.0 <= v <= 100.0 for v in a["test_acc"])
    assert all(math.isfinite(v) for v in a["train_loss"])
    assert (
        a["sec_per_epoch"] > 0 and a["settings"] == {} and a["threads"] == torch.get_num_threads()
    )
    assert 0 < a["cpu_sec_per_epoch"]
    assert a["torch"] == torch.__version__
    json.dumps(a)  # a row must be plain JSON
    assert a["test_acc"] == b["test_acc"]
    assert a["train_loss"] == b["train_loss"]


def test_seeds_differ(tiny: tuple[torch.Tensor, ...]) -> None:
    a = run(5, "classical", 0, 2, tiny, progress=False)
    c = run(5, "classical", 1, 2, tiny, progress=False)
    assert a["train_loss"] != c["train_loss"]


def test_closure_path_matches_plain_sgd(tiny: tuple[torch.Tensor, ...]) -> None:
    """With plain SGD, step(closure) must train exactly as backward-then-step."""
    a = run(6, "classical", 3, 1, tiny, progress=False)
    b = run(6, "classical", 3, 1, tiny, activate_kwargs={"closure": True}, progress=False)
    assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    assert b["settings"] == {"closure": True}


def test_activated_mode_calls_activate_once(
    tiny: tuple[torch.Tensor, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any mode but "classical" goes through deepopt.activate, without the "closure" key."""
    calls = []

    def activate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kw: object) -> tuple:
        calls.append(kw)
        return model, optimizer

    fake = types.ModuleType("deepopt")
    fake.activate = activate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepopt", fake)
    kw = {"recipe": "x", "closure": True}
    a = run(6, "deepopt", 3, 1, tiny, activate_kwargs=kw, progress=False)
    assert calls == [{"recipe": "x"}]
    assert kw == {"recipe": "x", "closure": True}  # the caller's dict is not modified
    assert a["settings"] == kw and a["mode"] == "deepopt"
    # an identity activation trains exactly like the classical run
    assert a["train_loss"] == run(6, "classical", 3, 1, tiny, progress=False)["train_loss"]


def test_deepopt_rows_record_what_the_recipe_resolved_to(tiny) -> None:
    a = run(6, "deepopt-budget-1.5", 0, 1, tiny, progress=False)
    assert a["settings"] == {"recipe": "default", "budget": 1.5, "closure": True}
    assert a["resolved"]["budget"] == 1.5 and a["resolved"]["guard"] is True
    assert 0 <= a["two_pass_steps"] <= 0.4 * a["steps"]  # the budget's share, at most
    assert "resolved" not in run(6, "classical", 0, 1, tiny, progress=False)


def test_milestones() -> None:
    assert milestones(1000) == [300, 600, 800]
    assert milestones(20) == [6, 12, 16]


def test_lr_schedule_reaches_optimizer(
    tiny: tuple[torch.Tensor, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    lrs: list[float] = []
    real_step = torch.optim.SGD.step

    def spy(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    x_tr, y_tr, x_te, y_te = tiny
    run(6, "classical", 0, 10, (x_tr[:64], y_tr[:64], x_te, y_te), progress=False)
    # one step per epoch; x0.1 after epochs 3, 6, 8
    assert lrs == pytest.approx([1e-2] * 3 + [1e-3] * 3 + [1e-4] * 2 + [1e-5] * 2)


def test_evaluate_restores_mode() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [2.0, 1.0, 0, 0], [0, 3.0, 0, 0]])
    y = torch.tensor([0, 1, 1, 1])
    assert evaluate(model, x, y, batch_size=3) == 75.0
    assert model.training
    model.eval()
    evaluate(model, x, y)
    assert not model.training


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_epochs(tiny: tuple[torch.Tensor, ...], bad: object) -> None:
    with pytest.raises(ValueError, match="epochs="):
        run(5, "classical", 0, bad, tiny, progress=False)  # type: ignore[arg-type]


def test_append_row_finished_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rows.jsonl"
    assert finished(path) == set()
    rows = [
        {"net": 1, "mode": "classical", "seed": 0, "epochs": 20, "test_acc": [10.0]},
        {"net": 1, "mode": "deepopt", "seed": 0, "epochs": 20, "test_acc": [11.0],
         "resolved": current_settings("deepopt")},
        {"net": 5, "mode": "classical", "seed": 2, "epochs": 3, "settings": {"closure": True}},
    ]
    for r in rows:
        append_row(path, r)
    assert finished(path) == {
        (1, "classical", 0, 20),
        (1, "deepopt", 0, 20),
        (5, "classical", 2, 3),
    }
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_a_deepopt_run_of_a_changed_recipe_is_not_finished(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    now = current_settings("deepopt-thorough")
    old = {**now, "max_skips": now["max_skips"] + 1}  # as if the recipe changed since
    append_row(path, {"net": 6, "mode": "deepopt-thorough", "seed": 0, "epochs": 2, "resolved": old})
    append_row(path, {"net": 6, "mode": "deepopt-thorough", "seed": 1, "epochs": 2, "resolved": now})
    # rows began keeping "resolved" before the default averaged: one without it is stale now
    append_row(path, {"net": 6, "mode": "deepopt", "seed": 0, "epochs": 2})
    # an ablation row keeps its own label and settings: never redone for a recipe change
    append_row(path, {"net": 6, "mode": "thorough", "seed": 0, "epochs": 2, "resolved": old,
                      "mechanism": {"name": "thorough", "settings": {"recipe": "thorough"}}})
    assert finished(path) == {(6, "deepopt-thorough", 1, 2), (6, "thorough", 0, 2)}


def test_a_setting_added_since_a_row_counts_as_its_default(tmp_path: Path, monkeypatch) -> None:
    import benchmarks.train as train_mod

    path = tmp_path / "rows.jsonl"
    now = current_settings("deepopt")
    before = {k: v for k, v in now.items() if k != "budget"}  # written before the knob
    append_row(path, {"net": 4, "mode": "deepopt", "seed": 1, "epochs": 2, "resolved": before})
    assert finished(path) == {(4, "deepopt", 1, 2)}  # the knob's default: the same recipe
    monkeypatch.setattr(train_mod, "current_settings", lambda mode: {**now, "budget": 1.5})
    assert finished(path) == set()  # the recipe now turns the new knob on: redo the run


def test_a_knob_turned_on_redoes_only_the_runs_it_can_change(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    before = {k: v for k, v in current_settings("deepopt").items() if k != "dropout_match"}
    for net in (1, 2, 4):  # rows written before dropout_match joined the default recipe
        append_row(path, {"net": net, "mode": "deepopt", "seed": 0, "epochs": 2, "resolved": before})
    state = torch.get_rng_state()
    assert finished(path) == {(1, "deepopt", 0, 2), (4, "deepopt", 0, 2)}  # net 2 has dropout
    assert torch.equal(torch.get_rng_state(), state)


def test_finished_skips_truncated_line_and_append_recovers(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    append_row(path, {"net": 1, "mode": "classical", "seed": 0, "epochs": 2})
    with open(path, "a") as f:
        f.write('{"net": 2, "mode": "clas')  # a crash mid-write
    assert finished(path) == {(1, "classical", 0, 2)}
    append_row(path, {"net": 3, "mode": "classical", "seed": 0, "epochs": 2})
    assert finished(path) == {(1, "classical", 0, 2), (3, "classical", 0, 2)}


def test_run_killed_after_an_epoch_resumes_bit_identically(tmp_path):
    """A checkpoint after epoch 1 of 2 plus a second call gives the uninterrupted row."""
    import benchmarks.train as train_mod

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(96, 3, 32, 32, generator=g), torch.randint(0, 10, (96,), generator=g),
            torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
    kwargs = {"rho": 0.1, "average": "ema"}
    full = train_mod.run(6, "x", 0, 2, data, activate_kwargs=kwargs, progress=False)
    ckpt = tmp_path / "partial.pt"
    # simulate a kill after epoch 1 of the 2-epoch budget: run with a checkpoint, stop early
    calls = {"n": 0}
    real_evaluate = train_mod.evaluate

    def evaluate_then_die(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    train_mod.evaluate = evaluate_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train_mod.run(6, "x", 0, 2, data, activate_kwargs=kwargs, progress=False, checkpoint=ckpt)
    finally:
        train_mod.evaluate = real_evaluate
    assert ckpt.exists()
    resumed = train_mod.run(6, "x", 0, 2, data, activate_kwargs=kwargs, progress=False, checkpoint=ckpt)
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["train_loss"] == full["train_loss"]
