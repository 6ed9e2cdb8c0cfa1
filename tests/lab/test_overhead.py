"""``python -m benchmarks overhead`` prices what a recipe really does per step."""

import torch
from torch import nn

from benchmarks import nets, overhead, tables


def _counting_net(calls: list[str]):
    def build(net: int) -> nn.Module:
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        # training forwards only (activate's start-up probe runs without grad)
        model.register_forward_pre_hook(lambda m, a: calls.append(m.tag) if torch.is_grad_enabled() else None)
        model.tag = "classical" if not hasattr(build, "made") else "activated"
        build.made = True
        return model
    return build


def test_sam_recipe_is_timed_with_its_second_pass(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(nets, "build_net", _counting_net(calls))
    row = overhead.step_costs(6, {"budget": 2.25}, steps=4, block=2)
    assert row["closure"] is True
    # two blocks of two steps each: SAM evaluates the model twice per step
    assert calls.count("classical") == 4
    assert calls.count("activated") == 8


def test_one_pass_recipe_is_timed_without_closure(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(nets, "build_net", _counting_net(calls))
    row = overhead.step_costs(6, {}, steps=4, block=2)
    assert row["closure"] is False
    assert calls.count("classical") == calls.count("activated") == 4
    assert row["ratio"] > 0 and torch.isfinite(torch.tensor(row["ratio"]))


def test_tiny_mlp_is_a_net_choice(monkeypatch, tmp_path):
    row = overhead.step_costs("mlp", {"recipe": "safe"}, steps=4, block=2)
    assert row["net"] == "mlp" and row["closure"] is False and row["ratio"] > 0
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main's, not for the test session
    monkeypatch.setattr(overhead, "step_costs", lambda net, settings, steps: seen.append(net) or {
        "ms_per_step_classical": 1.0, "ms_per_step_activated": 1.0, "ratio": 1.0})
    assert overhead.main(["--nets", "mlp", "6", "--out", str(tmp_path / "o.jsonl")]) == 0
    assert seen == ["mlp", 6]
    rows = [{"net": net, "settings": {}, "ms_per_step_classical": 1.0, "ms_per_step_activated": 1.1,
             "ratio": 1.1} for net in ("mlp", 6, 1)]
    assert [line.split(" |")[0] for line in tables.overhead_table(rows).splitlines()[2:]] == ["| 1", "| 6", "| mlp"]
