"""The ``deepopt`` command: help texts, version, where bench/report went, a tiny demo run."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import deepopt
from deepopt import cli, demo, demo_report
from deepopt.experimental import Calibration


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep the dataset cache out of the user's home; one cache for the whole session."""
    monkeypatch.setenv("DEEPOPT_CACHE", str(tmp_path_factory.getbasetemp() / "deepopt-cache"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's --help / --version / usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for word in ("demo", "run", "--version"):
        assert word in out
    assert "bench" not in out and "report" not in out  # the lab's, outside the package


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"deepopt {deepopt.__version__}"


def test_demo_help_explains_every_option(capsys):
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0
    demo_parser = cli.build_parser()._subparsers._group_actions[0].choices["demo"]
    for action in demo_parser._actions:
        if action.help == argparse.SUPPRESS:  # --seeds: an error naming --num-seeds
            continue
        assert action.help, f"{action.option_strings} has no help"
        for opt in action.option_strings:
            assert opt in out
    for word in ("MNIST-1D", "--net", "deep", "mlp", "cnn", "gru", "--num-seeds", "--recipe", "--out", "--threads", "--workers"):
        assert word in out
    assert "Default: deep." in " ".join(out.split())


def test_console_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "deepopt.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_no_command_prints_help_and_fails(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "demo" in out


@pytest.mark.parametrize("argv", [["bench", "seed6", "--nets", "6"], ["report", "--help"]])
def test_bench_and_report_say_in_one_line_where_they_moved(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err == (f"deepopt {argv[0]}: the benchmarks moved out of the package; from a checkout of "
                   f"the repository run 'python -m benchmarks {'SUITE' if argv[0] == 'bench' else 'report'} "
                   "...' (see BENCHMARKS.md)\n")


def test_tiny_demo_writes_table_png_and_json(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, err = run(
        capsys, "demo", "--net", "mlp", "--epochs", "1", "--limit", "500", "--num-seeds", "2",
        "--out", str(out_dir), "--set", "average=ema",
    )
    assert code == 0, err
    for text in (
        "classical", "deepopt", "difference", "final test accuracy (%)",
        "max test accuracy (%) (test-selected)", "train time (s)", "overhead ratio",
        "2 seeds", "±", "average='ema'",
    ):
        assert text in out
    png, js = out_dir / "demo_mlp.png", out_dir / "demo_mlp.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(js.read_text())
    assert result["config"]["train_size"] == 500 and result["config"]["test_size"] == 500
    assert result["config"]["overrides"] == {"average": "ema"}
    assert [s["seed"] for s in result["seeds"]] == [0, 1]
    for s in result["seeds"]:
        for name in ("classical", "deepopt"):
            assert len(s[name]["test_acc"]) == len(s[name]["epoch_seconds"]) == 1
            assert all(0 <= a <= 100 for a in s[name]["test_acc"])
    assert result["seeds"][0]["deepopt"]["calibrated"] is False
    assert result["seeds"][0]["deepopt"]["skipped_steps"] == 0
    assert "calibration applied in 0 of 2 runs" in out
    final = result["summary"]["final_test_acc"]
    diffs = [s["deepopt"]["test_acc"][-1] - s["classical"]["test_acc"][-1] for s in result["seeds"]]
    assert final["difference"]["mean"] == pytest.approx(float(np.mean(diffs)))
    assert f"{final['classical']['mean']:.2f}" in out


def test_default_demo_is_the_deep_net_and_calibration_makes_the_difference(capsys, tmp_path):
    # No --net: the default network, the plain deep conv net whose signal vanishes at init.
    assert demo.DEFAULT_NET == "deep"
    code, out, err = run(
        capsys, "demo", "--epochs", "2", "--limit", "256", "--num-seeds", "1", "--out", str(tmp_path),
        "--no-progress",
    )
    assert code == 0, err
    assert "MNIST-1D, deep, 2 epochs, 1 seed" in out and "lr 0.005" in out
    result = json.loads((tmp_path / "demo_deep.json").read_text())
    assert result["config"]["net"] == "deep" and result["config"]["optimizer"]["lr"] == 0.005
    record = result["seeds"][0]["deepopt"]
    assert record["calibrated"] is True and record["skipped_steps"] == 0
    assert record["signal_ratio"] < Calibration().threshold
    # Training differs: calibration's doing (the averaged weights change only what eval computes).
    assert result["seeds"][0]["classical"]["train_loss"] != record["train_loss"]
    text = " ".join(out.split())
    assert "calibration applied in 1 of 1 run" in text
    # Calibration alone changed training; the default's averaging is named as what changes
    # only the evaluated weights.
    assert "What made the difference: start-up calibration, alone" in text
    assert "The evaluated weights are also averaged (power)" in text


def test_deep_net_is_plain_and_seed_initialised():
    torch.manual_seed(0)
    net = demo.build_net("deep")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert len(convs) == 20 and all(c.kernel_size == (3,) and c.stride == (1,) for c in convs)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear)):
            fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = (6 / (fan_in + fan_out)) ** 0.5  # Xavier-uniform
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
            assert not m.bias.any()


def test_deep_net_pair_differs_only_through_calibration():
    torch.set_num_threads(1)
    data = {k: v[:256] for k, v in demo.load_mnist1d().items()}
    pair = demo.train_pair(data, net="deep", epochs=1, seed=1, batch_size=64)
    off = demo.train_pair(data, net="deep", epochs=1, seed=1, batch_size=64, overrides={"calibrate": False})
    assert pair["deepopt"]["calibrated"] is True and pair["deepopt"]["signal_ratio"] < 1e-3
    assert pair["classical"]["train_loss"] != pair["deepopt"]["train_loss"]
    # Without calibration the rest of the default recipe leaves the deep net's run unchanged.
    assert off["deepopt"]["calibrated"] is False
    assert off["deepopt"]["train_loss"] == off["classical"]["train_loss"] == pair["classical"]["train_loss"]


def test_thorough_demo_calibrates_the_deep_net_through_step_closure():
    # The thorough recipe trains through optimizer.step(closure) (two-pass SAM); its
    # first pass must calibrate as the default recipe's plain step does.
    torch.set_num_threads(1)
    data = {k: v[:128] for k, v in demo.load_mnist1d().items()}
    pair = demo.train_pair(data, net="deep", epochs=1, seed=1, batch_size=64, recipe="thorough")
    assert pair["deepopt"]["calibrated"] is True and pair["deepopt"]["signal_ratio"] < 1e-3
    assert pair["classical"]["train_loss"] != pair["deepopt"]["train_loss"]


def test_cause_names_the_mechanism_that_acted():
    def result(calibrated, skipped, **settings):
        rec = {"calibrated": calibrated, "skipped_steps": skipped, "signal_ratio": 2e-4,
               "test_acc": [50.0], "train_loss": [1.0]}
        return {"config": {"settings": {"calibrate_threshold": 1e-3, **settings}},
                "seeds": [{"classical": {"test_acc": [10.0], "train_loss": [2.3]}, "deepopt": rec}]}

    assert "start-up calibration, alone" in demo_report._cause(result(True, 0))
    assert "2.0e-04 times the first layer's" in demo_report._cause(result(True, 0))
    assert "divergence guard alone, which skipped 3 steps" in demo_report._cause(result(False, 3))
    assert "rho=0.05) alone" in demo_report._cause(result(False, 0, rho=0.05))
    both = demo_report._cause(result(True, 0, average="ema"))
    assert "start-up calibration, alone" in both and "evaluated weights are also averaged (ema)" in both
    assert "several mechanisms acted (start-up calibration, the momentum" in demo_report._cause(
        result(True, 0, rho=0.05, average="ema"))
    assert "weight averaging (ema) alone" in demo_report._cause(result(False, 0, average="ema"))


def test_runs_share_init_and_data_order():
    # The safe recipe changes nothing on a net whose signal propagates: the two runs of
    # a pair must then be bit-identical, which checks same init, same batches, same loop.
    torch.set_num_threads(1)
    data = {k: v[:300] for k, v in demo.load_mnist1d().items()}
    pair = demo.train_pair(data, net="cnn", epochs=2, seed=3, recipe="safe", batch_size=64)
    assert pair["classical"]["test_acc"] == pair["deepopt"]["test_acc"]
    assert pair["classical"]["train_loss"] == pair["deepopt"]["train_loss"]
    assert pair["classical"]["lr"] == pair["deepopt"]["lr"]
    result = {"seeds": [pair]}
    assert "The two runs are identical" in "\n".join(demo_report._notes(result))


def test_worker_processes_give_the_single_process_results():
    # Each run rebuilt in its own process from the seed must equal the in-process pair
    # (deepcopy twin, interleaved epochs): same init, batches, calibration and numbers.
    kwargs = {"net": "deep", "epochs": 2, "seeds": 2, "limit": 256, "progress": False}
    alone = demo.run_demo(workers=1, **kwargs)
    spread = demo.run_demo(workers=8, **kwargs)
    assert alone["config"]["workers"] == 1 and spread["config"]["workers"] == 4  # 2 seeds x 2 runs
    for a, b in zip(alone["seeds"], spread["seeds"]):
        assert a["seed"] == b["seed"]
        for mode in ("classical", "deepopt"):
            for key in ("test_acc", "test_loss", "train_loss", "lr"):
                assert a[mode][key] == b[mode][key], (mode, key)
        for key in ("calibrated", "skipped_steps", "signal_ratio"):
            assert a["deepopt"][key] == b["deepopt"][key]
    assert alone["seeds"][0]["deepopt"]["calibrated"] is True  # the pair did differ
    with pytest.raises(ValueError, match="workers=0"):
        demo.run_demo(workers=0, **kwargs)


def test_validation_split_evaluates_on_held_out_training_data(monkeypatch):
    full = demo.load_mnist1d()
    seen = {}

    def fake_run_seeds(data, **kwargs):
        seen.update(data)
        rec = {"test_acc": [1.0], "train_loss": [1.0], "epoch_seconds": [1.0]}
        return [{"classical": rec, "deepopt": rec}]

    monkeypatch.setattr(demo, "_run_seeds", fake_run_seeds)
    result = demo.run_demo(net="mlp", epochs=1, seeds=1, validation=True, progress=False)
    assert result["config"]["evaluated_on"].startswith("validation")
    assert len(seen["x"]) == 3200 and len(seen["x_test"]) == 800
    assert torch.equal(seen["x_test"], full["x"][3200:])  # training data, never the test set
    demo.run_demo(net="mlp", epochs=1, seeds=1, progress=False)
    assert torch.equal(seen["x_test"], full["x_test"])


def test_closure_form_for_exact_sam_leaves_the_classical_run_unchanged():
    torch.set_num_threads(1)
    data = {k: v[:300] for k, v in demo.load_mnist1d().items()}
    plain = demo.train_pair(data, net="mlp", epochs=2, recipe="safe", batch_size=64)
    sam = demo.train_pair(data, net="mlp", epochs=2, recipe="thorough", batch_size=64)
    assert sam["classical"] == plain["classical"] | {"epoch_seconds": sam["classical"]["epoch_seconds"]}
    assert sam["deepopt"]["train_loss"] != plain["deepopt"]["train_loss"]  # SAM did act


def test_lr_schedule_drops_at_half_and_three_quarters():
    data = {k: v[:64] for k, v in demo.load_mnist1d().items()}
    lrs = demo.train_pair(data, net="mlp", epochs=8, lr=0.1, batch_size=64)["classical"]["lr"]
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


@pytest.mark.parametrize("net", demo.NETS)
def test_nets_map_sequences_to_ten_logits(net):
    torch.manual_seed(0)
    assert demo.build_net(net)(torch.randn(3, 40)).shape == (3, 10)


def test_dataset_is_cached_deterministic_and_leaves_global_rng_alone(tmp_path):
    cached = demo.load_mnist1d()  # the session's cache (generated there at most once)
    assert len(list(demo.cache_dir().glob("mnist1d-*.npz"))) == 1
    assert cached["x"].shape == (4000, 40) and cached["x_test"].shape == (1000, 40)
    assert cached["x"].dtype == torch.float32 and set(cached["y"].unique().tolist()) == set(range(10))
    (tmp_path / next(demo.cache_dir().glob("mnist1d-*.npz")).name).write_bytes(b"corrupt")
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    fresh = demo.load_mnist1d(tmp_path)  # corrupt entry: regenerated, not an error
    assert np.random.rand() == expected  # generation restored NumPy's global state
    for k in cached:
        assert torch.equal(cached[k], fresh[k])  # generation is deterministic
    with np.load(next(tmp_path.glob("mnist1d-*.npz"))) as f:  # and the entry was rewritten
        assert np.array_equal(f["x"], cached["x"].numpy())


def test_bad_override_and_values_fail_before_training(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--set", "rhoo=0.1", "--out", str(tmp_path))
    assert code == 2 and "rhoo" in err
    code, _, err = run(capsys, "demo", "--set", "rho", "--out", str(tmp_path))
    assert code == 2 and "KEY=VALUE" in err
    assert run(capsys, "demo", "--epochs", "0")[0] == 2
    assert not list(tmp_path.iterdir())


def test_parse_overrides_types():
    assert demo.parse_overrides(["rho=0.05", "max_skips=5", "average=none", "adaptive=true"]) == {
        "rho": 0.05, "max_skips": 5, "average": None, "adaptive": True,
    }


def options_without_help(help_text: str) -> list[str]:
    """The options of an argparse help text that have no help line."""
    lines = help_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        option = re.match(r"  (--?[\w-]+)", line)
        if option is None:
            continue
        beside = len(re.split(r"\s{2,}", line.strip(), maxsplit=1)) == 2
        below = i + 1 < len(lines) and re.match(r"\s{6,}[^\s-]", lines[i + 1]) is not None
        if not (beside or below):
            missing.append(option.group(1))
    return missing


def test_options_without_help_are_found():
    text = "options:\n  -h, --help     show this\n  --steps STEPS\n  --out OUT\n                 file\n"
    assert options_without_help(text) == ["--steps"]


def test_every_option_of_run_has_help_and_no_rest_markup(capsys):
    code, out, _ = run(capsys, "run", "--help")
    assert code == 0 and "``" not in out and ":func:" not in out
    assert options_without_help(out) == []
    assert "{default,safe,thorough}" in out


def test_seeds_is_a_list_and_a_count_says_num_seeds(capsys):
    code, _, err = run(capsys, "demo", "--seeds", "3")
    assert code == 2 and "--num-seeds N" in err and "list of seeds" in err


def test_progress_is_one_line_per_epoch_without_a_terminal(capsys):
    from deepopt.progress import progress_bar

    with progress_bar(total=3, unit="epoch", desc="demo") as bar:
        for _ in range(3):
            bar.set_postfix_str("acc 50%")
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == [f"demo: epoch {i}/3 (acc 50%)" for i in (1, 2, 3)]


def test_demo_plot_shows_the_whole_scale_the_net_described_and_the_legend_off_the_curves(tmp_path,
                                                                                        monkeypatch):
    import matplotlib.pyplot as plt

    result = {"config": {"net": "deep", "epochs": 3, "lr_milestones": [2], "recipe": "default",
                         "overrides": {}},
              "seeds": [{m: {"test_acc": [10.0, 11.0, 12.0 + k]} for k, m in enumerate(("classical", "deepopt"))}]}
    seen = {}
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: seen.setdefault("ax", fig.axes[0]))
    demo_report.plot_curves(result, tmp_path / "p.png")
    ax = seen["ax"]
    assert ax.get_ylim() == (0.0, 100.0)
    assert "20-layer plain conv net" in ax.get_title() and "MNIST-1D deep" not in ax.get_title()
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().y1 < ax.get_window_extent().y0 + 1  # below the axes
