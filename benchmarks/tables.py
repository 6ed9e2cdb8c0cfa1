"""The seed6, ablation, overhead and MNIST-1D tables of BENCHMARKS.md, from result rows.

Statistics: final-epoch test accuracy (the primary figure) as mean +/- sample std
over seeds; the paired difference to ``classical`` on the same seeds with a 95%
Student-t interval; max-over-epochs accuracy beside it, labelled test-selected.

The seed6 table (rows without an ablation ``mechanism``) adds the paired difference
to ``deepopt`` on the same net and seeds, and each run's total training time relative
to deepopt's: an equal-time row (``sam-equal-time``: ``epochs`` trained, ``budget_of``
the nominal budget) sits in the block of its nominal budget and is paired with the
deepopt run of that budget. Its last rows average each mode over the nets: the mean
over nets of the per-net paired differences.

Example:
    >>> rows = [{"net": 6, "mode": m, "seed": s, "final_test_acc": a}
    ...         for s, (c, d) in enumerate([(50.0, 51.0), (60.0, 63.0)])
    ...         for m, a in (("classical", c), ("deepopt", d))]
    >>> paired(rows, "deepopt")
    (2.0, 12.706..., 2)
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict

from .stats import t95

__all__ = [
    "latest_runs", "machines_note", "mode_of", "paired", "budget", "table", "SEED6_ORDER", "seed6_table",
    "budget_table", "overhead_table", "mnist1d_table",
]


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
        latest[(r["net"], mode_of(r), r["seed"], budget(r))] = r
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


def mode_of(row: dict) -> str:
    """A row's mode: its ablation mechanism's name, else its seed6 ``mode``.

    Example:
        >>> mode_of({"mode": "ablation", "mechanism": {"name": "sam-0.05"}}), mode_of({"mode": "ema"})
        ('sam-0.05', 'ema')
    """
    mech = row.get("mechanism")
    return mech["name"] if isinstance(mech, dict) else row["mode"]


def paired(rows: list[dict], mode: str, base: str = "classical", field: str = "final_test_acc"):
    """Mean paired difference ``mode - base`` over shared seeds, its 95% half-width, n."""
    by = {(mode_of(r), r["seed"]): r[field] for r in rows}
    diffs = [by[(mode, s)] - by[(base, s)] for (m, s) in by if m == mode and (base, s) in by]
    if not diffs:
        return None, None, 0
    mean = statistics.fmean(diffs)
    half = t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
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
        groups[(r["net"], mode_of(r))].append(r)
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
        groups[(r["net"], mode_of(r))].append(r)
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
                for mech in sorted({mode_of(r) for r in on_net} - {"classical"}):
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


def overhead_table(rows: list[dict]) -> str:
    """Per-step CPU cost rows (``python -m benchmarks overhead``): the latest row per net/settings."""
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
    """MNIST-1D pairs (``python -m benchmarks mnist1d``): the latest row per net, settings and seeds."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["net"], json.dumps(r["settings"], sort_keys=True), len(r["seeds"]), r["epochs"])] = r
    lines = ["| net | settings | seeds | epochs | final acc classical | final acc deepopt | "
             "paired diff (95% CI) | max acc deepopt (selected on this split) | time ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (net, settings, n, epochs), r in sorted(latest.items()):
        c, d = r["final_classical"], r["final_deepopt"]
        diffs = [b - a for a, b in zip(c, d)]
        half = t95(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
        ratio = "–" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}x"
        lines.append(
            f"| {net} | `{settings}` | {n} | {epochs} | {_fmt(statistics.fmean(c), _sd(c))} | "
            f"{_fmt(statistics.fmean(d), _sd(d))} | {_fmt(statistics.fmean(diffs), half, sign=True)} | "
            f"{statistics.fmean(r['max_deepopt']):.2f} | {ratio} |")
    return "\n".join(lines)


