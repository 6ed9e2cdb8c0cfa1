"""The core imports no framework and none of the demo's packages; each integration and the
demo say what to install when a package is missing; the wheel holds the library, not the lab
(benchmarks/), and the two meet only through the library's exported names."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

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


def test_core_dependencies_are_torch_and_numpy_and_the_tests_get_the_demo_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch", "numpy"]
    extras = project["optional-dependencies"]
    assert {d.split(">")[0] for d in extras["demo"]} == {"tqdm", "matplotlib", "mnist1d", "pillow"}
    assert "deepopt[demo]" in extras["test"] and "deepopt[demo]" in extras["bench"]


def test_the_wheel_holds_the_library_and_no_lab_module(tmp_path):
    """Built from a copy of the sources that includes the lab, so a packaging rule that
    picked up benchmarks/ would show here."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "results", "plots")
    shutil.copytree(ROOT / "src", source / "src", ignore=skip)
    shutil.copytree(ROOT / "benchmarks", source / "benchmarks", ignore=skip)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("deepopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"deepopt", f"{wheel.name.split('-py')[0]}.dist-info"}
    assert not [n for n in names if "benchmarks" in n or "/bench/" in n]
    library = {n for n in names if n.endswith(".py")}
    assert library == {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src/deepopt").rglob("*.py")}


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports by absolute name, at the top or inside functions (a
    relative import stays within the file's own package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module)
    return found


def test_the_library_imports_nothing_of_the_lab():
    sources = sorted((ROOT / "src/deepopt").rglob("*.py"))
    assert len(sources) > 20
    assert {str(p.relative_to(ROOT)): m for p in sources for m in _imported_modules(p)
            if m.split(".")[0] == "benchmarks"} == {}
    # and at run time, with the lab importable: every deepopt module, then what got loaded
    code = ("import importlib, pkgutil, sys, deepopt\n"
            "for m in pkgutil.walk_packages(deepopt.__path__, 'deepopt.'):\n"
            "    try:\n"
            "        importlib.import_module(m.name)\n"
            "    except ImportError:\n"
            "        pass  # an integration whose framework is not installed\n"
            "print(len([m for m in sys.modules if m.startswith('deepopt.')]), "
            "sorted(m for m in sys.modules if m.split('.')[0] == 'benchmarks'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    loaded, lab = proc.stdout.split(maxsplit=1)
    assert int(loaded) > 20 and lab.strip() == "[]"


def _public(module: str, name: str) -> bool:
    """Whether ``name`` is exported by ``module`` (in its ``__all__``), or is a submodule of it."""
    mod = importlib.import_module(module)
    submodule = hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
    return name in getattr(mod, "__all__", ()) or submodule


def test_the_lab_uses_only_names_the_library_exports():
    """The lab's imports from deepopt, by name: each in its module's ``__all__``; no private module."""
    uses = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] == "deepopt":
                uses += [(path.name, node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                uses += [(path.name, alias.name, None) for alias in node.names
                         if alias.name.split(".")[0] == "deepopt"]
    assert len(uses) > 10
    private = [u for u in uses if any(part.startswith("_") for part in u[1].split("."))]
    unexported = [u for u in uses if u[2] is not None and not _public(u[1], u[2])]
    assert private == [] and unexported == []
