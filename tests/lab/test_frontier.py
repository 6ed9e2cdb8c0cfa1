"""Classical trained longer (``classical-x{b}``) and the frontier report (issue 42)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import frontier, zoo

TINY = dataclasses.replace(zoo.SETUPS["breast-mlp-sgdm-cosine"], name="tiny", epochs=3)


@pytest.fixture(scope="module")
def data():
    return zoo.load_data("breast_cancer")


def _lrs(kind: str, steps: int, epochs: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = zoo.schedule(kind, opt, steps, epochs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", ["step", "drops", "multistep", "cosine", "onecycle", "warmup-linear",
                                  "warmup-cosine"])
def test_a_stretched_schedule_is_the_same_curve_over_twice_the_steps(kind):
    short, long = _lrs(kind, 300, 10), _lrs(kind, 600, 20)
    exact = kind in ("step", "drops", "multistep")  # milestones and step size at doubled steps
    for t in range(300):
        assert long[2 * t] == pytest.approx(short[t], abs=0 if exact else 0.02)
    assert min(long[:300]) > min(short)  # not just the same curve cut short


def test_the_stretch_scales_steps_epochs_and_the_plateau_patience():
    setup = dataclasses.replace(TINY, epochs=20, batch_size=10)
    assert zoo.stretched_budget(setup, 100) == (10, 200, 20, 20)
    assert zoo.stretched_budget(setup, 100, 1.25) == (10, 250, 25, 25)
    assert zoo.stretched_budget(setup, 105, 1.5) == (10, 300, 30, 30)  # the short batch is still dropped
    per_epoch, steps, epochs, sched_epochs = zoo.stretched_budget(setup, 100, 2)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    assert zoo.schedule("plateau", opt, steps, sched_epochs).patience == 4  # 2 at x1
    assert zoo.schedule("onecycle", opt, steps, sched_epochs).total_steps == 400
    assert zoo.schedule("cosine", opt, steps, sched_epochs).T_max == 400


def test_x1_is_classical_exactly_and_longer_runs_share_its_first_steps(data):
    classical = zoo.run_setup(TINY, 0, "classical", data)
    x1 = zoo.run_setup(TINY, 0, "classical-x1", data)
    for a, b in zip(classical, x1):
        assert (a["final"], a["per_epoch"], a["train_loss"], a["steps"]) == (b["final"], b["per_epoch"],
                                                                          b["train_loss"], b["steps"])
    flat = dataclasses.replace(TINY, schedule="none")  # same LR at every step: the same first epochs
    short = zoo.run_setup(flat, 0, "classical", data)[0]
    long = zoo.run_setup(flat, 0, "classical-x1.5", data)[0]
    assert long["steps"] == round(1.5 * short["steps"]) and long["stretch"] == 1.5
    assert long["train_loss"][:3] == short["train_loss"] and long["per_epoch"][:3] == short["per_epoch"]
    assert len(long["per_epoch"]) == 5  # 3 x 11 steps x 1.5 = 50 steps: 4 epochs and a partial fifth
    cosine = zoo.run_setup(TINY, 0, "classical-x2", data)[0]
    assert cosine["train_loss"][0] != short["train_loss"][0] or cosine["per_epoch"] != short["per_epoch"][:3]


def test_modes_parse_and_a_budget_above_one_takes_a_closure():
    with pytest.raises(ValueError, match="stretch must be a number >= 1"):
        zoo._activate_kwargs("classical-x0.5")
    with pytest.raises(ValueError, match="stretch must be a number >= 1"):
        zoo._activate_kwargs("classical-xlong")
    assert zoo._activate_kwargs("classical-x2") == (None, False)
    assert zoo._needs_closure({"budget": 1.5}) and zoo._needs_closure({"budget": 2})
    assert not zoo._activate_kwargs("deepopt")[1]


def _row(setup, mode, seed, split, final, cpu=1.0, steps=100, task="classification"):
    return {"setup": setup, "mode": mode, "trajectory": mode, "seed": seed, "split": split, "final": final,
            "cpu_sec_per_step": cpu, "sec_per_step": cpu, "steps": steps, "family": "F", "task": task,
            "higher_is_better": task != "lm"}


def test_the_frontier_picks_classical_on_validation_and_signs_a_lower_is_better_metric(tmp_path):
    rows = []
    budget = 'deepopt:{"budget": 2}'
    for seed in range(3):
        # longer is better on validation but worse on test: the choice must follow validation
        rows += [_row("s", "classical", seed, "val", 80), _row("s", "classical", seed, "test", 80),
                 _row("s", "classical-x2", seed, "val", 81, steps=200), _row("s", "classical-x2", seed, "test", 79,
                                                                          steps=200),
                 _row("s", budget, seed, "val", 80, cpu=1.8), _row("s", budget, seed, "test", 80 + seed, cpu=1.8)]
        rows += [_row("lm", m, seed, split, v, task="lm", steps=st)
                 for m, v, st in (("classical", 3.0, 100), ("classical-x2", 2.8, 200), (budget, 2.9, 100))
                 for split in ("val", "test")]
    gains = frontier.frontier_gains(rows, 2.0)
    assert gains["s"]["chosen"] == 2.0 and gains["s"]["vs_best"] == [1, 2, 3]  # against x2's 79
    assert gains["s"]["vs_x1"] == [0, 1, 2] and gains["s"]["cost"] == pytest.approx([1.8] * 3)
    assert gains["s"]["cost_stretched"] == [2.0] * 3
    assert gains["lm"]["chosen"] == 2.0 and gains["lm"]["vs_x1"] == pytest.approx([0.1] * 3)  # bits saved
    assert gains["lm"]["vs_best"] == pytest.approx([-0.1] * 3) and not gains["lm"]["points"]
    summary = frontier.summary_table(rows)
    assert "| 2 | 1 (3) | +1.00 | +2.00 | 0 / 0 | -1.00 | 1.80x | 2.00x |" in summary  # the LM not in the mean
    assert "-0.100 ± 0.000 ▼" in frontier.setup_table(rows, 2.0)
    png = frontier.frontier_plot(rows, tmp_path / "frontier.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert frontier.mode_point(json.dumps("x")) is None and frontier.mode_point('deepopt:{"rho": 1}') is None


def test_the_radius_screen_pairs_each_variant_with_budget_1_5_on_both_splits():
    shipped = 'deepopt:{"budget": 1.5}'
    asam = 'deepopt:{"experimental":[{"class":"BudgetSAM","budget":1.5,"rho":0.5,"adaptive":true}]}'
    rows = []
    for seed in range(3):
        for split, gain in (("val", 1.0), ("test", -0.5)):  # better on validation, worse on test
            rows += [_row("a", shipped, seed, split, 80 + seed), _row("a", asam, seed, split, 80 + seed + gain),
                     _row("lm", shipped, seed, split, 3.0, task="lm"),  # bits/char: lower is better
                     _row("lm", asam, seed, split, 3.0 - gain / 100, task="lm")]
    assert frontier.radius_variant(asam) == "ASAM rho 0.5"
    assert frontier.radius_variant('deepopt:{"budget": 2}') is None
    (line,) = frontier.radius_table(rows).splitlines()[2:]
    assert line == "| ASAM rho 0.5 | 1 | +1.00 | 1 / 0 | -0.50 | 0 / 1 | +0.0100 ± 0.0000 ▲ / -0.0050 ± 0.0000 ▼ |"
    # a loop that announces its length is paired with the shipped budget on such a loop
    told, told_asam = (m[:-1] + ', "announce_length": true}' for m in (shipped, asam))
    rows += [_row("a", m, seed, split, 70 + (m == told_asam))
             for seed in range(3) for split in ("val", "test") for m in (told, told_asam)]
    lines = frontier.radius_table(rows).splitlines()[2:]
    assert lines[1].startswith("| ASAM rho 0.5, length announced | 1 | +1.00 | 1 / 0 | +1.00 | 1 / 0 |"), lines


def test_a_budget_run_takes_its_second_pass_on_the_last_share_of_an_announced_run(data):
    from deepopt.mechanisms.budget import BudgetSAM

    share = BudgetSAM(1.5).share  # what budget 1.5 buys in two-pass steps (the library's accounting)
    # TINY's cosine announces the run's length: two passes on the last share of it
    half = zoo.run_setup(TINY, 0, 'deepopt:{"budget": 1.5}', data)[0]
    assert 0 < share < 1 and half["resolved"]["budget"] == 1.5
    assert half["two_pass_share"] == pytest.approx(share, abs=0.04)
    flat = dataclasses.replace(TINY, schedule="none")  # a constant LR announces nothing: no SAM step
    assert zoo.run_setup(flat, 0, 'deepopt:{"budget": 1.5}', data)[0]["two_pass_share"] == 0.0
    told = 'deepopt:{"budget": 1.5, "announce_length": true}'  # the loop sets optimizer.total_steps
    assert zoo.run_setup(flat, 0, told, data)[0]["two_pass_share"] == pytest.approx(share, abs=0.04)
    assert frontier.mode_point(told) == (frontier.ANNOUNCED, 1.5)
