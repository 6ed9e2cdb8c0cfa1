"""The seed6 modes of the training loop: deepopt, exact SAM, SWA, EMA, SAM at equal time."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import report, tables
from benchmarks import train as train_mod
from benchmarks.runner import MECHANISMS, SEED6_MODES
from benchmarks.train import (
    EMA_DECAY,
    MODES,
    append_row,
    finished,
    run,
    sam_step,
    trained_epochs,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.Tensor, ...]:
    """128 train / 64 test random 3x32x32 images with a learnable mean shift per class."""
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, 10, (192,), generator=g)
    x = torch.randn(192, 3, 32, 32, generator=g) + 0.3 * (y.view(-1, 1, 1, 1) - 4.5) / 4.5
    return x[:128], y[:128], x[128:], y[128:]


def test_seed6_help_names_and_explains_every_mode(capsys) -> None:
    from benchmarks.runner import _parser

    with pytest.raises(SystemExit):
        _parser().parse_args(["seed6", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse re-wraps lines, even at hyphens
    for mode, what in MODES.items():
        assert "".join(f"{mode} = {what}".split()) in text
    assert "--threads1" in text and "Default:benchmarks/results/seed6.jsonl" in text
    assert SEED6_MODES == tuple(MODES)
    assert set(MODES) >= {"classical", "deepopt", "deepopt-thorough", "sam", "swa", "ema"}
    assert "sam-equal-time" in MODES


@pytest.mark.parametrize("net", [5, 6])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_runs_one_epoch_deterministically(
    tiny: tuple[torch.Tensor, ...], mode: str, net: int
) -> None:
    a = run(net, mode, 0, 1, tiny, progress=False)
    b = run(net, mode, 0, 1, tiny, progress=False)
    assert (a["net"], a["mode"], a["seed"], a["epochs"]) == (net, mode, 0, 1)
    assert len(a["test_acc"]) == len(a["train_loss"]) == 1
    assert a["test_acc"] == b["test_acc"] and a["train_loss"] == b["train_loss"]
    assert a["settings"] == b["settings"]
    assert ("budget_of" in a) == (mode == "sam-equal-time")
    json.dumps(a)


def test_modes_train_differently(tiny: tuple[torch.Tensor, ...]) -> None:
    """SAM's steps differ from plain SGD's; the first batch's loss (at the init) does not."""
    x, y = tiny[0][:128], tiny[1][:128]
    data = (x, y, tiny[2], tiny[3])
    classical = run(6, "classical", 1, 2, data, progress=False)
    sam = run(6, "sam", 1, 2, data, progress=False)
    assert sam["train_loss"] != classical["train_loss"]
    assert sam["settings"] == {"rho": 0.05}


def test_sam_step_equals_hand_computation() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    lr, wd, rho = 0.1, 5e-4, 0.05
    w0 = [p.detach().clone() for p in model.parameters()]

    def loss_at(ps: list[torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(F.linear(x, ps[0], ps[1]), y)

    ws = [w.clone().requires_grad_() for w in w0]
    loss0 = loss_at(ws)
    g = torch.autograd.grad(loss0, ws)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    wp = [(w + rho * gi / (norm + 1e-12)).requires_grad_() for w, gi in zip(w0, g, strict=True)]
    g2 = torch.autograd.grad(loss_at(wp), wp)
    expected = [w - lr * (gi + wd * w) for w, gi in zip(w0, g2, strict=True)]

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    loss = sam_step(model, opt, x, y, rho=rho)
    assert float(loss) == pytest.approx(float(loss0.detach()), abs=1e-7)  # the loss at w
    for p, e, gi in zip(model.parameters(), expected, g2, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
        torch.testing.assert_close(p.grad, gi, rtol=0, atol=1e-6)  # grad taken at w + e
    # and it is not a plain SGD step
    plain = [w - lr * (gi + wd * w) for w, gi in zip(w0, g, strict=True)]
    assert not torch.allclose(next(model.parameters()).detach(), plain[0], atol=1e-6)


def test_sam_second_pass_leaves_batchnorm_buffers_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )
    x = torch.randn(16, 1, 6, 6)
    y = torch.randint(0, 3, (16,))
    one_pass = copy.deepcopy(model)
    one_pass(x)  # what the first pass alone does to the running statistics
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sam_step(model, opt, x, y)
    bn, ref = model[1], one_pass[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=0)


def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """Record the weights after every SGD step and the weights of every evaluated model."""
    stepped: list[list[torch.Tensor]] = []
    evaluated: list[list[torch.Tensor]] = []
    real_step, real_eval = torch.optim.SGD.step, train_mod.evaluate

    def step(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        out = real_step(self, *args, **kwargs)
        stepped.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return out

    def evaluate(model: nn.Module, *args: object, **kwargs: object) -> float:
        inner = model.module if isinstance(model, torch.optim.swa_utils.AveragedModel) else model
        evaluated.append([p.detach().clone() for p in inner.parameters()])
        return real_eval(model, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    return stepped, evaluated


def test_ema_evaluates_the_hand_computed_average(
    tiny: tuple[torch.Tensor, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    stepped, evaluated = _spy(monkeypatch)
    row = run(6, "ema", 0, 2, tiny, progress=False)  # 2 steps per epoch
    assert row["settings"] == {"ema_decay": EMA_DECAY, "use_buffers": True}
    assert len(stepped) == 4 and len(evaluated) == 2
    ema = [w.double() for w in stepped[0]]  # the first update copies the weights
    for k, weights in enumerate(stepped[1:], start=2):
        ema = [EMA_DECAY * e + (1 - EMA_DECAY) * w.double() for e, w in zip(ema, weights, strict=True)]
        if k == 2:
            for got, want in zip(evaluated[0], ema, strict=True):
                torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    for got, want in zip(evaluated[1], ema, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    assert not torch.allclose(evaluated[1][0], stepped[-1][0])  # not the live weights


def test_swa_averages_the_last_quarter_and_updates_bn(
    tiny: tuple[torch.Tensor, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y, xt, yt = tiny
    stepped, evaluated = _spy(monkeypatch)
    bn_calls: list[int] = []
    real_update_bn = torch.optim.swa_utils.update_bn

    def update_bn(loader: object, model: nn.Module, *args: object) -> None:
        bn_calls.append(len(evaluated))
        real_update_bn(loader, model, *args)

    monkeypatch.setattr(torch.optim.swa_utils, "update_bn", update_bn)
    row = run(6, "swa", 0, 8, (x[:64], y[:64], xt, yt), progress=False)  # 1 step per epoch
    assert row["settings"] == {"swa_start_epoch": 6, "update_bn": True, "swalr": False}
    assert len(stepped) == 8 and bn_calls == [6, 7]  # before the 7th and 8th evaluations
    for k in range(6):  # before the start the live weights are evaluated
        for got, live in zip(evaluated[k], stepped[k], strict=True):
            assert torch.equal(got, live)
    for got, a in zip(evaluated[6], stepped[6], strict=True):
        torch.testing.assert_close(got, a)
    for got, a, b in zip(evaluated[7], stepped[6], stepped[7], strict=True):
        torch.testing.assert_close(got, (a + b) / 2)


def test_sam_equal_time_trains_half_the_budget(
    tiny: tuple[torch.Tensor, ...], tmp_path: Path
) -> None:
    assert [trained_epochs("sam-equal-time", e) for e in (1, 2, 3, 5, 20)] == [1, 1, 2, 3, 10]
    assert trained_epochs("sam", 20) == trained_epochs("deepopt", 20) == 20
    x, y, xt, yt = tiny
    data = (x[:64], y[:64], xt, yt)
    eq = run(6, "sam-equal-time", 2, 4, data, progress=False)
    assert eq["epochs"] == 2 and eq["budget_of"] == 4 and len(eq["test_acc"]) == 2
    sam = run(6, "sam", 2, 2, data, progress=False)  # the same run: SAM, 2 epochs
    assert eq["train_loss"] == sam["train_loss"] and eq["test_acc"] == sam["test_acc"]
    path = tmp_path / "seed6.jsonl"
    append_row(path, eq)
    append_row(path, sam)
    # the runner's skip key: nominal budget, and the two modes stay apart
    assert finished(path) == {(6, "sam-equal-time", 2, 4), (6, "sam", 2, 2)}


def test_deepopt_modes_activate_the_recipes(
    tiny: tuple[torch.Tensor, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []
    closures: list[bool] = []

    def activate(model: nn.Module, optimizer: torch.optim.Optimizer, **kw: object) -> tuple:
        calls.append(kw)
        return model, optimizer

    fake = types.ModuleType("deepopt")
    fake.activate = activate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepopt", fake)
    real_step = torch.optim.SGD.step

    def step(self: torch.optim.SGD, closure: object = None) -> object:
        closures.append(closure is not None)
        return real_step(self, closure)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    x, y, xt, yt = tiny
    data = (x[:64], y[:64], xt, yt)
    a = run(6, "deepopt", 0, 1, data, progress=False)
    assert calls == [{"recipe": "default"}] and closures == [False]
    assert a["settings"] == {"recipe": "default"}
    b = run(6, "deepopt-thorough", 0, 1, data, progress=False)  # the former thorough, in its knobs
    (sam,) = calls[1]["mechanisms"]
    assert calls[1]["recipe"] == "default" and closures[1:] == [True]
    assert (sam.rho, sam.warmup, sam.lr_range) == (0.05, 1000, (0.0, 0.1))
    assert b["settings"] == {"recipe": "thorough", "sam_lr_ceiling": 0.1, "closure": True}
    # the peers never touch deepopt
    for mode in ("sam", "swa", "ema", "sam-equal-time"):
        run(6, mode, 0, 1, data, progress=False)
    assert len(calls) == 2
    # ablation labels: any other name with activate_kwargs is that activation
    c = run(6, "msam-0.03", 0, 1, data, activate_kwargs=MECHANISMS["msam-0.03"], progress=False)
    assert calls[2] == {"rho": 0.03} and c["settings"] == {"rho": 0.03}
    assert c["mode"] == "msam-0.03" and "budget_of" not in c


def test_mode_errors(tiny: tuple[torch.Tensor, ...]) -> None:
    with pytest.raises(ValueError, match="unknown"):
        run(6, "SAM", 0, 1, tiny, progress=False)
    for peer in ("sam", "swa", "ema", "sam-equal-time"):
        with pytest.raises(ValueError, match="peer"):
            run(6, peer, 0, 1, tiny, activate_kwargs={"rho": 0.1}, progress=False)
    with pytest.raises(ValueError, match="classical"):
        run(6, "classical", 0, 1, tiny, activate_kwargs={"recipe": "default"}, progress=False)


def _row(net: int, mode: str, seed: int, acc: float, sec: float, epochs: int = 20) -> dict:
    r = {"net": net, "mode": mode, "seed": seed, "epochs": epochs, "test_acc": [acc] * epochs,
         "final_test_acc": acc, "max_test_acc": acc + 1, "train_loss": [1.0] * epochs,
         "sec_per_epoch": sec, "settings": {}}
    if mode == "sam-equal-time":
        r["budget_of"] = 20
    return r


def _report_markdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, list[dict]]) -> str:
    """The Markdown ``python -m benchmarks report`` writes for results files (stem -> rows), unplotted."""
    for stem, rows in files.items():
        (tmp_path / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = tmp_path / "B.md"
    monkeypatch.setattr(report, "plot", lambda rows, out, title: [])
    paths = [str(tmp_path / f"{stem}.jsonl") for stem in files]
    assert report.main([*paths, "--markdown", str(md), "--plots", str(tmp_path)]) == 0
    return md.read_text()


def test_report_pairs_equal_time_with_deepopt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = []
    for net, shift in ((5, 0.0), (6, 2.0)):
        for seed in (0, 1):
            rows += [
                _row(net, "classical", seed, 50 + shift + seed, 1.0),
                _row(net, "deepopt", seed, 51 + shift + seed, 1.1),
                _row(net, "sam", seed, 52 + shift + seed, 2.0),
                _row(net, "sam-equal-time", seed, 50.5 + shift + seed, 2.2, epochs=10),
            ]
    rows = [r | {"cpu": "avx512"} for r in rows]
    text = tables.seed6_table(rows)
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()}
    eq5 = lines[("5", "sam-equal-time")].split("|")
    assert eq5[4].strip() == "10"  # epochs trained
    # paired over seeds 0 and 1: vs classical, vs deepopt (the same shift on both seeds)
    assert eq5[6].strip() == "+0.50 ± 0.00" and eq5[7].strip() == "-0.50 ± 0.00"
    assert eq5[10].strip() == "1.00x"  # 10 x 2.2 s = 20 x 1.1 s: equal wall-clock
    assert lines[("5", "sam")].split("|")[10].strip() == "1.82x"
    avg = lines[("all nets", "deepopt")].split("|")
    assert avg[6].strip() == "+1.00 (mean of 2 nets)"
    assert lines[("all nets", "sam-equal-time")].split("|")[7].strip() == "-0.50 (mean of 2 nets)"
    assert ("all nets", "classical") not in lines
    # time ratios pair a seed's runs only when both ran on the same kind of CPU
    mixed = [r | {"cpu": "avx2"} if r["mode"] == "sam" and (r["net"] == 6 or r["seed"] == 1) else r for r in rows]
    mixed_lines = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in tables.seed6_table(mixed).splitlines()}
    assert mixed_lines[("6", "sam")].split("|")[10].strip() == "–"
    assert mixed_lines[("5", "sam")].split("|")[10].strip() == "1.82x"  # seed 0 only
    assert mixed_lines[("all nets", "sam")].split("|")[10].strip() == "1.82x"  # net 5 only
    # CPU time, where both runs recorded it, replaces the load-inflated wall time
    cpu = [r | {"cpu_sec_per_epoch": 3.0 if r["mode"] == "sam" and r["net"] == 5 else 1.0} for r in rows]
    cpu_lines = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in tables.seed6_table(cpu).splitlines()}
    assert cpu_lines[("5", "sam")].split("|")[10].strip() == "3.00x"
    half = [r if r["mode"] == "deepopt" else r | {"cpu_sec_per_epoch": 9.0} for r in rows]
    half_lines = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in tables.seed6_table(half).splitlines()}
    assert half_lines[("5", "sam")].split("|")[10].strip() == "1.82x"  # deepopt's not recorded: wall time
    unknown = [{k: v for k, v in r.items() if k != "cpu"} for r in rows]  # not recorded: no pair
    assert tables.seed6_table(unknown).splitlines()[2].split("|")[10].strip() == "–"
    threads = [r | {"threads": 2 if r["mode"] == "sam" and r["net"] == 6 else 1} for r in rows]
    threads_lines = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in tables.seed6_table(threads).splitlines()}
    assert threads_lines[("6", "sam")].split("|")[10].strip() == "–"  # 1 thread vs 2: no pair
    assert threads_lines[("5", "sam")].split("|")[10].strip() == "1.82x"

    # main(): equal-time rows land in the block of their nominal budget
    out = _report_markdown(tmp_path, monkeypatch, {"seed6": rows})
    assert "<!-- BEGIN seed6-20ep -->" in out and "seed6-10ep" not in out
    assert "paired diff vs deepopt" in out


def test_report_keeps_the_ablation_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {**_row(6, m, s, 50.0 + s + (m != "classical"), 1.0),
         "mechanism": {"name": m, "settings": MECHANISMS[m]}}
        for m in ("classical", "default") for s in (0, 1)
    ]
    out = _report_markdown(tmp_path, monkeypatch, {"ablation": rows})
    assert tables.table(rows) in out and "paired diff vs deepopt" not in out


def test_budget_table_pairs_within_a_file_and_prefers_more_seeds(tmp_path: Path, monkeypatch) -> None:
    def rows(mech: str, epochs: int, gains: list[float], **extra) -> list[dict]:
        out = []
        for seed, gain in enumerate(gains):
            for name, acc in (("classical", 50.0 + seed), (mech, 50.0 + seed + gain)):
                out.append({"net": 6, "mechanism": {"name": name}, "seed": seed, "epochs": epochs,
                            "final_test_acc": acc, "max_test_acc": acc, "test_acc": [acc],
                            "sec_per_epoch": 1.0, **extra})
        return out

    files = {
        "a": rows("sam", 20, [1.0]) + rows("sam", 100, [5.0]) + rows("ema", 20, [1.0], evaluated_on="validation"),
        "b": rows("sam", 100, [2.0, 4.0]) + rows("ema", 100, [1.0]),
    }
    table = tables.budget_table(files)
    assert "| 6 | sam | +1.00 (1 seed, a) | +3.00 ± 12.71 (2 seeds, b) |" in table
    assert "ema" not in table  # its 20-epoch rows are validation rows: one test budget only
    assert tables.budget_table({"a": rows("sam", 20, [1.0])}) == ""
    out = _report_markdown(tmp_path, monkeypatch, files)
    assert "<!-- BEGIN ablation-budgets -->" in out and table in out


def test_runner_validation_split_trains_on_held_out_data_and_skips_finished(tmp_path, monkeypatch) -> None:
    import benchmarks.data as data_mod
    import benchmarks.train as train_mod
    from benchmarks import runner

    n = 6000
    fake = (torch.zeros(n, 1), torch.arange(n), torch.ones(10, 1), torch.full((10,), -1))
    monkeypatch.setattr(data_mod, "load_cifar10", lambda path: fake)
    seen = []

    def fake_run(net, mode, seed, epochs, data, **kwargs):
        seen.append(data)
        return {"net": net, "mode": mode, "seed": seed, "epochs": epochs, "final_test_acc": 1.0,
                "max_test_acc": 1.0, "sec_per_epoch": 0.1}

    monkeypatch.setattr(train_mod, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    argv = ["ablation", "--data", "x", "--nets", "6", "--mechanisms", "classical", "--seeds", "0",
            "--validation", "--no-progress", "--threads", "1"]
    assert runner.main(argv) == 0
    x_train, y_train, x_eval, y_eval = seen[0]
    assert len(y_train) == n - 5000 and len(y_eval) == 5000
    assert (y_eval >= 0).all()  # evaluated on training images, never the test set
    assert not set(y_train.tolist()) & set(y_eval.tolist())
    rows = [json.loads(line) for line in (tmp_path / "benchmarks/results/ablation-val.jsonl").open()]
    assert rows[0]["evaluated_on"].startswith("validation")
    assert runner.main(argv) == 0 and len(seen) == 1  # finished: skipped on restart


def test_mnist1d_suite_appends_rows_skips_finished_and_reports(tmp_path, monkeypatch) -> None:
    import deepopt.demo as demo
    from benchmarks import mnist1d

    calls = []

    def fake_run_demo(*, net, epochs, seeds, overrides, progress, validation):
        calls.append((net, dict(overrides), validation))
        rec = {"test_acc": [50.0, 60.0], "epoch_seconds": [1.0, 1.0]}
        better = {"test_acc": [55.0, 62.0 + len(overrides)], "epoch_seconds": [1.0, 1.2]}
        return {"config": {"net": net, "seeds": list(range(seeds)), "epochs": epochs,
                           "optimizer": {"lr": 0.1}, "torch_version": "x", "deepopt_version": "y"},
                "seeds": [{"classical": rec, "deepopt": better} for _ in range(seeds)]}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    out = tmp_path / "m.jsonl"
    argv = ["--nets", "mlp", "--num-seeds", "2", "--epochs", "2", "--settings", "{}", '{"noise": 0.1}',
            "--validation", "--out", str(out), "--no-progress"]
    assert mnist1d.main(argv) == 0 and mnist1d.main(argv) == 0
    assert calls == [("mlp", {}, True), ("mlp", {"noise": 0.1}, True)]  # second call: all skipped
    rows = [json.loads(line) for line in out.open()]
    assert rows[1]["final_deepopt"] == [63.0, 63.0] and rows[1]["split"] == "validation"
    md = tmp_path / "B.md"
    assert report.main([str(out), "--markdown", str(md), "--plots", str(tmp_path)]) == 0
    text = md.read_text()
    assert '| mlp | `{"noise": 0.1}` | 2 | 2 | 60.00 ± 0.00 | 63.00 ± 0.00 | +3.00 ± 0.00 |' in text
    assert "validation split" in text


@pytest.mark.parametrize("bad, says", [('{"nosie": 1}', "nosie"), ("[1]", "not a JSON object"), ("{", "JSON")])
def test_mnist1d_suite_refuses_bad_settings_before_training(bad, says, capsys) -> None:
    from benchmarks import mnist1d

    with pytest.raises(SystemExit):
        mnist1d.main(["--settings", bad, "--out", "unused.jsonl"])
    assert says in capsys.readouterr().err


def _fake_seed6(tmp_path, monkeypatch, on_run=None) -> list:
    """Route runner.main to a fake trainer; returns the list of (net, mode, seed) it ran."""
    import benchmarks.data as data_mod
    import benchmarks.train as train_mod

    monkeypatch.setenv("DEEPOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "load_cifar10", lambda path: None)
    seen = []

    def fake_run(net, mode, seed, epochs, data, **kwargs):
        seen.append((net, mode, seed))
        if on_run is not None:
            on_run(net, mode, seed)
        return {"net": net, "mode": mode, "seed": seed, "epochs": epochs, "final_test_acc": 1.0,
                "max_test_acc": 1.0, "sec_per_epoch": 0.1}

    monkeypatch.setattr(train_mod, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    return seen


SEED6_ARGV = ["seed6", "--data", "x", "--nets", "6", "--modes", "classical", "--seeds", "0", "1",
              "--no-progress", "--threads", "1"]


def test_runner_skips_a_run_another_process_holds_and_resumes_it_once_released(tmp_path, monkeypatch) -> None:
    import fcntl

    from benchmarks import runner

    seen = _fake_seed6(tmp_path, monkeypatch)
    lock = tmp_path / "cache/partial/seed6-net6-classical-s0-e20.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:  # another worker's claim (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert runner.main(SEED6_ARGV) == 0
        assert seen == [(6, "classical", 1)]
    assert runner.main(SEED6_ARGV) == 0  # released, as when its process dies
    assert seen == [(6, "classical", 1), (6, "classical", 0)]
    assert not list(lock.parent.glob("*.lock"))  # no lock files left behind
    rows = [json.loads(line) for line in (tmp_path / "benchmarks/results/seed6.jsonl").open()]
    assert sorted(r["seed"] for r in rows) == [0, 1]


def test_runner_skips_a_run_another_process_finished_since_it_started(tmp_path, monkeypatch) -> None:
    from benchmarks import runner
    from benchmarks.train import append_row

    def other_worker_finishes_seed_1(net, mode, seed):
        row = {"net": net, "mode": mode, "seed": 1, "epochs": 20, "final_test_acc": 2.0}
        append_row(tmp_path / "benchmarks/results/seed6.jsonl", row)

    seen = _fake_seed6(tmp_path, monkeypatch, on_run=other_worker_finishes_seed_1)
    assert runner.main(SEED6_ARGV) == 0
    assert seen == [(6, "classical", 0)]


def test_status_lists_done_running_paused_and_pending_runs_and_trains_nothing(
    tmp_path, monkeypatch, capsys
) -> None:
    import fcntl

    from benchmarks import runner
    from benchmarks.train import append_row

    seen = _fake_seed6(tmp_path, monkeypatch)
    append_row(tmp_path / "benchmarks/results/seed6.jsonl",
               {"net": 6, "mode": "classical", "seed": 0, "epochs": 20, "final_test_acc": 51.5,
                "max_test_acc": 52.25})
    partial = tmp_path / "cache/partial/seed6-net6-classical-s1-e20.pt"
    partial.parent.mkdir(parents=True)
    torch.save({"test_acc": [10.0, 30.0, 40.0]}, partial)
    argv = ["seed6", "--data", "x", "--nets", "6", "--modes", "classical", "--seeds", "0", "1", "2",
            "--status"]
    lock = partial.with_suffix(".lock")
    with open(lock, "a") as held:  # another worker is training seed 1
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert runner.main(argv) == 0
    assert runner.main(argv) == 0  # that worker was killed: seed 1 waits to be resumed
    running, paused = capsys.readouterr().out.split("]\n")[:2]
    assert "seed 0: done (final 51.50, max 52.25)" in running
    assert "seed 1: running (3/20 epochs)" in running and "seed 2: pending" in running
    assert "1 done, 1 running, 0 paused, 1 pending" in running
    assert "seed 1: paused (3/20 epochs)" in paused and "1 done, 0 running, 1 paused, 1 pending" in paused
    assert seen == [] and lock.exists() and partial.exists()  # looked, touched nothing


def test_status_estimates_the_hours_left_from_finished_rows_of_the_same_thread_count(
    tmp_path, monkeypatch, capsys
) -> None:
    from benchmarks import runner
    from benchmarks.train import append_row

    _fake_seed6(tmp_path, monkeypatch)
    results = tmp_path / "benchmarks/results/seed6.jsonl"
    for seed, threads, sec_per_epoch in ((0, 2, 360.0), (9, 1, 1.0)):  # seed 9: 1 thread, ignored
        append_row(results, {"net": 6, "mode": "classical", "seed": seed, "epochs": 20,
                             "final_test_acc": 51.5, "max_test_acc": 52.25, "threads": threads,
                             "sec_per_epoch": sec_per_epoch})
    partial = tmp_path / "cache/partial/seed6-net6-classical-s1-e20.pt"
    partial.parent.mkdir(parents=True)
    torch.save({"test_acc": [10.0, 30.0, 40.0]}, partial)
    argv = ["seed6", "--data", "x", "--nets", "6", "5", "--modes", "classical", "sam-equal-time",
            "--seeds", "0", "1", "--threads", "2", "--status"]
    assert runner.main(argv) == 0
    out = capsys.readouterr().out
    # 0.1 h per classical epoch; SAM's passes are 2x but sam-equal-time trains 10 of 20 epochs.
    assert "net 6          classical seed 1: paused (3/20 epochs, ~1.7 h left)" in out
    assert "net 6     sam-equal-time seed 0: pending (~2.0 h left)" in out
    assert "net 5          classical seed 0: pending\n" in out  # no row of net 5: no estimate
    assert "about 5.7 h of training left" in out and "4 run(s) with no row of their net" in out
    # Once a sam-equal-time row exists, its own time per epoch counts.
    append_row(results, {"net": 6, "mode": "sam-equal-time", "seed": 0, "epochs": 10, "budget_of": 20,
                         "final_test_acc": 50.0, "max_test_acc": 51.0, "threads": 2,
                         "sec_per_epoch": 1800.0})
    assert runner.main(argv) == 0
    assert "net 6     sam-equal-time seed 1: pending (~5.0 h left)" in capsys.readouterr().out


def test_plot_writes_one_png_per_net(tmp_path) -> None:
    from benchmarks.plots import plot

    rows = [{"net": net, "mode": mode, "seed": seed, "test_acc": [10.0 + seed, 20.0, 30.0]}
            for net in (5, 6) for mode in ("classical", "deepopt", "swa") for seed in (0, 1)]
    paths = plot(rows, tmp_path / "plots", "seed6-3ep")
    assert [p.name for p in paths] == ["seed6-3ep-net5.png", "seed6-3ep-net6.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_report_leaves_out_rows_of_a_recipe_changed_since(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.train import current_settings

    old = {**current_settings("deepopt"), "dropout_match": False}  # before it joined the default
    rows = [_row(2, "classical", 0, 10.0, 1.0), _row(2, "deepopt", 0, 10.0, 1.0) | {"resolved": old},
            _row(1, "classical", 0, 60.0, 1.0), _row(1, "deepopt", 0, 60.0, 1.0) | {"resolved": old}]
    cells = {tuple(c.strip() for c in ln.split("|")[1:3])
             for ln in _report_markdown(tmp_path, monkeypatch, {"seed6": rows}).splitlines()}
    # net 2 has dropout: its old default row is stale; net 1 has none: still current
    assert ("2", "classical") in cells and ("2", "deepopt") not in cells and ("1", "deepopt") in cells
    rows.append(_row(2, "deepopt", 0, 25.0, 1.0) | {"resolved": current_settings("deepopt")})  # redone
    out = _report_markdown(tmp_path, monkeypatch, {"seed6": rows})
    assert ("2", "deepopt") in {tuple(c.strip() for c in ln.split("|")[1:3]) for ln in out.splitlines()}
