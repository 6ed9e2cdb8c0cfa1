"""``python -m benchmarks mnist1d``: mechanisms across architecture families, in minutes.

For every network (MLP, CNN, GRU, the plain 20-layer ``deep`` net) and every settings
dict, :func:`deepopt.demo.run_demo` trains the classical/activated pair on each seed
(same init, same data order) and one JSON row per (net, settings, split) is appended to
the results file; a restart skips the rows already there. ``--validation`` evaluates on
the last 20% of the training set, so settings are chosen without the test set.

Example (shell)::

    python -m benchmarks mnist1d --nets mlp cnn gru --num-seeds 5 --settings '{}' '{"noise": 0.1}'
    python -m benchmarks report benchmarks/results/mnist1d.jsonl --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

__all__ = ["row_key", "main"]


def row_key(row: dict) -> tuple:
    """What identifies a finished row: net, settings, split, seeds and epochs."""
    return (row["net"], json.dumps(row["settings"], sort_keys=True), row["split"],
            tuple(row["seeds"]), row["epochs"])


def _row(result: dict, settings: dict, split: str) -> dict:
    cfg = result["config"]
    finals = {k: [s[k]["test_acc"][-1] for s in result["seeds"]] for k in ("classical", "deepopt")}
    times = {k: sum(sum(s[k]["epoch_seconds"]) for s in result["seeds"]) for k in finals}
    return {
        "suite": "mnist1d", "net": cfg["net"], "settings": settings, "split": split,
        "seeds": cfg["seeds"], "epochs": cfg["epochs"], "lr": cfg["optimizer"]["lr"],
        "final_classical": finals["classical"], "final_deepopt": finals["deepopt"],
        "max_classical": [max(s["classical"]["test_acc"]) for s in result["seeds"]],
        "max_deepopt": [max(s["deepopt"]["test_acc"]) for s in result["seeds"]],
        "time_ratio": times["deepopt"] / times["classical"] if times["classical"] else None,
        "torch": cfg["torch_version"], "deepopt": cfg["deepopt_version"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the suite, skipping rows already in the results file."""
    from deepopt.demo import DEFAULT_EPOCHS, NETS, add_seeds_is_a_list, run_demo

    p = argparse.ArgumentParser(
        prog="python -m benchmarks mnist1d",
        description="MNIST-1D classical/activated pairs (same init and data order per seed) for each "
        "network and settings dict, in minutes; one JSON row per (net, settings, split) is appended "
        "to --out, and rows already there are skipped.",
        epilog="example: python -m benchmarks mnist1d --nets mlp cnn --num-seeds 5 --settings '{}' "
        "'{\"noise\": 0.1}'",
    )
    p.add_argument("--nets", nargs="+", choices=NETS, default=["mlp", "cnn", "gru"],
                   help="networks, as in deepopt demo --net (default: mlp cnn gru)")
    p.add_argument("--num-seeds", dest="seeds", type=int, default=5, metavar="N",
                   help="number of seeds, 0..N-1 (default: 5)")
    add_seeds_is_a_list(p)
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default: the demo's per net: " + ", ".join(
                       f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()) + ")")
    p.add_argument("--settings", nargs="+", default=["{}"],
                   help='JSON dicts of deepopt settings, e.g. \'{"noise": 0.1}\' (recipe "default")')
    p.add_argument("--validation", action="store_true",
                   help="evaluate on the last 20%% of the training set, not the test set")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default benchmarks/results/mnist1d[-val].jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    split = "validation" if args.validation else "test"
    out = args.out or Path(f"benchmarks/results/mnist1d{'-val' if args.validation else ''}.jsonl")
    from deepopt.experimental import legacy_kwargs
    from deepopt.recipes import resolve

    try:
        settings_list = [json.loads(t) for t in args.settings]
        if not all(isinstance(d, dict) for d in settings_list):
            raise ValueError("a value is not a JSON object")
        for d in settings_list:  # refuse a bad name or value before hours of training
            kw = legacy_kwargs(d)
            kw.pop("mechanisms", None)
            resolve(kw.pop("recipe", "default"), kw)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        p.error(f"--settings takes JSON objects of deepopt settings, e.g. '{{\"noise\": 0.1}}': {e}")
    done = set()
    if out.exists():
        done = {row_key(json.loads(line)) for line in out.open() if line.strip()}
    out.parent.mkdir(parents=True, exist_ok=True)
    for net in args.nets:
        epochs = args.epochs or DEFAULT_EPOCHS[net]
        for settings in settings_list:
            probe = {"net": net, "settings": settings, "split": split,
                     "seeds": list(range(args.seeds)), "epochs": epochs}
            if row_key(probe) in done:
                continue
            result = run_demo(net=net, epochs=epochs, seeds=args.seeds, overrides=settings,
                              progress=not args.no_progress, validation=args.validation)
            row = _row(result, settings, split)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            diff = statistics.fmean(d - c for c, d in zip(row["final_classical"], row["final_deepopt"]))
            print(f"{net} {json.dumps(settings)} ({split}): classical "
                  f"{statistics.fmean(row['final_classical']):.2f}, deepopt "
                  f"{statistics.fmean(row['final_deepopt']):.2f}, diff {diff:+.2f}", flush=True)
    return 0
