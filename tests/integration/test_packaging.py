"""The core imports no framework and none of the demo's packages; each integration, and the
demo, bench and report commands, say what to install when a package is missing."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from deepopt import cli

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def test_import_deepopt_imports_no_framework():
    code = (
        "import sys, deepopt, deepopt.integrations, deepopt.mechanisms\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("module, framework, extra", [
    ("lightning", "lightning", "deepopt[lightning]"),
    ("huggingface", "transformers", "deepopt[huggingface]"),
])
def test_missing_framework_names_the_extra(monkeypatch, module, framework, extra):
    monkeypatch.setitem(sys.modules, framework, None)  # "import framework" now fails as if absent
    monkeypatch.delitem(sys.modules, f"deepopt.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        importlib.import_module(f"deepopt.integrations.{module}")


# The demo extra's packages, by the module each is imported as.
DEMO_MODULES = ("tqdm", "matplotlib", "mnist1d", "PIL")


def _present(code: str, *argv: str, cwd=None) -> str:
    """The demo modules loaded at the end of ``python -c code`` (or ``python argv``), as printed."""
    proc = subprocess.run([sys.executable, *argv] if argv else [sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=180, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


PRINT_PRESENT = f"print(sorted(m for m in {DEMO_MODULES!r} if m in sys.modules))\n"
TRAIN_ONE_STEP = (
    "import sys, torch\n"
    "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
    "opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)\n"
    "{activate}"
    "loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 2, (16,)))\n"
    "loss.backward(); opt.step(); opt.zero_grad()\n" + PRINT_PRESENT
)


@pytest.fixture(scope="module")
def torch_alone() -> str:
    """What ``import torch`` loads by itself (torch.hub imports tqdm when it is installed)."""
    return _present("import sys, torch\n" + PRINT_PRESENT)


def test_core_imports_none_of_the_demo_extra(torch_alone):
    """import deepopt, an activated step and the command's parser load nothing torch does not."""
    code = ("import deepopt, deepopt.cli\n"
            "deepopt.cli.build_parser()\n"
            + TRAIN_ONE_STEP.format(activate="model, opt = deepopt.activate(model, opt)\n"))
    assert _present(code) == torch_alone


def test_deepopt_run_imports_none_of_the_demo_extra(tmp_path, torch_alone):
    (tmp_path / "train.py").write_text(TRAIN_ONE_STEP.format(activate=""))
    assert _present("", "-m", "deepopt.cli", "run", "--", "python", "train.py", cwd=tmp_path) == torch_alone


def test_demo_without_its_extra_says_what_to_install_in_one_line():
    code = ("import sys\n"
            "sys.modules['matplotlib'] = None  # as if not installed\n"
            "from deepopt.cli import main\n"
            "raise SystemExit(main(['demo']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("deepopt demo needs the demo extra: pip install 'deepopt[demo]' "
                                   "(missing: matplotlib)")


@pytest.mark.parametrize("argv, extra", [(["bench", "overhead"], "bench"), (["report"], "demo")])
def test_bench_and_report_without_the_extra_name_it(monkeypatch, capsys, argv, extra):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (f"deepopt {argv[0]} needs the {extra} extra: pip install "
                                       f"'deepopt[{extra}]' (missing: mnist1d, pillow)\n")
    with pytest.raises(SystemExit) as help_exit:  # --help needs no extra
        cli.main([argv[0], "--help"])
    assert help_exit.value.code == 0 and "needs the" not in capsys.readouterr().err


def test_a_package_found_missing_mid_command_is_the_same_one_line(monkeypatch, capsys):
    def needs_sklearn(argv):
        import sklearn  # noqa: F401

    fake = type(sys)("deepopt.bench.runner")
    fake.main = needs_sklearn
    monkeypatch.setitem(sys.modules, "deepopt.bench.runner", fake)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert cli.main(["bench", "zoo"]) == 2
    assert "pip install 'deepopt[bench]' (missing: scikit-learn)" in capsys.readouterr().err


def test_core_dependencies_are_torch_and_numpy_and_the_tests_get_the_demo_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch", "numpy"]
    extras = project["optional-dependencies"]
    assert {d.split(">")[0] for d in extras["demo"]} == {"tqdm", "matplotlib", "mnist1d", "pillow"}
    assert "deepopt[demo]" in extras["test"] and "deepopt[demo]" in extras["bench"]
