"""The zoo: screened candidates equal the shipped mechanism, rows resume, the report reads them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks import zoo, zoo_report

TINY = dataclasses.replace(zoo.SETUPS["breast-mlp-sgdm-cosine"], name="tiny", epochs=3)


@pytest.fixture(scope="module")
def data():
    return zoo.load_data("breast_cancer")


def _final(rows, mode, split="test"):
    return next(r for r in rows if r["mode"] == mode and r["split"] == split)


def test_splits_are_disjoint_and_fixed(data):
    again = zoo._sklearn("breast_cancer")
    assert all((data[k] == again[k]).all() for k in data)
    n = len(data["y"]) + len(data["y_val"]) + len(data["y_test"])
    assert n == 569 and len(data["y_val"]) == len(data["y_test"]) == 114


def test_a_screened_average_equals_the_activated_mechanism(data):
    setup = dataclasses.replace(TINY, schedule="none", optimizer=zoo._sgd(0.05, 0.9))
    observers = {k: zoo.OBSERVERS[k] for k in ("power-0.05-lrwin", "ema-0.999")}
    screened = zoo.run_setup(setup, 0, "classical", data, observers)
    mode = 'deepopt:{"average": "power", "average_follows_lr": true, "average_every": 1}'
    shipped = zoo.run_setup(setup, 0, mode, data)
    # Evaluation-only candidates ride on the classical trajectory: same training loss.
    assert _final(screened, "power-0.05-lrwin")["train_loss"] == _final(shipped, mode)["train_loss"]
    for split in ("val", "test"):
        assert _final(screened, "power-0.05-lrwin", split)["final"] == _final(shipped, mode, split)["final"]
    assert _final(screened, "classical")["settings"] == {}
    assert _final(screened, "ema-0.999")["settings"]["ema_decay"] == 0.999


def test_the_runner_appends_rows_and_skips_finished_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(zoo.SETUPS, "tiny", TINY)
    out = tmp_path / "zoo.jsonl"
    args = ["--setups", "tiny", "--seeds", "0", "--observers", "ema-0.999", "--out", str(out)]
    assert zoo.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["mode"], r["split"]) for r in rows} == {
        (m, s) for m in ("classical", "ema-0.999") for s in ("val", "test")}
    assert {"setup", "seed", "mode", "settings", "split", "final", "per_epoch", "sec_per_step"} <= set(rows[0])
    assert zoo.main(args) == 0
    assert len(out.read_text().splitlines()) == 4  # nothing run twice
    with pytest.raises(ValueError, match="mode 'sam' is unknown"):
        zoo.main([*args, "--modes", "sam"])


def _rows(gain_by_seed):
    rows = []
    for seed, (base, ours) in enumerate(gain_by_seed):
        for mode, value in (("classical", base), ("deepopt", ours)):
            for split in ("val", "test"):
                rows.append({"setup": "s", "seed": seed, "mode": mode, "split": split, "final": value,
                             "sec_per_step": 1.1 if mode == "deepopt" else 1.0, "family": "MLP",
                             "schedule": "none"})
    return rows


def test_report_pairs_by_seed_and_marks_a_setup_lost_only_when_its_interval_is_below_zero(tmp_path):
    rows = _rows([(90, 89), (80, 79.5), (70, 69)])
    assert zoo_report.gains(rows, "deepopt", "test") == {"s": [-1, -0.5, -1]}
    table = zoo_report.setup_table(rows, ["deepopt"])
    assert "-0.83 ± 0.72 ▼" in table and "1.10x" in table and "1 lost ▼" in table
    mixed = zoo_report.setup_table(_rows([(90, 89), (80, 81), (70, 70)]), ["deepopt"])
    assert "+0.00 ± 2.48 (" in mixed and "0 lost ▼" in mixed
    assert "| deepopt | 1 |" in zoo_report.screen_table(rows)
    assert "| s | -0.83 |" in zoo_report.candidates_table(rows, "test")
    assert "| MLP | 1 |" in zoo_report.summary_table(rows)
    png = zoo_report.forest_plot(rows, tmp_path / "forest.png", ["deepopt"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_candidates_riding_on_a_dropout_net_leave_its_training_as_without_them():
    # The candidates' scratch net and evaluations must not draw from the RNG that dropout
    # uses: classical with candidates is the same run as classical alone (exact pairing).
    setup = dataclasses.replace(zoo.SETUPS["mnist1d-mlpdrop-sgd-none"], epochs=2)
    data = zoo.load_data("mnist1d")
    alone = zoo.run_setup(setup, 0, "classical", data)
    ridden = zoo.run_setup(setup, 0, "classical", data, {"ema-0.999": zoo.OBSERVERS["ema-0.999"]})
    assert _final(alone, "classical")["train_loss"] == _final(ridden, "classical")["train_loss"]
    assert _final(alone, "classical")["per_epoch"] == _final(ridden, "classical")["per_epoch"]


def test_a_mode_names_experimental_classes_and_takes_a_closure_when_sam_is_on():
    switch = 'deepopt:{"experimental": [{"class": "SwitchAverage", "period": 4}]}'
    kwargs, closure = zoo._activate_kwargs(switch)
    (m,) = zoo._activation(kwargs)["mechanisms"]
    assert type(m).__name__ == "SwitchAverage" and m.period == 4.0 and not closure
    periodic = 'deepopt:{"recipe": "thorough", "sam_every": 3}'  # a 0.1 knob: an experimental class
    kwargs, closure = zoo._activate_kwargs(periodic)
    (sam,) = zoo._activation(kwargs)["mechanisms"]
    assert closure and sam.every == 3 and sam.lr_range == (0.0, 0.1)  # the recipe's LR ceiling kept
    assert zoo._resolved(kwargs)["budget"] == 1.0  # the SAM is the mechanism's, not a budget's
    kwargs, closure = zoo._activate_kwargs('deepopt:{"budget": 1.5}')
    assert closure and zoo._resolved(kwargs)["budget"] == 1.5
    assert zoo_report.label('deepopt:{"average_samples": 8}') == "deepopt-samples-8"
    with pytest.raises(ValueError, match="'NoSuchThing' is unknown: use one of .*SwitchAverage"):
        zoo._activate_kwargs('deepopt:{"experimental": [{"class": "NoSuchThing"}]}')


def test_sam_in_the_tail_is_costed_by_its_share_of_tail_steps():
    every, tail = zoo_report.THOROUGH_MODES[:2][::-1]
    rows = [{"setup": s, "mode": tail, "split": "test", "schedule": kind, "steps": 1000, "epochs": 10,
             "train_loss": [1.0] * 10} for s, kind in (("flat", "none"), ("cos", "cosine"), ("drops", "drops"))]
    zoo_report.COSTS.clear()
    zoo_report.COSTS.update({(s, "peer-sam"): 2.0 for s in ("flat", "cos", "drops")})
    zoo_report.COSTS[("flat", "deepopt")] = 1.1
    assert zoo_report.derive_sam_costs(rows) == 6
    costs = {s: zoo_report.COSTS[(s, tail)] for s in ("flat", "cos", "drops")}
    assert costs["flat"] == 1.1  # a constant LR never reaches the tail: the default's cost
    assert costs["cos"] == pytest.approx(1.2, abs=0.01)  # cosine: lr <= 0.1 peak over the last ~20%
    assert costs["drops"] == pytest.approx(1.7)  # the seed's drops: everything after the first, at 30%
    assert zoo_report.COSTS[("cos", every)] == 2.0
    zoo_report.COSTS.clear()
