"""Seed nets at equal compute: deepopt's budgets against classical trained longer (issue 42).

For seed nets 6 and 5 (20-epoch protocol, final-epoch test accuracy, 3 seeds, one thread)
this reads classical at 20 epochs and the former ``thorough`` (SAM after the first LR drop,
about 1.7x) from ``machines/seed6-epyc-avx2.jsonl``; classical stretched to 25/30/40 epochs
(drops at 30/60/80% of the new length) from ``budget/seed6-stretched.jsonl``; and
``budget=1.25/1.5/2`` from ``budget/seed6-budget.jsonl``. It prints, per net, each run's
cost — the forward/backward passes against classical x1 (epochs, and the second pass of
each two-pass step counted from the row) and the CPU seconds per epoch against classical
x1 of the same seed times the epochs (noisy where runs shared the machine) — its mean accuracy, and each budget ``b``
against **the better of classical x1 and classical x b** on each seed (paired), beside the
gain at equal epochs. It draws the frontier (accuracy against passes) to
``benchmarks/plots/frontier-seed6.png``.

Run: python -m benchmarks.scripts.stretched
Rows: python -m benchmarks seed6 --data ../shared/data/cifar10-jpeg.tar --nets 6 5 --epochs 30
      --seeds 0 1 2 --modes classical --threads 1 --out benchmarks/results/budget/seed6-stretched.jsonl
      (and --epochs 40, 25);
      python -m benchmarks seed6 --data ../shared/data/cifar10-jpeg.tar --nets 6 5 --epochs 20
      --seeds 0 1 2 --modes deepopt-budget-1.25 deepopt-budget-1.5 deepopt-budget-2 --threads 1
      --out benchmarks/results/budget/seed6-budget.jsonl
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
FILES = ("machines/seed6-epyc-avx2.jsonl", "budget/seed6-stretched.jsonl", "budget/seed6-budget.jsonl")
EPOCHS = 20
THOROUGH_PASSES = 1.7  # its rows predate two_pass_steps: SAM on the 14 epochs after the drop at 6
BUDGETS = {"deepopt-budget-1.25": 1.25, "deepopt-budget-1.5": 1.5, "deepopt-budget-2": 2.0,
           "deepopt-thorough": THOROUGH_PASSES}  # the former thorough: no set budget


def load() -> dict[tuple[int, str], dict[int, dict]]:
    """``(net, label) -> seed -> row`` for the runs this comparison reads (the last row wins)."""
    table: dict = defaultdict(dict)
    for name in FILES:
        path = RESULTS / name
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["net"] not in (5, 6):
                continue
            if r["mode"] == "classical" and r["epochs"] <= 2 * EPOCHS:
                table[(r["net"], f"classical x{r['epochs'] / EPOCHS:g}")][r["seed"]] = r
            elif r["mode"] in BUDGETS and r["epochs"] == EPOCHS:
                label = "former thorough" if r["mode"] == "deepopt-thorough" else f"budget {BUDGETS[r['mode']]:g}"
                table[(r["net"], label)][r["seed"]] = r
    return table


def measured_cost(row: dict, base: dict | None) -> float | None:
    """CPU time per epoch against classical x1's of the same seed, times the epoch ratio."""
    cpu, ref = row.get("cpu_sec_per_epoch"), (base or {}).get("cpu_sec_per_epoch")
    return None if not cpu or not ref else cpu / ref * row["epochs"] / EPOCHS


def summary(net: int, table: dict) -> list[dict]:
    """One dict per run label of ``net``: mean accuracy, costs and paired gains."""
    base = table.get((net, "classical x1"), {})
    out = []
    for (n, label), by_seed in table.items():
        if n != net:
            continue
        costs = [c for s, r in by_seed.items() if (c := measured_cost(r, base.get(s))) is not None]
        passes = [r["epochs"] / EPOCHS * (1 + r["two_pass_steps"] / r["steps"]) if r.get("steps")
                  else r["epochs"] / EPOCHS for r in by_seed.values() if r["mode"] == "classical" or r.get("steps")]
        nominal = (by_seed[next(iter(by_seed))]["epochs"] / EPOCHS if label.startswith("classical")
                   else float(label.split()[-1]) if label.startswith("budget") else THOROUGH_PASSES)
        entry = {"label": label, "nominal": nominal, "acc": statistics.mean(r["final_test_acc"] for r in by_seed.values()),
                 "seeds": {s: r["final_test_acc"] for s, r in sorted(by_seed.items())},
                 "cost": statistics.mean(costs) if costs else None,
                 "passes": statistics.mean(passes) if passes else None}
        if not label.startswith("classical"):
            stretched = table.get((net, f"classical x{nominal:g}"), {})
            entry["vs_equal_epochs"] = [r["final_test_acc"] - base[s]["final_test_acc"]
                                        for s, r in by_seed.items() if s in base]
            entry["vs_better"] = [r["final_test_acc"] - max(base[s]["final_test_acc"],
                                                            stretched.get(s, base[s])["final_test_acc"])
                                  for s, r in by_seed.items() if s in base]
            entry["stretched_known"] = bool(stretched)
            longer = [v for (n2, lab), v in table.items() if n2 == net and lab.startswith("classical")]
            entry["vs_best"] = [r["final_test_acc"] - max(v[s]["final_test_acc"] for v in longer if s in v)
                                for s, r in by_seed.items() if s in base]
            price = step_prices(net)
            if price and entry["passes"] is not None:  # timed per-step prices x the measured share
                share = entry["passes"] - 1.0
                entry["priced"] = (1 - share) * price["default"] + share * price["two_pass"]
        out.append(entry)
    return sorted(out, key=lambda e: (e["nominal"], not e["label"].startswith("classical")))


def step_prices(net: int) -> dict[str, float] | None:
    """CPU cost per step against classical, timed in alternating blocks in one process: a
    two-pass step's (median of the ``budget/step-cost.jsonl`` rows, ``budget=2.25``) and a
    default step's (the longest such timing of the default recipe, ``overhead.jsonl``, 8,000
    steps: short timings of a 7 ms step on a shared machine ranged 0.79-1.54x)."""
    two_pass, default = [], {}
    path = RESULTS / "budget" / "step-cost.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        if r.get("net") == net and r["settings"].get("budget"):
            two_pass.append(r["ratio"])
    for line in (RESULTS / "overhead.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("net") == net and r["settings"] in ({"recipe": "default"}, {}) and r["steps"] >= default.get("steps", 0):
            default = r
    if not two_pass or not default:
        return None
    return {"default": default["ratio"], "two_pass": statistics.median(two_pass)}


def _fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):+.2f} ({', '.join(f'{v:+.2f}' for v in values)})" if values else "-"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = sorted({n for n, _ in table}, reverse=True)
    fig, axes = plt.subplots(1, len(nets), figsize=(5.2 * len(nets), 3.8))
    for ax, net in zip(axes if len(nets) > 1 else [axes], nets):
        entries = summary(net, table)
        classical = [e for e in entries if e["label"].startswith("classical")]
        deep = [e for e in entries if not e["label"].startswith("classical")]
        ax.plot([e["passes"] or e["nominal"] for e in classical], [e["acc"] for e in classical], "o-",
                color="0.4", label="classical, trained longer")
        for e in classical:
            ax.annotate(e["label"].split()[-1], ((e["passes"] or e["nominal"]), e["acc"]), fontsize=8,
                        textcoords="offset points", xytext=(4, -10))
        for e in deep:
            ax.plot(e["passes"] or e["nominal"], e["acc"], "s" if e["label"].startswith("budget") else "^",
                    color="C0" if e["label"].startswith("budget") else "C1", ms=7)
            ax.annotate(e["label"], ((e["passes"] or e["nominal"]), e["acc"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_title(f"seed net {net}, 20-epoch protocol, 3 seeds")
        ax.set_xlabel("cost: forward/backward passes vs classical x1")
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
    axes_first = axes[0] if len(nets) > 1 else axes
    axes_first.plot([], [], "s", color="C0", label="deepopt budget")
    axes_first.plot([], [], "^", color="C1", label="former thorough")
    axes_first.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    table = load()
    for net in sorted({n for n, _ in table}, reverse=True):
        print(f"net {net} (20-epoch protocol; final test %, mean over seeds; passes: forward/backward passes "
              "vs classical x1; cpu: measured CPU time vs classical x1, noisy on a shared machine)")
        for e in summary(net, table):
            cpu = "  -  " if e["cost"] is None else f"{e['cost']:4.2f}x"
            passes = f"~{e['nominal']:g}x " if e["passes"] is None else f"{e['passes']:4.2f}x"
            priced = f"  priced {e['priced']:4.2f}x" if "priced" in e else ""
            line = f"  {e['label']:<16} passes {passes}  cpu {cpu}{priced}  {e['acc']:6.2f}"
            if "vs_better" in e:
                other = f"x{e['nominal']:g}" if e["stretched_known"] else "x1 (x{:g} not run)".format(e["nominal"])
                line += (f"\n      vs classical x1: {_fmt(e['vs_equal_epochs'])};  vs better of x1 and {other}: "
                         f"{_fmt(e['vs_better'])};  vs best classical up to 2x: {_fmt(e['vs_best'])}")
            else:
                line += f"  seeds {e['seeds']}"
            print(line)
    plot(table, ROOT / "plots" / "frontier-seed6.png")
    print("wrote benchmarks/plots/frontier-seed6.png")


if __name__ == "__main__":
    main()
