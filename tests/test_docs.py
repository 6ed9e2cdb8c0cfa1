"""The documentation site: it builds with no warning, the build fails on what it must catch,
and the README stays the short front door whose commands CI runs.

The builds run MkDocs in a subprocess (as a user would), each in a few seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not a build warning

# A build of the repository's mkdocs.yml from another docs folder (MkDocs has no command-line
# flag for it); logging is set up as `mkdocs build` sets it up, so warnings reach stderr.
BUILD_FROM = """\
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from mkdocs.commands.build import build
from mkdocs.config import load_config
build(load_config(sys.argv[1], docs_dir=sys.argv[2], site_dir=sys.argv[3]))
"""


def _build_from(docs: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BUILD_FROM, str(ROOT / "mkdocs.yml"), str(docs), str(site)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture
def docs_copy(tmp_path: Path) -> Path:
    """A copy of docs/ (its pages only) to break on purpose."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("hooks"))
    return tmp_path / "docs"


def test_site_builds_strict_with_every_page_and_the_api_reference(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    # The API reference is generated from the docstrings, their doctests rendered as code.
    api = (site / "reference" / "deepopt" / "index.html").read_text(encoding="utf-8")
    for name in ("deepopt.activate", "deepopt.deactivate", "deepopt.Settings", "deepopt.RECIPES",
                 "deepopt.DeepOptimizer", "deepopt.DivergenceError"):
        assert f'id="{name}"' in api, name
    assert "activating twice is a no-op" in api
    # Sphinx roles in docstrings became links (full deepopt paths) or code, never raw text.
    integrations = (site / "reference" / "integrations" / "index.html").read_text(encoding="utf-8")
    assert 'href="../deepopt/#deepopt.activate"' in integrations
    for page in (site / "reference").rglob("*.html"):
        assert not re.search(r":(func|class|meth|attr|data|mod):", page.read_text(encoding="utf-8")), page
    experimental = (site / "reference" / "experimental" / "index.html").read_text(encoding="utf-8")
    for name in ("MomentumPerturbation", "TwoPassSAM", "WeightNoise", "Lookahead", "WeightAverage",
                 "SwitchAverage", "legacy_kwargs"):
        assert f'id="deepopt.experimental.{name}"' in experimental, name
    # The results page shows the README's zoo-summary table and picture, and the raw rows
    # and BENCHMARKS.md it links to are published with the site.
    results = (site / "results" / "index.html").read_text(encoding="utf-8")
    assert "BEGIN zoo-summary" in results and "zoo-forest.png" in results
    assert (site / "benchmarks" / "plots" / "zoo-forest.png").is_file()
    assert (site / "benchmarks" / "results" / "zoo.jsonl").is_file()
    assert (site / "BENCHMARKS" / "index.html").is_file()


def test_broken_links_references_anchors_and_pages_fail_the_build(docs_copy, tmp_path):
    with (docs_copy / "index.md").open("a", encoding="utf-8") as f:
        f.write("\n[renamed][deepopt.activate_renamed] [gone](no-such-page.md) "
                "[anchor](recipes.md#no-such-heading)\n")
    (docs_copy / "orphan.md").write_text("# Not in the navigation\n", encoding="utf-8")
    (docs_copy / "contributing.md").unlink()
    proc = _build_from(docs_copy, tmp_path / "site")
    assert proc.returncode != 0
    for what in ("deepopt.activate_renamed", "no-such-page.md", "no-such-heading", "orphan.md",
                 "'contributing.md' is included in the 'nav'"):
        assert what in proc.stderr, what


def test_a_renamed_function_fails_the_api_reference(docs_copy, tmp_path):
    page = docs_copy / "reference" / "deepopt.md"
    page.write_text(page.read_text(encoding="utf-8").replace("::: deepopt.deactivate\n",
                                                             "::: deepopt.deactivate_renamed\n"),
                    encoding="utf-8")
    proc = _build_from(docs_copy, tmp_path / "site")
    assert proc.returncode != 0
    assert "deepopt.deactivate_renamed could not be found" in proc.stderr


def test_every_test_a_guarantee_names_exists():
    text = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    named = 0
    for row in (line for line in text.splitlines() if line.startswith("| ") and "::" in line):
        path = None  # a bare `::test_x` continues the last file named in the row
        for file, test in re.findall(r"`(tests/[\w/]+\.py)?::(test_\w+)`", row):
            path = file or path
            assert path, f"{test} has no file before it in: {row[:80]}"
            source = (ROOT / path).read_text(encoding="utf-8")
            assert re.search(rf"^def {test}\(", source, re.MULTILINE), f"{path}::{test} does not exist"
            named += 1
    assert named >= 30  # the page's table was found and read


def test_readme_is_the_front_door():
    assert len(README) <= 10_000, f"README.md is {len(README)} characters; move detail into docs/"
    # CI runs the README's test command verbatim; the demo command stays beside it.
    ci_command = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci_command == 'pip install -e ".[test]" && python -m pytest'
    assert f"{ci_command}            # the tests" in README
    assert 'pip install torch==2.13.0 -e ".[demo]" && deepopt demo' in README
    # deepopt report rewrites the zoo-summary block; the docs' results page includes the
    # README between its snippet markers, so the block and the picture must lie inside them.
    section = README.split("--8<-- [start:results]")[1].split("--8<-- [end:results]")[0]
    assert "<!-- BEGIN zoo-summary -->" in section and "<!-- END zoo-summary -->" in section
    assert "(benchmarks/plots/zoo-forest.png)" in section
    assert "](docs/" not in section  # links into docs/ would not resolve from the results page
    # Outside the snippet no build checks the README's links: every relative one must exist.
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert link.startswith("http") or (ROOT / link).exists(), f"README links to a missing {link}"
