"""The core imports no framework; each integration says what to install when its framework is missing."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

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
