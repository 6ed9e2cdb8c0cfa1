"""Seed nets at equal compute: deepopt against classical trained longer (issue 42, part 2).

Reads the classical runs at 20 epochs and ``recipe="thorough"`` (SAM in the low-LR tail,
about 1.75x per epoch under the seed's drops) from ``machines/seed6-epyc-avx2.jsonl``, and
classical stretched to 25/30/40 epochs (drops at 30/60/80% of the new length) from
``budget/seed6-stretched.jsonl``; prints final-epoch test accuracy per net, mean over the
seeds both have, and each deepopt seed against the best classical run of that seed at no
more than its compute.

Run: python -m benchmarks.scripts.stretched
Rows: python -m benchmarks seed6 --data ../shared/data/cifar10-jpeg.tar --nets 6 5 --epochs 30
      --seeds 0 1 2 --modes classical --threads 1 --out benchmarks/results/budget/seed6-stretched.jsonl
      (and --epochs 40, 25)
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
THOROUGH_COST = 1.75  # SAM on the last 70% of the steps (after the first drop), two passes each


def rows() -> dict:
    table: dict = defaultdict(dict)
    for name in ("machines/seed6-epyc-avx2.jsonl", "budget/seed6-stretched.jsonl"):
        for line in (RESULTS / name).read_text().splitlines():
            r = json.loads(line)
            if r["mode"] in ("classical", "deepopt-thorough") and (r["mode"] == "classical" or r["epochs"] == 20):
                cost = r["epochs"] / 20 * (THOROUGH_COST if r["mode"] != "classical" else 1)
                label = f"{r['mode']} x{r['epochs'] / 20:g}" if r["mode"] == "classical" else f"thorough ~{cost:g}x"
                table[(r["net"], label, cost)][r["seed"]] = r["final_test_acc"]
    return table


def main() -> None:
    table = rows()
    for net in sorted({k[0] for k in table}, reverse=True):
        runs = {k: v for k, v in table.items() if k[0] == net and (k[2] <= 2 or "classical" not in k[1])}
        print(f"net {net} (20-epoch protocol; final test %, mean over seeds)")
        for (_, label, cost), by_seed in sorted(runs.items(), key=lambda kv: kv[0][2]):
            print(f"  {label:<18} cost {cost:4.2f}x  {statistics.mean(by_seed.values()):6.2f}  "
                  f"seeds {dict(sorted(by_seed.items()))}")
        deep = next((v for k, v in runs.items() if "thorough" in k[1]), {})
        gains = []
        for seed, acc in deep.items():
            best = max((v[seed] for k, v in runs.items() if "classical" in k[1] and seed in v
                        and k[2] <= 2), default=None)
            if best is not None:
                gains.append(acc - best)
        if gains:
            print(f"  thorough - best classical of the same seed up to 2x: {statistics.mean(gains):+.2f} "
                  f"(seeds: {', '.join(f'{g:+.2f}' for g in gains)})")


if __name__ == "__main__":
    main()
