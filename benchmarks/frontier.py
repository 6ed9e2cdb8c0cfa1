"""The compute frontier (issue 42): deepopt's ``budget`` against classical trained longer.

Reads zoo rows with the modes ``classical``, ``classical-x{b}`` (the same setup with its
step budget multiplied by ``b`` and its schedule stretched, :func:`benchmarks.zoo.stretched_budget`),
``deepopt`` and ``deepopt:{"budget": b}``, and writes:

* ``zoo-frontier``: per budget ``b``, the mean over setups of deepopt at ``budget=b``
  against classical at equal epochs (x1) and against the **better of classical x1 and
  classical x b**, that one chosen per setup on the **validation** split (mean over seeds),
  the gains paired per seed on the **test** split, 95% interval over setups;
* ``zoo-frontier-x{b}``: the same per setup, with paired 95% intervals over seeds and the
  measured costs;
* ``frontier.png``: test metric against measured cost per setup (panels grouped by setup
  family): classical at x1, x1.25, x1.5, x2 and deepopt at budgets 1, 1.25, 1.5, 2.

The measured cost of a run is its CPU seconds in the training steps (``cpu_sec_per_step
* steps``; one thread, so load on the other core counts little) over those of classical x1
on the same seed: ``b`` for classical x b by construction, what ``budget=b`` really spent
for deepopt. Gains are improvements: points of accuracy (``R^2`` %) for the higher-is-better
metrics; for the language model, bits per character saved (classical minus deepopt). Means
over setups take the setups in points only; the language model stands alone.

Example:
    >>> mode_point("classical-x1.5"), mode_point('deepopt:{"budget": 2}'), mode_point("deepopt")
    (('classical', 1.5), ('deepopt', 2.0), ('deepopt', 1.0))
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .stats import interval

__all__ = ["BUDGETS", "mode_point", "index", "costs", "choose_classical", "frontier_gains", "summary_table",
           "setup_table", "announced_table", "radius_variant", "radius_table", "read_prices", "frontier_plot"]

#: The kind of a budget run whose loop announces its length (``optimizer.total_steps``).
ANNOUNCED = "deepopt, length announced"
ANNOUNCE = "announce_length"

#: The budgets compared (``1`` is the default recipe at classical's epochs).
BUDGETS = (1.25, 1.5, 2.0)


def mode_point(mode: str) -> tuple[str, float] | None:
    """``("classical", b)`` or ``("deepopt", b)`` for the frontier's modes, else ``None``."""
    if mode == "classical":
        return "classical", 1.0
    if mode.startswith("classical-x"):
        try:
            return "classical", float(mode[len("classical-x"):])
        except ValueError:
            return None
    if mode == "deepopt":
        return "deepopt", 1.0
    if mode.startswith("deepopt:"):
        try:
            kwargs = json.loads(mode.split(":", 1)[1])
        except json.JSONDecodeError:
            return None
        if set(kwargs) == {"budget"}:
            return "deepopt", float(kwargs["budget"])
        if set(kwargs) <= {"budget", ANNOUNCE} and kwargs.get(ANNOUNCE):  # the loop announces its length
            return ANNOUNCED, float(kwargs.get("budget", 1.0))
    return None


def index(rows: list[dict]) -> dict[tuple[str, str, float], dict[int, dict[str, dict]]]:
    """``(setup, kind, b) -> {seed: {split: row}}``; the last row of a run wins."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        point = mode_point(r["mode"])
        if point is None or r.get("final") is None or r.get("trajectory", r["mode"]) != r["mode"]:
            continue
        out[(r["setup"], *point)][r["seed"]][r["split"]] = r
    return out


def _seconds(row: dict) -> float:
    return row.get("cpu_sec_per_step", row["sec_per_step"]) * row["steps"]


def costs(idx: dict, setup: str, kind: str, b: float) -> list[float]:
    """Per seed, the run's training CPU time over classical x1's on the same seed."""
    base = idx.get((setup, "classical", 1.0), {})
    runs = idx.get((setup, kind, b), {})
    return [_seconds(runs[s]["test"]) / _seconds(base[s]["test"]) for s in sorted(runs) if s in base]


def _better(row: dict) -> int:
    return 1 if row.get("higher_is_better", row.get("task") != "lm") else -1


def _mean(idx: dict, key: tuple, split: str) -> float | None:
    runs = idx.get(key, {})
    values = [r[split]["final"] for r in runs.values() if split in r]
    return statistics.fmean(values) if values else None


def choose_classical(idx: dict, setup: str, b: float) -> float:
    """The stretch (1 or ``b``) whose classical runs score better on the **validation** split."""
    base, longer = _mean(idx, (setup, "classical", 1.0), "val"), _mean(idx, (setup, "classical", b), "val")
    if longer is None or base is None:
        return 1.0
    sign = _better(next(iter(idx[(setup, "classical", 1.0)].values()))["val"])
    return b if sign * (longer - base) > 0 else 1.0


def _paired(idx: dict, a: tuple, ref: tuple, split: str = "test") -> list[float]:
    """Per seed, the improvement of runs ``a`` over runs ``ref`` (signed by the metric's direction)."""
    ra, rr = idx.get(a, {}), idx.get(ref, {})
    out = []
    for s in sorted(set(ra) & set(rr)):
        if split in ra[s] and split in rr[s]:
            out.append(_better(ra[s][split]) * (ra[s][split]["final"] - rr[s][split]["final"]))
    return out


def frontier_gains(rows: list[dict], b: float, kind: str = "deepopt") -> dict[str, dict]:
    """Per setup with deepopt at ``budget=b``: paired test gains vs classical x1 and vs the
    better (on validation) of x1 and x b, the chosen stretch, and the measured costs."""
    idx = index(rows)
    out = {}
    for setup in dict.fromkeys(r["setup"] for r in rows):
        if not idx.get((setup, kind, b)) or not idx.get((setup, "classical", 1.0)):
            continue
        chosen = choose_classical(idx, setup, b)
        first = next(iter(idx[(setup, "classical", 1.0)].values()))["test"]
        out[setup] = {
            "family": first["family"], "task": first["task"], "points": _better(first) > 0,
            "classical": _mean(idx, (setup, "classical", 1.0), "test"),
            "stretched": _mean(idx, (setup, "classical", b), "test"),
            "deepopt": _mean(idx, (setup, kind, b), "test"),
            "chosen": chosen,
            "vs_x1": _paired(idx, (setup, kind, b), (setup, "classical", 1.0)),
            "vs_best": _paired(idx, (setup, kind, b), (setup, "classical", chosen)),
            "stretch_gain": _paired(idx, (setup, "classical", b), (setup, "classical", 1.0)),
            "cost": costs(idx, setup, kind, b), "cost_stretched": costs(idx, setup, "classical", b),
        }
    return out


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return ""
    m, h = interval(values)
    mark = "" if h != h else (" ▲" if m - h > 0 else (" ▼" if m + h < 0 else ""))
    return (f"{m:+.{digits}f} ± {h:.{digits}f}" if h == h else f"{m:+.{digits}f}") + mark


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x" if values else ""


def summary_table(rows: list[dict], prices: dict[str, dict[str, float]] | None = None) -> str:
    """Per budget: mean gain over setups (in points) vs classical x1 and vs the better of
    x1 and x b (chosen on validation), setups won/lost, the measured costs (median over
    setups: of the runs' CPU time, and from the timed step prices, :func:`setup_table`)."""
    out = ["| deepopt budget | setups (seeds) | vs classical x1, equal epochs | vs better of x1 / x b "
           "(chosen on val) | won ▲ / lost ▼ vs better | classical x b vs x1 | cost deepopt: runs / timed steps "
           "| cost classical x b (runs) |", "|---|---|---|---|---|---|---|---|"]
    for b in (1.0, *BUDGETS):
        per = {s: g for s, g in frontier_gains(rows, b).items() if g["points"] and g["vs_x1"]}
        if not per:
            continue
        seeds = sorted({len(g["vs_x1"]) for g in per.values()})
        vs_x1 = [statistics.fmean(g["vs_x1"]) for g in per.values()]
        vs_best = [statistics.fmean(g["vs_best"]) for g in per.values() if g["vs_best"]]
        stretch = [statistics.fmean(g["stretch_gain"]) for g in per.values() if g["stretch_gain"]]
        won = sum(interval(g["vs_best"])[0] - interval(g["vs_best"])[1] > 0 for g in per.values() if g["vs_best"])
        lost = sum(interval(g["vs_best"])[0] + interval(g["vs_best"])[1] < 0 for g in per.values() if g["vs_best"])
        cost = [statistics.median(g["cost"]) for g in per.values() if g["cost"]]
        cost_s = [statistics.median(g["cost_stretched"]) for g in per.values() if g["cost_stretched"]]
        shares = _shares(rows, b)
        timed = [_timed(prices, setup, shares.get(setup)) for setup in per]
        timed = [t for t in timed if t is not None]
        out.append(f"| {b:g} | {len(per)} ({'-'.join(map(str, seeds))}) | {_fmt(vs_x1)} | "
                   f"{_fmt(vs_best) if b > 1 else ''} | {f'{won} / {lost}' if b > 1 else ''} | "
                   f"{_fmt(stretch) if b > 1 else ''} | {_median(cost)}{f' / {_median(timed)}' if timed else ''} | "
                   f"{_median(cost_s) if b > 1 else ''} |")
    return "\n".join(out)


def _timed(prices: dict[str, dict[str, float]] | None, setup: str, share: float | None) -> float | None:
    """A run's cost from the timed step prices: ``(1 - s) * one-pass + s * two-pass``."""
    price = (prices or {}).get(setup)
    if price is None or share is None:
        return None
    return (1 - share) * price["one"] + share * price["two"]


def setup_table(rows: list[dict], b: float, prices: dict[str, dict[str, float]] | None = None) -> str:
    """Per setup at budget ``b``: test means, the paired gains (95% interval over seeds) and costs.

    The cost of deepopt's run is given twice: its training CPU time over classical x1's on
    the same seed (median over seeds), and from the step prices timed in alternating blocks
    (``prices``, :func:`read_prices`) as ``(1 - s) * one-pass + s * two-pass``, ``s`` the
    share of its steps that took SAM's second pass (mean over seeds).
    """
    per = frontier_gains(rows, b)
    share = _shares(rows, b)
    head = (f"| setup | metric | classical x1 | classical x{b:g} | deepopt budget {b:g} | vs x1 (equal epochs) | "
            f"better of x1 / x{b:g} on val | vs that one | SAM share of steps | cost deepopt: run / timed steps "
            f"| cost classical x{b:g} |")
    out = [head, "|" + "---|" * 11]
    for setup, g in per.items():
        lm = not g["points"]
        unit, digits = ("bits/char", 3) if lm else ("R² %" if g["task"] == "regression" else "acc %", 2)
        s = share.get(setup)
        t = _timed(prices, setup, s)
        timed = "" if t is None else f" / {t:.2f}x"

        def val(x: float | None, digits: int = digits) -> str:
            return "" if x is None else f"{x:.{digits}f}"

        out.append(f"| {setup} | {unit}{' (lower better)' if lm else ''} | {val(g['classical'])} | "
                   f"{val(g['stretched'])} | {val(g['deepopt'])} | {_fmt(g['vs_x1'], digits)} | "
                   f"x{g['chosen']:g} | {_fmt(g['vs_best'], digits)} | {'' if s is None else f'{s:.0%}'} | "
                   f"{_median(g['cost'])}{timed} | {_median(g['cost_stretched'])} |")
    return "\n".join(out)


def _shares(rows: list[dict], b: float, kind: str = "deepopt") -> dict[str, float]:
    """Per setup, the mean share of deepopt's steps at budget ``b`` that took two passes."""
    idx = index(rows)
    return {setup: statistics.fmean(r["test"].get("two_pass_share", 0.0) for r in runs.values() if "test" in r)
            for (setup, k, bb), runs in idx.items() if k == kind and bb == b and runs}


def announced_table(rows: list[dict], prices: dict[str, dict[str, float]] | None = None) -> str:
    """Where the loop also announces its length (``optimizer.total_steps``): per setup and
    budget, the SAM share and the gain vs the better of classical x1 and x b, beside the
    loop as written."""
    out = ["| setup | budget | SAM share: as written / announced | vs better of x1 / x b: as written | "
           "announced | cost from timed steps: as written / announced |", "|---|---|---|---|---|---|"]
    for b in BUDGETS:
        plain, told = frontier_gains(rows, b), frontier_gains(rows, b, ANNOUNCED)
        s_plain, s_told = _shares(rows, b), _shares(rows, b, ANNOUNCED)
        for setup, g in told.items():
            digits = 2 if g["points"] else 3
            p = plain.get(setup, {})
            out.append(f"| {setup} | {b:g} | {s_plain.get(setup, float('nan')):.0%} / {s_told[setup]:.0%} | "
                       f"{_fmt(p.get('vs_best', []), digits)} | {_fmt(g['vs_best'], digits)} | "
                       f"{_cost_cell(prices, setup, s_plain.get(setup), p.get('cost', []))} / "
                       f"{_cost_cell(prices, setup, s_told.get(setup), g['cost'])} |")
    return "\n".join(out)


def _cost_cell(prices: dict | None, setup: str, share: float | None, runs: list[float]) -> str:
    """The timed cost where the step prices are known, else the runs' (marked ``run``)."""
    t = _timed(prices, setup, share)
    return f"{t:.2f}x" if t is not None else (f"{_median(runs)} run" if runs else "")


#: The radius screen's reference: ``budget=1.5`` as shipped; ``TOLD``: its loop announces the length.
REFERENCE, TOLD = "SAM rho 0.05 (budget=1.5)", ", length announced"


def radius_variant(mode: str) -> str | None:
    """The name of a ``BudgetSAM`` variant at budget 1.5 (another radius, no ramp, ASAM), else ``None``.

    Example:
        >>> radius_variant('deepopt:{"experimental":[{"class":"BudgetSAM","budget":1.5,"rho":0.1,"warmup":0}]}')
        'SAM rho 0.1, no ramp'
        >>> radius_variant('deepopt:{"experimental":[{"class":"TwoPassSAM","rho":0.05,"every":3}]}')
        'periodic SAM every 3 steps, rho 0.05'
        >>> radius_variant('deepopt:{"budget": 1.5}')
        'SAM rho 0.05 (budget=1.5)'
    """
    if not mode.startswith("deepopt:"):
        return None
    try:
        kwargs = json.loads(mode.split(":", 1)[1])
    except json.JSONDecodeError:
        return None
    told = TOLD if kwargs.pop(ANNOUNCE, False) else ""
    if kwargs == {"budget": 1.5}:
        return REFERENCE + told
    try:
        (sam,) = kwargs.pop("experimental")
    except (KeyError, ValueError, TypeError):
        return None
    if not kwargs and sam.get("class") == "TwoPassSAM" and sam.get("every", 1) > 1 and not sam.get("reuse"):
        return f"periodic SAM every {sam['every']} steps, rho {sam.get('rho', 0.05):g}" + told
    if kwargs or sam.get("class") != "BudgetSAM" or sam.get("budget") != 1.5:
        return None
    ramp = "" if sam.get("warmup", 1000) == 1000 else (", no ramp" if sam["warmup"] == 0 else f", ramp {sam['warmup']}")
    return f"{'ASAM' if sam.get('adaptive') else 'SAM'} rho {sam.get('rho', 0.05):g}{ramp}{told}"


def radius_table(rows: list[dict]) -> str:
    """The radius screen at budget 1.5: each variant's paired gain over ``budget=1.5`` as
    shipped (rho 0.05, 1,000-step ramp), mean over setups in points with its 95% interval, on
    the **validation** split (where a variant is chosen) and on **test** (where it is judged);
    the language model (bits per character saved) beside them."""
    idx: dict = {split: defaultdict(dict) for split in ("val", "test")}
    points: dict[str, bool] = {}
    for r in rows:
        name = radius_variant(r["mode"])
        if name is not None and r.get("final") is not None:
            idx[r["split"]][(r["setup"], name)][r["seed"]] = _better(r) * r["final"]
            points[r["setup"]] = _better(r) > 0
    names = sorted(n for n in {n for _, n in idx["val"]} if not n.startswith(REFERENCE))
    out = ["| variant (budget 1.5) | setups in points | val: gain vs rho 0.05 | val: won ▲ / lost ▼ | "
           "test: gain vs rho 0.05 | test: won ▲ / lost ▼ | LM bits/char saved: val / test |",
           "|---|---|---|---|---|---|---|"]
    for name in names:
        cells, lm = [], []
        for split in ("val", "test"):
            per = {}
            for (setup, n), runs in idx[split].items():
                base = idx[split].get((setup, REFERENCE + (TOLD if name.endswith(TOLD) else "")), {})
                if n == name and set(runs) & set(base):
                    per[setup] = [runs[k] - base[k] for k in sorted(set(runs) & set(base))]
            cis = [interval(v) for s, v in per.items() if points[s]]
            won, lost = sum(m - h > 0 for m, h in cis), sum(m + h < 0 for m, h in cis)
            cells.append((len(cis), _fmt([statistics.fmean(v) for s, v in per.items() if points[s]]),
                          f"{won} / {lost}"))
            lm.append(next((_fmt(v, 4) for s, v in per.items() if not points[s]), ""))
        out.append(f"| {name} | {cells[0][0]} | {cells[0][1]} | {cells[0][2]} | {cells[1][1]} | {cells[1][2]} | "
                   f"{' / '.join(lm) if any(lm) else ''} |")
    return "\n".join(out)


def read_prices(path: Path) -> dict[str, dict[str, float]]:
    """Per setup, the one-pass (``deepopt``) and two-pass (budget 2) step's CPU time over
    classical's, from ``python -m benchmarks zoo --cost`` rows (alternating blocks)."""
    out: dict[str, dict[str, float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if "ratio_two_pass" in r:
                    out[r["setup"]] = {"one": r["ratio_one_pass"], "two": r["ratio_two_pass"]}
    return out


def frontier_plot(rows: list[dict], out: Path, prices: dict[str, dict[str, float]] | None = None) -> Path:
    """Test metric (mean over seeds, 95% interval) against cost, one panel per setup.

    Classical x b sits at ``b`` (b times the steps); deepopt at its cost from the timed step
    prices (:func:`read_prices`) and its share of two-pass steps, or, without prices, at its
    runs' CPU time over classical x1's (noisy where runs shared the machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = index(rows)
    setups = [s for s in dict.fromkeys(r["setup"] for r in rows) if (s, "classical", 1.0) in idx]
    family = {s: next(iter(idx[(s, "classical", 1.0)].values()))["test"]["family"] for s in setups}
    setups.sort(key=lambda s: (family[s], s))
    cols = min(4, len(setups)) or 1
    nrows = -(-len(setups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False)
    for ax, setup in zip(axes.flat, setups):
        first = next(iter(idx[(setup, "classical", 1.0)].values()))["test"]
        for i, kind in enumerate(("classical", "deepopt", ANNOUNCED)):
            points = sorted(b for (s, k, b) in idx if s == setup and k == kind)
            xs, ys, es, bs = [], [], [], []
            for b in points:
                runs = idx[(setup, kind, b)]
                c = costs(idx, setup, kind, b)
                values = [r["test"]["final"] for r in runs.values() if "test" in r]
                if not c or not values:
                    continue
                m, h = interval(values)
                timed = None if kind == "classical" else _timed(prices, setup, _shares(rows, b, kind).get(setup))
                xs.append(b if kind == "classical" else timed if timed is not None else statistics.fmean(c))
                ys.append(m)
                es.append(0 if h != h else h)
                bs.append(b)
            label = {"classical": "classical x1, x1.25, x1.5, x2", "deepopt": "deepopt budget 1, 1.25, 1.5, 2",
                     ANNOUNCED: "deepopt budget 1.25, 1.5, 2, the loop announcing its length"}[kind]
            if not xs:
                continue
            ax.errorbar(xs, ys, yerr=es, fmt="-o", color=f"C{i}", ms=4, capsize=2, lw=1.2, label=label)
            for x, y, b in zip(xs, ys, bs):  # x1.5 (classical) or b1.5 (deepopt) beside each point
                ax.annotate(f"{'x' if kind == 'classical' else 'b'}{b:g}", (x, y), textcoords="offset points",
                            xytext=(3, 3 if kind == "classical" else -8), fontsize=6, color=f"C{i}")
        unit = "bits/char (lower better)" if not _better(first) > 0 else (
            "R² %" if first["task"] == "regression" else "accuracy %")
        ax.set_title(f"{family[setup]}\n{setup}", fontsize=8)
        ax.set_xlabel("cost (x classical x1)" if prices else "measured cost (CPU time / classical x1)", fontsize=7)
        ax.set_ylabel(f"test {unit}", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(lw=0.3, alpha=0.5)
    for ax in list(axes.flat)[len(setups):]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Compute frontier: classical trained longer vs deepopt's budget (test split, mean ± 95% CI over seeds;"
                 + (" cost: classical x b = b, deepopt from timed step prices)" if prices else " cost: measured)"),
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
