"""The zoo's tables and forest plot (``python -m benchmarks report benchmarks/results/zoo.jsonl``).

* ``zoo-screen``: every candidate on the **validation** split, the mean over setups of its
  paired gain vs classical, how many setups it wins or loses with a 95% interval clear
  of zero, and its median cost per step; candidates are chosen from this table only.
* ``zoo-candidates``: per setup, every candidate's mean gain on the validation split.
* ``zoo``: per setup on the **test** split: classical, then the paired gain (mean over
  seeds, 95% Student-t interval) of deepopt's default and of the peers, with the cost.
* ``zoo-thorough``: the same for the candidates of ``recipe="thorough"`` (up to 2x).
* ``zoo-msam``: the same for the momentum-direction perturbation (MSAM) with the default's average.
* ``zoo-summary``: the same by setup family, the table the README shows.
* ``zoo-forest.png``: gain +/- 95% interval per setup and mode, on the test split.

Costs per step of the training modes come from ``zoo-cost.jsonl`` beside the rows
(``python -m benchmarks zoo --cost``: alternating blocks timed with the CPU clock in one
process); those of the evaluation-only candidates from their own runs.

Metric: final-epoch accuracy in % (classification) or ``R^2`` in % (regression);
higher is better, gains are in points.

Example:
    >>> rows = [{"setup": "s", "seed": k, "mode": m, "split": "test", "final": v,
    ...          "sec_per_step": 1.0, "family": "MLP", "schedule": "none"}
    ...         for k, (a, b) in enumerate([(90, 91), (80, 82)]) for m, v in (("classical", a), ("x", b))]
    >>> gains(rows, "x", "test")["s"]
    [1, 2]
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from .stats import interval

__all__ = ["COSTS", "use_costs", "gains", "screen_table", "candidates_table", "setup_table",
           "summary_table", "forest_plot", "TEST_MODES", "THOROUGH_MODES", "MSAM_MODES", "LABELS", "label", "derive_sam_costs"]

#: What the test tables show: deepopt's default and the peers a user would pick instead.
TEST_MODES = ["deepopt", "peer-ema-swa-utils", "peer-ema-pytorch", "peer-sam"]

_AVERAGE = '"average": "power", "average_width": 0.05, "average_follows_lr": true, "average_every": 4'
#: Short names of the training-mode candidates (``--modes 'deepopt:JSON'``) in the tables.
LABELS = {
    'deepopt:{"experimental":[{"class":"SwitchAverage","period":8}]}': "switch-ema-8",
    'deepopt:{"experimental":[{"class":"SwitchAverage","period":2}]}': "switch-ema-2",
    'deepopt:{"recipe":"thorough",' + _AVERAGE.replace(": ", ":").replace(", ", ",") + "}": "thorough+average",
    'deepopt:{"recipe":"thorough","sam_lr_ceiling":0.1,' + _AVERAGE.replace(": ", ":").replace(", ", ",") + "}":
        "thorough-tail+average",
    'deepopt:{"average_samples": 8}': "deepopt-samples-8",
    'deepopt:{"rho":0.05}': "msam-0.05+average",
    'deepopt:{"rho":0.2}': "msam-0.2+average",
    'deepopt:{"experimental":[{"class":"MomentumPerturbation","rho":0.05,"lr_ceiling":0.1}]}': "msam-tail-0.05+average",
    'deepopt:{"experimental":[{"class":"MomentumPerturbation","rho":0.2,"lr_ceiling":0.1}]}': "msam-tail-0.2+average",
}


def _modes(*names: str) -> list[str]:
    """The modes of :data:`LABELS` called ``names``, in that order."""
    return [next(k for k, v in LABELS.items() if v == name) for name in names]


#: The ``zoo-thorough`` test table: the candidates for ``recipe="thorough"`` (up to 2x).
THOROUGH_MODES = _modes("thorough-tail+average", "thorough+average") + ["peer-sam"]

#: The ``zoo-msam`` test table: MSAM (``rho``) on top of the default, everywhere or in the
#: low-LR tail, at two radii, beside the default.
MSAM_MODES = _modes("msam-0.05+average", "msam-0.2+average", "msam-tail-0.05+average",
                    "msam-tail-0.2+average") + ["deepopt"]


def label(mode: str) -> str:
    """A mode's name in the tables (:data:`LABELS`, else the mode itself)."""
    return LABELS.get(mode, mode)


def _index(rows: list[dict], split: str) -> dict[tuple[str, str], dict[int, dict]]:
    """``(setup, mode) -> {seed: row}`` for one split; the last row of a run wins."""
    out: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for r in rows:
        if r["split"] == split and r["final"] is not None:
            out[(r["setup"], r["mode"])][r["seed"]] = r
    return out


def gains(rows: list[dict], mode: str, split: str) -> dict[str, list[float]]:
    """Per setup, the paired differences ``mode - classical`` over the seeds both have."""
    idx = _index(rows, split)
    out = {}
    for (setup, m), by_seed in idx.items():
        if m != mode:
            continue
        base = idx.get((setup, "classical"), {})
        seeds = sorted(set(by_seed) & set(base))
        if seeds:
            out[setup] = [by_seed[s]["final"] - base[s]["final"] for s in seeds]
    return out


#: ``(setup, mode) -> CPU-time ratio`` from ``zoo-cost.jsonl`` (``python -m benchmarks zoo --cost``),
#: set by :func:`use_costs`; modes not in it (the evaluation-only candidates) are costed
#: within their own run (classical step plus their measured update).
COSTS: dict[tuple[str, str], float] = {}


def use_costs(path: Path) -> int:
    """Read the timed costs of the training modes from ``path`` (the latest row wins)."""
    import json

    COSTS.clear()
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            COSTS[(r["setup"], r["mode"])] = r["ratio"]
    return len(COSTS)


def derive_sam_costs(rows: list[dict]) -> int:
    """Costs of the ``thorough`` candidates from the timed cost of a SAM step (``peer-sam``).

    Their own runs shared the cores with other benchmarks, so their within-run times say
    little, and a block median would miss a SAM that runs in part of the run only. SAM at
    every step costs what ``peer-sam`` does; SAM in the low-LR tail what the default does plus
    ``share * (that - 1)``, ``share`` being the steps in the tail
    (:func:`benchmarks.zoo.tail_share`, replayed per run).
    """
    from .zoo import tail_share

    every, tail = THOROUGH_MODES[1], THOROUGH_MODES[0]
    added = 0
    for setup in {r["setup"] for r in rows if r["mode"] in (every, tail)}:
        sam = COSTS.get((setup, "peer-sam"))
        runs = [r for r in rows if r["setup"] == setup and r["mode"] == tail and r["split"] == "test"]
        if sam is None or not runs:
            continue
        share = statistics.fmean(tail_share(r["schedule"], r["steps"], r["epochs"], r["train_loss"]) for r in runs)
        COSTS[(setup, every)] = sam
        COSTS[(setup, tail)] = COSTS.get((setup, "deepopt"), 1.0) + share * (sam - 1.0)
        added += 2
    return added


def _cost(rows: list[dict], mode: str, setup: str | None = None) -> float | None:
    """Median cost per step relative to classical: timed (``COSTS``), else, for an
    evaluation-only candidate, within its classical run; ``None`` for an untimed training
    mode (its runs may have shared the cores with other benchmarks)."""
    timed = [v for (s, m), v in COSTS.items() if m == mode and (setup is None or s == setup)]
    if timed:
        return statistics.median(timed)
    idx = _index(rows, "test")
    ratios = []
    for (s, m), by_seed in idx.items():
        if m != mode or (setup is not None and s != setup):
            continue
        if any(r.get("trajectory", "classical") != "classical" for r in by_seed.values()):
            return None
        base = idx.get((s, "classical"), {})
        ratios += [by_seed[k]["sec_per_step"] / base[k]["sec_per_step"] for k in by_seed if k in base]
    return statistics.median(ratios) if ratios else None


def _fmt(mean: float, half: float) -> str:
    return f"{mean:+.2f} ± {half:.2f}" if half == half else f"{mean:+.2f}"


def _mark(mean: float, half: float) -> str:
    if half != half:
        return ""
    return " ▲" if mean - half > 0 else (" ▼" if mean + half < 0 else "")


def screen_table(rows: list[dict]) -> str:
    """Every candidate on the validation split, best mean gain first."""
    modes = sorted({r["mode"] for r in rows if r["split"] == "val"} - {"classical"})
    lines = []
    for mode in modes:
        per_setup = gains(rows, mode, "val")
        if not per_setup:
            continue
        means = [statistics.fmean(v) for v in per_setup.values()]
        cis = [interval(v) for v in per_setup.values()]
        won = sum(m - h > 0 for m, h in cis)
        lost = sum(m + h < 0 for m, h in cis)
        worst = min(per_setup, key=lambda s: statistics.fmean(per_setup[s]))
        cost = _cost(rows, mode)
        lines.append((statistics.fmean(means), label(mode), len(per_setup), interval(means), won, lost,
                      worst, statistics.fmean(per_setup[worst]), cost))
    out = ["| candidate | setups | mean gain vs classical (95% CI over setups) | setups won ▲ / lost ▼ "
           "| worst setup (gain) | median cost per step |", "|---|---|---|---|---|---|"]
    for _, mode, n, (m, h), won, lost, worst, wg, cost in sorted(lines, reverse=True):
        out.append(f"| {mode} | {n} | {_fmt(m, h)} | {won} / {lost} | {worst} ({wg:+.2f}) | "
                   f"{'' if cost is None else f'{cost:.2f}x'} |")
    return "\n".join(out)


def candidates_table(rows: list[dict], split: str = "val") -> str:
    """Per setup, every candidate's mean paired gain on ``split`` (compact: no intervals)."""
    modes = sorted({r["mode"] for r in rows if r["split"] == split} - {"classical"})
    per = {m: gains(rows, m, split) for m in modes}
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    out = ["| setup | " + " | ".join(map(label, modes)) + " |", "|---|" + "---|" * len(modes)]
    for setup in setups:
        cells = [f"{statistics.fmean(per[m][setup]):+.2f}" if setup in per[m] else "" for m in modes]
        out.append(f"| {setup} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def setup_table(rows: list[dict], modes: list[str] | None = None) -> str:
    """Per setup on the test split: classical, then each mode's paired gain and cost."""
    per_mode = {m: gains(rows, m, "test") for m in (modes or TEST_MODES)}
    modes = [m for m in per_mode if per_mode[m]]
    idx = _index(rows, "test")
    order = list(dict.fromkeys(r["setup"] for r in rows))
    setups = [s for s in order if (s, "classical") in idx]
    head = "| setup | schedule | classical | " + " | ".join(f"{label(m)} (gain, cost)" for m in modes) + " |"
    out = [head, "|" + "---|" * (3 + len(modes))]
    for setup in setups:
        base = [r["final"] for r in idx[(setup, "classical")].values()]
        m0, h0 = interval(base)
        sched = next(iter(idx[(setup, "classical")].values()))["schedule"]
        cells = []
        for mode in modes:
            g = per_mode[mode].get(setup)
            cost = _cost(rows, mode, setup)
            cells.append("" if not g else f"{_fmt(*interval(g))}{_mark(*interval(g))} "
                         f"({'' if cost is None else f'{cost:.2f}x, '}{len(g)} seeds)")
        out.append(f"| {setup} | {sched} | {m0:.2f} ± {h0:.2f} | " + " | ".join(cells) + " |")
    for mode_i, mode in enumerate(modes):
        per_setup = per_mode[mode]
        means = [statistics.fmean(v) for v in per_setup.values()]
        m, h = interval(means)
        lost = sum(interval(v)[0] + interval(v)[1] < 0 for v in per_setup.values())
        cells = [""] * len(modes)
        cells[mode_i] = f"**{_fmt(m, h)}**, {lost} lost ▼"
        out.append(f"| **mean over {len(means)} setups** (95% CI over setups) | | | " + " | ".join(cells) + " |")
    return "\n".join(out)


def summary_table(rows: list[dict], mode: str = "deepopt") -> str:
    """By setup family: classical and ``mode`` means, the paired gain and the cost."""
    idx = _index(rows, "test")
    fam: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for (setup, m), by_seed in idx.items():
        if m == "classical":
            for seed, r in by_seed.items():
                if seed in idx.get((setup, mode), {}):
                    fam[r["family"]].append((setup, seed))
    out = ["| setup family | setups | classical | deepopt | gain (95% CI over runs) | cost per step |",
           "|---|---|---|---|---|---|"]
    for family in sorted(fam):
        pairs = fam[family]
        base = [idx[(s, "classical")][k]["final"] for s, k in pairs]
        ours = [idx[(s, mode)][k]["final"] for s, k in pairs]
        diffs = [b - a for a, b in zip(base, ours)]
        n_setups = len({s for s, _ in pairs})
        costs = [c for c in (_cost(rows, mode, s) for s in {s for s, _ in pairs}) if c is not None]
        unit = "R² %" if "regression" in family else "%"
        out.append(f"| {family} | {n_setups} | {statistics.fmean(base):.2f} {unit} | "
                   f"{statistics.fmean(ours):.2f} {unit} | {_fmt(*interval(diffs))} | "
                   f"{statistics.median(costs):.2f}x |" if costs else " |")
    return "\n".join(out)


def forest_plot(rows: list[dict], out: Path, modes: list[str] | None = None) -> Path:
    """Gain +/- 95% interval per setup (rows) and mode (colours), test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in (modes or TEST_MODES) if gains(rows, m, "test")]
    order = list(dict.fromkeys(r["setup"] for r in rows))
    setups = [s for s in order if any(s in gains(rows, m, "test") for m in modes)]
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(setups) + 2.2))
    for i, mode in enumerate(modes):
        g = gains(rows, mode, "test")
        for j, setup in enumerate(setups):
            if setup not in g:
                continue
            m, h = interval(g[setup])
            y = j + (i - (len(modes) - 1) / 2) * 0.18
            ax.errorbar(m, y, xerr=0 if h != h else h, fmt="o", color=f"C{i}", ms=4, capsize=2,
                        label=label(mode) if j == 0 else None)
    ax.axvline(0, color="k", lw=0.8)
    ax.margins(x=0.04)
    ax.set_yticks(range(len(setups)), setups, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test gain vs classical, points (accuracy % or R² %), mean ± 95% CI over seeds\n"
                  "(linear within ±2, logarithmic beyond)")
    # Gains of a point sit beside peers' losses of tens of points: linear near zero.
    ax.set_xscale("symlog", linthresh=2.0, linscale=2.0)
    ticks = [t for t in (-100, -50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10)
             if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks, [f"{t:+g}" if t else "0" for t in ticks], fontsize=8)
    ax.grid(axis="x", lw=0.3, alpha=0.5)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=len(modes), fontsize=8, frameon=False)
    ax.set_title("deepopt zoo: paired gain per setup (same seed, same data order)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
