"""MkDocs hook: publish the repository's benchmark report and its raw results with the site.

The pages link to ``BENCHMARKS.md``, ``benchmarks/results/*`` and ``benchmarks/plots/*``,
which live at the repository's root, outside ``docs/``. Adding them to the build's files
at the same relative paths means a page's link to a results file is checked by
``mkdocs build --strict`` like any other link (a renamed or deleted file fails the build),
and BENCHMARKS.md's own links (``benchmarks/plots/...``) resolve unchanged.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ("BENCHMARKS.md", "benchmarks/results", "benchmarks/plots")


def on_files(files: Files, config) -> Files:
    """Add the published repository files to the site, at their paths in the repository."""
    for name in PUBLISHED:
        path = ROOT / name
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in paths:
            files.append(File(p.relative_to(ROOT).as_posix(), src_dir=str(ROOT),
                              dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files
