"""``deepopt report``: BENCHMARKS.md tables and PNG plots from the raw result rows.

Nothing in the tables is typed by hand: each table sits between
``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers in BENCHMARKS.md and is
rewritten from the JSON lines; the prose around the markers is left alone.

Statistics: final-epoch test accuracy (the primary figure) as mean +/- sample std
over seeds; the paired difference to ``classical`` on the same seeds with a 95%
Student-t interval; max-over-epochs accuracy beside it, labelled test-selected.

The seed6 table (rows without an ablation ``mechanism``) adds the paired difference
to ``deepopt`` on the same net and seeds, and each run's total training time relative
to deepopt's: an equal-time row (``sam-equal-time``: ``epochs`` trained, ``budget_of``
the nominal budget) sits in the block of its nominal budget and is paired with the
deepopt run of that budget. Its last rows average each mode over the nets: the mean
over nets of the per-net paired differences.

Example (shell)::

    deepopt report benchmarks/results/ablation.jsonl benchmarks/results/seed6.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .train import is_current

__all__ = [
    "latest_runs", "load_rows", "machines_note", "paired", "seed_curves", "seed6_table", "table",
    "overhead_table", "mnist1d_table", "budget_table", "main",
]

# Two-sided 95% Student-t quantiles by degrees of freedom (df > 30: normal).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 18: 2.101, 20: 2.086, 25: 2.060, 30: 2.042}


def _t95(df: int) -> float:
    keys = [k for k in sorted(_T95) if k <= df]
    return _T95[keys[-1]] if df <= 30 and keys else 1.96


def load_rows(path: Path) -> list[dict]:
    """All JSON rows of a results file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def latest_runs(rows: list[dict]) -> list[dict]:
    """One row per run (net, mode or mechanism, seed, budget): the last one in the file.

    A run is appended again when it is redone (e.g. its recipe changed since), and the
    later row is what the code does now.

    Example:
        >>> rows = [{"net": 6, "mode": "deepopt", "seed": 0, "epochs": 20, "final_test_acc": 1.0},
        ...         {"net": 6, "mode": "deepopt", "seed": 0, "epochs": 20, "final_test_acc": 2.0}]
        >>> [r["final_test_acc"] for r in latest_runs(rows)]
        [2.0]
    """
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["net"], _key(r), r["seed"], budget(r))] = r
    return list(latest.values())


def machines_note(rows: list[dict]) -> str:
    """A warning under a table whose rows ran on more than one kind of CPU (``cpu`` field;
    rows from before it was recorded count as one unknown kind): its seconds compare
    only within one kind, so the note names them.

    Example:
        >>> machines_note([{"cpu": "EPYC, avx2"}, {"cpu": "EPYC, avx2"}])
        ''
        >>> print(machines_note([{"cpu": "EPYC, avx2"}, {}]).strip())
        _Timing columns mix machines (EPYC, avx2; not recorded): compare seconds only within one kind._
    """
    kinds = sorted({r.get("cpu") or "not recorded" for r in rows}, key=lambda k: (k == "not recorded", k))
    if len(kinds) < 2:
        return ""
    return f"\n\n_Timing columns mix machines ({'; '.join(kinds)}): compare seconds only within one kind._"


def _key(row: dict) -> str:
    mech = row.get("mechanism")
    return mech["name"] if isinstance(mech, dict) else row["mode"]


def paired(rows: list[dict], mode: str, base: str = "classical", field: str = "final_test_acc"):
    """Mean paired difference ``mode - base`` over shared seeds, its 95% half-width, n."""
    by = {(_key(r), r["seed"]): r[field] for r in rows}
    diffs = [by[(mode, s)] - by[(base, s)] for (m, s) in by if m == mode and (base, s) in by]
    if not diffs:
        return None, None, 0
    mean = statistics.fmean(diffs)
    half = _t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return mean, half, len(diffs)


def budget(row: dict) -> int:
    """The epoch budget a row belongs to: ``budget_of`` for an equal-time run, else ``epochs``."""
    return int(row.get("budget_of", row["epochs"]))


def _fmt(mean: float | None, spread: float | None, sign: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{mean:+.2f}" if sign else f"{mean:.2f}"
    return text + (f" ± {spread:.2f}" if spread is not None else "")


def table(rows: list[dict], order: list[str] | None = None) -> str:
    """Markdown table per (net, mode/mechanism) of the given rows (one epoch budget)."""
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["net"], _key(r))].append(r)
    held_out = any(str(r.get("evaluated_on", "test")).startswith("validation") for r in rows)
    acc = "validation acc" if held_out else "test acc"
    lines = [
        f"| net | mode | seeds | final {acc} (mean ± std) | paired diff vs classical (95% CI) "
        f"| max {acc} ({'selected on validation' if held_out else 'test-selected'}) | s/epoch (shared machine) |",
        "|---|---|---|---|---|---|---|",
    ]
    nets = sorted({n for n, _ in groups})
    for net in nets:
        net_rows = [r for r in rows if r["net"] == net]
        modes = [m for (n, m) in groups if n == net]
        rank = {m: i for i, m in enumerate(order or [])}
        modes.sort(key=lambda m: (m != "classical", rank.get(m, len(rank)), m))
        for mode in modes:
            g = groups[(net, mode)]
            finals = [r["final_test_acc"] for r in g]
            maxes = [r["max_test_acc"] for r in g]
            sec = statistics.fmean(r["sec_per_epoch"] for r in g)
            sd = statistics.stdev(finals) if len(finals) > 1 else None
            diff, half, _ = paired(net_rows, mode) if mode != "classical" else (None, None, 0)
            lines.append(
                f"| {net} | {mode} | {len(g)} | {_fmt(statistics.fmean(finals), sd)} | "
                f"{_fmt(diff, half, sign=True)} | {statistics.fmean(maxes):.2f} | {sec:.1f} |"
            )
    return "\n".join(lines)


#: Row order of the seed6 table (modes not listed follow, alphabetically).
SEED6_ORDER = ["classical", "deepopt", "deepopt-thorough", "sam", "sam-equal-time", "swa", "ema"]


def seed6_table(rows: list[dict]) -> str:
    """Markdown table per (net, mode) of seed6 rows of one budget, and suite averages.

    Beside :func:`table`'s columns: the paired difference to ``deepopt`` (same net,
    same seeds, nominal budget; for ``sam-equal-time`` this is the equal-wall-clock
    comparison) and the total training time (``sec_per_epoch x epochs``) relative to
    deepopt's, averaged over the seeds whose two runs recorded the same kind of CPU and the
    same thread count (rows' ``cpu`` and ``threads`` fields; rows from before ``cpu`` was
    recorded ran on different machines, so they are not paired; "–" when no seed qualifies), in process CPU time where both runs
    recorded it (``cpu_sec_per_epoch``), else in wall time. The ``all nets`` rows give, per mode,
    the mean over the nets that have both runs of the per-net mean paired difference (no
    interval: the nets differ).
    """
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["net"], _key(r))].append(r)
    rank = {m: i for i, m in enumerate(SEED6_ORDER)}

    def order(modes):
        return sorted(set(modes), key=lambda m: (rank.get(m, len(rank)), m))

    def time_ratio(g: list[dict], base: list[dict] | None) -> float | None:
        by_seed = {r["seed"]: r for r in base or []}
        ratios = []
        for r in g:
            b = by_seed.get(r["seed"])
            if b is None or not r.get("cpu") or b.get("cpu") != r["cpu"]:
                continue
            # one thread and two spend CPU time differently (spinning, shared caches)
            if b.get("threads") != r.get("threads"):
                continue
            # CPU time where both runs recorded it: load from other jobs inflates wall time
            field = "cpu_sec_per_epoch" if r.get("cpu_sec_per_epoch") and b.get("cpu_sec_per_epoch") else "sec_per_epoch"
            ratios.append(r[field] * r["epochs"] / (b[field] * b["epochs"]))
        return statistics.fmean(ratios) if ratios else None

    lines = [
        "| net | mode | seeds | epochs trained | final test acc (mean ± std) "
        "| paired diff vs classical (95% CI) | paired diff vs deepopt (95% CI) "
        "| max test acc (test-selected) | s/epoch | train time vs deepopt (same seed, CPU and threads) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_net: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for net in sorted({n for n, _ in groups}):
        net_rows = [r for r in rows if r["net"] == net]
        base = groups.get((net, "deepopt"))
        for mode in order(m for (n, m) in groups if n == net):
            g = groups[(net, mode)]
            finals = [r["final_test_acc"] for r in g]
            sd = statistics.stdev(finals) if len(finals) > 1 else None
            d_cl, h_cl, _ = paired(net_rows, mode) if mode != "classical" else (None, None, 0)
            d_do, h_do, _ = (
                paired(net_rows, mode, base="deepopt")
                if mode not in ("classical", "deepopt")
                else (None, None, 0)
            )
            ratio = time_ratio(g, base)
            if d_cl is not None:
                per_net[mode]["classical"].append(d_cl)
            if d_do is not None:
                per_net[mode]["deepopt"].append(d_do)
            if ratio is not None:
                per_net[mode]["time"].append(ratio)
            trained = sorted({r["epochs"] for r in g})
            lines.append(
                f"| {net} | {mode} | {len(g)} | {'/'.join(map(str, trained))} "
                f"| {_fmt(statistics.fmean(finals), sd)} | {_fmt(d_cl, h_cl, sign=True)} "
                f"| {_fmt(d_do, h_do, sign=True)} "
                f"| {statistics.fmean(r['max_test_acc'] for r in g):.2f} "
                f"| {statistics.fmean(r['sec_per_epoch'] for r in g):.1f} "
                f"| {'–' if ratio is None else f'{ratio:.2f}x'} |"
            )
    for mode in order(per_net):
        if mode == "classical":
            continue
        vs = per_net[mode]

        def avg(key: str, vs=vs) -> str:
            if not vs[key]:
                return "–"
            m = statistics.fmean(vs[key])
            return f"{m:.2f}x" if key == "time" else f"{m:+.2f} (mean of {len(vs[key])} nets)"

        lines.append(
            f"| all nets | {mode} | – | – | – | {avg('classical')} | {avg('deepopt')} "
            f"| – | – | {avg('time')} |"
        )
    return "\n".join(lines)


def seed_curves(accs: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per epoch, the mean, lowest and highest accuracy over seeds (up to the shortest run).

    Example:
        >>> seed_curves([[10.0, 20.0], [24.0, 30.0, 31.0]])
        ([17.0, 25.0], [10.0, 20.0], [24.0, 30.0])
    """
    n = min(len(a) for a in accs)
    per_epoch = [[a[i] for a in accs] for i in range(n)]
    return ([statistics.fmean(v) for v in per_epoch], [min(v) for v in per_epoch],
            [max(v) for v in per_epoch])


def plot(rows: list[dict], out: Path, title: str) -> list[Path]:
    """One PNG per net: mean test-accuracy curve per mode over seeds.

    Classical and deepopt also get a shaded band from the lowest to the highest seed, so a
    mean of one seed that trains and one that does not reads as such.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    held_out = any(str(r.get("evaluated_on", "test")).startswith("validation") for r in rows)
    paths = []
    for net in sorted({r["net"] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        curves: dict[str, list[list[float]]] = defaultdict(list)
        for r in rows:
            if r["net"] == net:
                curves[_key(r)].append(r["test_acc"])
        colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 modes
        ordered = sorted(curves.items(), key=lambda kv: (kv[0] != "classical", kv[0]))
        for k, (mode, accs) in enumerate(ordered):
            mean, low, high = seed_curves(accs)
            epochs = range(1, len(mean) + 1)
            bold = mode in ("classical", "deepopt", "default")
            # classical dashed and on top: where a mode's curve is the same, both stay visible
            style = {"color": "black", "ls": "--", "zorder": 3} if mode == "classical" else {
                "color": "tab:blue" if bold else colors[k % len(colors)]}
            ax.plot(epochs, mean, label=f"{mode} (n={len(accs)})", lw=2.5 if bold else 1.2, **style)
            if bold and len(accs) > 1:  # peers unshaded: six bands would hide each other
                ax.fill_between(epochs, low, high, color=style["color"], alpha=0.12, lw=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ylabel = "validation accuracy (%)" if held_out else "test accuracy (%)"
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{title}: net {net} (mean over seeds; band: seed range)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out / f"{title}-net{net}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def budget_table(files: dict[str, list[dict]]) -> str:
    """How each ablation mechanism's paired gain changes with the epoch budget.

    Pairs are formed within one results file only (a file is one kind of machine), on
    the test set (rows evaluated on held-out training data are left out). Where a
    mechanism was run at a budget in several files, the file with the most seeds is
    shown (on a tie, the later file). Only mechanisms measured at two or more budgets
    get a row; an empty string when there are none.

    Example:
        >>> rows = [{"net": 6, "mechanism": {"name": m}, "seed": 0, "epochs": e, "final_test_acc": a}
        ...         for m, e, a in (("classical", 20, 50.0), ("sam", 20, 50.5),
        ...                         ("classical", 100, 48.0), ("sam", 100, 50.0))]
        >>> print(budget_table({"ablation": rows}).splitlines()[-1])
        | 6 | sam | +0.50 (1 seed, ablation) | +2.00 (1 seed, ablation) |
    """
    cells: dict[tuple[int, str], dict[int, tuple[int, int, str]]] = defaultdict(dict)
    for order, (stem, rows) in enumerate(files.items()):
        test = [r for r in rows if "mechanism" in r and "validation" not in str(r.get("evaluated_on", ""))]
        for epochs in sorted({budget(r) for r in test}):
            sel = latest_runs([r for r in test if budget(r) == epochs])
            for net in sorted({r["net"] for r in sel}):
                on_net = [r for r in sel if r["net"] == net]
                for mech in sorted({_key(r) for r in on_net} - {"classical"}):
                    mean, half, n = paired(on_net, mech)
                    if not n:
                        continue
                    seeds = f"{n} seed{'s' if n > 1 else ''}"
                    text = f"{_fmt(mean, half, sign=True)} ({seeds}, {stem})"
                    best = cells[(net, mech)].get(epochs)
                    if best is None or (n, order) >= best[:2]:
                        cells[(net, mech)][epochs] = (n, order, text)
    kept = {k: v for k, v in cells.items() if len(v) > 1}
    if not kept:
        return ""
    budgets = sorted({e for v in kept.values() for e in v})
    lines = ["| net | mechanism | " + " | ".join(f"{e} epochs" for e in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for (net, mech), by in sorted(kept.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        lines.append(f"| {net} | {mech} | " + " | ".join(by[e][2] if e in by else "–" for e in budgets) + " |")
    return "\n".join(lines)


def _replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        return re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text.rstrip() + f"\n\n{block}\n"


def overhead_table(rows: list[dict]) -> str:
    """Per-step CPU cost rows (``deepopt bench overhead``): the latest row per net/settings."""
    latest: dict[tuple[int | str, str], dict] = {}
    for r in rows:
        latest[(r["net"], json.dumps(r["settings"], sort_keys=True))] = r
    lines = ["| net | settings | ms/step classical | ms/step activated | cost |", "|---|---|---|---|---|"]
    for (net, settings), r in sorted(latest.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        lines.append(f"| {net} | `{settings}` | {r['ms_per_step_classical']:.2f} | "
                     f"{r['ms_per_step_activated']:.2f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def _sd(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def mnist1d_table(rows: list[dict]) -> str:
    """MNIST-1D pairs (``deepopt bench mnist1d``): the latest row per net, settings and seeds."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["net"], json.dumps(r["settings"], sort_keys=True), len(r["seeds"]), r["epochs"])] = r
    lines = ["| net | settings | seeds | epochs | final acc classical | final acc deepopt | "
             "paired diff (95% CI) | max acc deepopt (selected on this split) | time ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (net, settings, n, epochs), r in sorted(latest.items()):
        c, d = r["final_classical"], r["final_deepopt"]
        diffs = [b - a for a, b in zip(c, d)]
        half = _t95(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
        ratio = "–" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}x"
        lines.append(
            f"| {net} | `{settings}` | {n} | {epochs} | {_fmt(statistics.fmean(c), _sd(c))} | "
            f"{_fmt(statistics.fmean(d), _sd(d))} | {_fmt(statistics.fmean(diffs), half, sign=True)} | "
            f"{statistics.fmean(r['max_deepopt']):.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the tables of the results files, or rewrite their blocks in ``--markdown``."""
    p = argparse.ArgumentParser(
        prog="deepopt report",
        description="Tables (Markdown) and plots (PNG) from the results files of deepopt bench. "
        "Nothing is written unless asked: without --markdown the tables go to stdout; with it, "
        "each table replaces the text between its <!-- BEGIN name --> and <!-- END name --> "
        "markers in that file (a table without markers there is appended), and every block "
        "written is listed.",
        epilog="example: deepopt report benchmarks/results/*.jsonl --markdown BENCHMARKS.md "
        "--plots benchmarks/plots",
    )
    p.add_argument("results", nargs="+", type=Path, help="results .jsonl files (deepopt bench ... --out)")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                   help="Markdown file whose generated blocks are rewritten (created if missing). "
                   "Default: none, the tables are printed to stdout")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="folder for the PNG plots the tables link to. Default: benchmarks/plots with "
                   "--markdown, else none (no plot is drawn)")
    p.add_argument("--blocks", nargs="+", default=None, metavar="NAME",
                   help="write only these blocks into --markdown (e.g. zoo-summary for the README's "
                   "table). Default: every block of the given results")
    args = p.parse_args(argv)
    if args.plots is None and args.markdown is not None:
        args.plots = Path("benchmarks/plots")
    # Progress goes to stderr when stdout carries the tables.
    log = sys.stdout if args.markdown else sys.stderr
    text = args.markdown.read_text() if args.markdown and args.markdown.exists() else ""
    written: list[str] = []
    plotted: list[Path] = []

    def put(text: str, name: str, body: str) -> str:
        if args.blocks is not None and name not in args.blocks:
            return text
        written.append(name if f"<!-- BEGIN {name} -->" in text else f"{name} (appended)")
        return _replace_block(text, name, body)

    def say(line: str) -> None:
        print(line, file=log)

    ablations: dict[str, list[dict]] = {}
    for path in args.results:
        rows = load_rows(path)
        stem = path.stem
        if rows and rows[0].get("suite") == "mnist1d":
            split = rows[0]["split"]
            body = (f"_Generated by `deepopt report` from `{path.as_posix()}` ({len(rows)} rows; "
                    f"evaluated on the {split} split; the latest per net, settings and seeds)._\n\n"
                    + mnist1d_table(rows))
            text = put(text, stem, body)
            say(f"{stem}: {len(rows)} rows")
            continue
        if rows and "setup" in rows[0] and "split" not in rows[0]:  # zoo-cost.jsonl: read beside zoo.jsonl
            continue
        if rows and "setup" in rows[0]:  # the zoo: its own tables and forest plot
            from . import zoo_report

            zoo_report.use_costs(path.with_name("zoo-cost.jsonl"))
            zoo_report.derive_sam_costs(rows)
            text = put(text, "zoo-screen", zoo_report.screen_table(rows))
            text = put(text, "zoo-candidates", zoo_report.candidates_table(rows))
            text = put(text, "zoo", zoo_report.setup_table(rows))
            text = put(text, "zoo-thorough", zoo_report.setup_table(rows, zoo_report.THOROUGH_MODES))
            text = put(text, "zoo-msam", zoo_report.setup_table(rows, zoo_report.MSAM_MODES))
            text = put(text, "zoo-summary", zoo_report.summary_table(rows))
            png = zoo_report.forest_plot(rows, args.plots / "zoo-forest.png") if args.plots else "no plot"
            plotted += [png] if args.plots else []
            say(f"{stem}: {len(rows)} rows; tables zoo-screen, zoo-candidates, zoo, zoo-thorough, zoo-msam, zoo-summary; {png}")
            continue
        if rows and "ms_per_step_classical" in rows[0]:
            body = (f"_Generated by `deepopt report` from `{path.as_posix()}` "
                    f"({len(rows)} rows; the latest per net and settings)._\n\n" + overhead_table(rows))
            text = put(text, stem, body)
            say(f"{stem}: {len(rows)} rows")
            continue
        stale = [r for r in rows if not is_current(r)]
        if stale:  # a recipe changed since these ran: their redone runs replace them
            rows = [r for r in rows if is_current(r)]
            say(f"{stem}: {len(stale)} rows of a recipe changed since left out")
        if any("mechanism" in r for r in rows):
            ablations[stem] = rows
        for epochs in sorted({budget(r) for r in rows}):
            # equal-time rows by their budget; a redone run by its latest row
            sel = latest_runs([r for r in rows if budget(r) == epochs])
            name = f"{stem}-{epochs}ep"
            ablation = any("mechanism" in r for r in sel)
            body = (f"_Generated by `deepopt report` from `{path.as_posix()}` "
                    f"({len(sel)} runs, {epochs} epochs)._\n\n"
                    + (table(sel) if ablation else seed6_table(sel)) + machines_note(sel))
            pngs = plot(sel, args.plots, name) if args.plots else []
            plotted += pngs
            body += "\n\n" * bool(pngs) + " ".join(f"![{p.stem}]({p.as_posix()})" for p in pngs)
            text = put(text, name, body)
            say(f"{name}: {len(sel)} runs, {len(pngs)} plots")
    by_budget = budget_table(ablations)
    if by_budget:
        body = ("_Generated by `deepopt report` from the ablation files above: paired final "
                "test-accuracy difference vs classical (95% CI), pairs within one file._\n\n" + by_budget)
        text = put(text, "ablation-budgets", body)
        say("ablation-budgets: table")
    if args.markdown is None:
        print(text.strip())
        return 0
    args.markdown.write_text(text if text.startswith("#") else "# Benchmarks\n\n" + text.lstrip())
    say(f"wrote {args.markdown}: " + (", ".join(written) or "nothing (no results)")
        + (f"; {len(plotted)} plots in {args.plots}" if plotted else ""))
    return 0
