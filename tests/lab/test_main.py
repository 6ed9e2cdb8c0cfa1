"""The lab's command, ``python -m benchmarks``: its help, its dispatch, its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report, runner
from benchmarks.__main__ import main
from test_cli import options_without_help

ROOT = Path(__file__).parents[2]


def lab(argv: list[str]) -> int:
    """``python -m benchmarks ARGV``'s exit status, in this process (argparse's exits too)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_the_command_runs_from_the_repository_root_and_lists_every_suite():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    listed = " ".join(proc.stdout.split()).split("positional")[0]
    assert all(name in listed for name in ("overhead", "mnist1d", "zoo", "ablation", "seed6", "report"))
    assert proc.stdout.startswith("usage: python -m benchmarks")


def test_report_gets_the_rest_of_the_command_line(monkeypatch):
    seen = []
    monkeypatch.setattr(report, "main", lambda argv: seen.append(argv) or 3)
    assert lab(["report", "--out", "x.md"]) == 3 and seen == [["--out", "x.md"]]


@pytest.mark.parametrize("command", [["overhead"], ["mnist1d"], ["report"]])
def test_every_option_has_help_with_its_default_and_no_rest_markup(command, capsys):
    assert lab([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out
    assert options_without_help(out) == []
    text = " ".join(out.split())
    if command == ["overhead"]:
        assert text.count("Default:") == 4  # --nets, --settings, --steps, --out
    if command == ["report"]:
        assert text.count("Default:") == 3 and "the tables are printed to stdout" in text  # --markdown, --plots, --blocks


def test_seeds_means_a_list_and_a_count_says_num_seeds(capsys):
    assert lab(["mnist1d", "--seeds", "5"]) == 2
    err = capsys.readouterr().err
    assert "--num-seeds N" in err and "list of seeds" in err


@pytest.mark.parametrize("argv", [["overhead"], ["report"]])
def test_without_the_extra_it_says_what_to_install_in_one_line(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert lab(argv) == 2
    assert capsys.readouterr().err == ("python -m benchmarks needs the bench extra: pip install -e "
                                       "'.[bench]' (missing: mnist1d, pillow)\n")
    assert lab([*argv, "--help"]) == 0  # --help needs no extra
    assert "needs the" not in capsys.readouterr().err


def test_a_package_found_missing_mid_command_is_the_same_one_line(monkeypatch, capsys):
    def needs_sklearn(argv):
        import sklearn  # noqa: F401

    monkeypatch.setattr(runner, "main", needs_sklearn)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert lab(["zoo"]) == 2
    assert capsys.readouterr().err.endswith("pip install -e '.[bench]' (missing: scikit-learn)\n")


def test_report_writes_only_where_asked_and_says_what(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = tmp_path / "overhead.jsonl"
    rows.write_text(json.dumps({"net": 6, "settings": {}, "ms_per_step_classical": 10.0,
                                "ms_per_step_activated": 10.5, "ratio": 1.05}) + "\n")
    assert lab(["report", str(rows)]) == 0
    out, err = capsys.readouterr()
    assert "| 6 | `{}` | 10.00 | 10.50 | 1.05x |" in out and "overhead: 1 rows" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overhead.jsonl"]  # nothing written
    md = tmp_path / "NOTES.md"
    md.write_text("# Notes\n\nprose\n<!-- BEGIN overhead -->\nold\n<!-- END overhead -->\nmore prose\n")
    assert lab(["report", str(rows), "--markdown", str(md)]) == 0
    assert f"wrote {md}: overhead" in capsys.readouterr().out
    text = md.read_text()
    assert "old" not in text and "10.50" in text and text.startswith("# Notes\n\nprose\n")
    assert text.endswith("<!-- END overhead -->\nmore prose\n")


