"""``python -m benchmarks``: the lab's command; seed6 and the mechanism ablation, resumable.

``overhead``, ``mnist1d``, ``zoo`` and ``report`` are handed the rest of the command
line by :func:`main` (their options live in their own modules); ``seed6`` and
``ablation`` are run here.

Every finished run appends one JSON line to its results file; a restart skips the
runs already there, so a benchmark accumulates across sessions. The same command started
twice (e.g. ``--threads 1`` each on a 2-core machine) shares the work: each run is
claimed with a file lock (``fcntl.flock``, released by the OS when its process dies), and
a process skips the runs another one holds or has finished.

Example (shell)::

    python -m benchmarks ablation --data ../shared/data/cifar10-jpeg.tar --nets 6 5 \\
        --mechanisms classical msam-0.03 --seeds 0 1 2
    python -m benchmarks seed6 --data ../shared/data/cifar10-jpeg.tar --nets 1 5 6 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import textwrap
from collections.abc import Collection, Iterator
from pathlib import Path

from .train import MODES, trained_epochs

try:
    import fcntl
except ImportError:  # Windows: no flock; one process per results file there
    fcntl = None

__all__ = ["MECHANISMS", "SEED6_MODES", "main"]

#: Ablation candidates: name -> keyword arguments of ``deepopt.activate`` (None = classical).
#: ``closure: True`` makes the loop call ``optimizer.step(closure)`` (two-pass SAM).
MECHANISMS: dict[str, dict | None] = {
    "classical": None,
    "safe": {"recipe": "safe"},
    "msam-0.01": {"rho": 0.01},
    "msam-0.03": {"rho": 0.03},
    "msam-0.1": {"rho": 0.1},
    "msam-0.3": {"rho": 0.3},
    "msam-0.1-lr": {"rho": 0.1, "rho_follows_lr": True},
    "msam-0.3-lr": {"rho": 0.3, "rho_follows_lr": True},
    "amsam-0.5": {"rho": 0.5, "adaptive": True},
    "up-0.05": {"rho": 0.05, "ascent": True},
    "up-0.2": {"rho": 0.2, "ascent": True},
    "up-0.5": {"rho": 0.5, "ascent": True},
    "amsam-2-lr": {"rho": 2.0, "adaptive": True, "rho_follows_lr": True},
    "lookahead-5": {"lookahead_k": 5, "lookahead_alpha": 0.5},
    "lookahead-10-0.8": {"lookahead_k": 10, "lookahead_alpha": 0.8},
    "ema-0.999": {"average": "ema", "ema_decay": 0.999},
    "ema-0.99": {"average": "ema", "ema_decay": 0.99},
    "phase": {"average": "phase"},
    "ema-0.999-restart": {"average": "ema", "ema_decay": 0.999, "average_restart": True},
    "phase-restart": {"average": "phase", "average_restart": True},
    "noise-0.05": {"noise": 0.05},
    "noise-0.1": {"noise": 0.1},
    "noise-0.2": {"noise": 0.2},
    "noise-0.4": {"noise": 0.4},
    "looksam-5": {"recipe": "thorough", "sam_rho": 0.05, "sam_every": 5, "closure": True},
    "looksam-5-0.1": {"recipe": "thorough", "sam_rho": 0.1, "sam_every": 5, "closure": True},
    "sam-0.05": {"recipe": "thorough", "sam_rho": 0.05, "closure": True},
    "sam-0.02": {"recipe": "thorough", "sam_rho": 0.02, "closure": True},
    "sam-0.05-warm": {"recipe": "thorough", "sam_rho": 0.05, "sam_warmup": 1000, "closure": True},
    # SAM only until the first LR drop (cost ~1.3x under the 30/60/80% schedule)
    "sam-0.05-warm-high": {"recipe": "thorough", "sam_lr_fraction": 1.0, "closure": True},
    # SAM late only: after the 2nd / the 3rd LR drop (~1.4x / ~1.2x under 30/60/80%)
    "sam-0.05-late-0.05": {"recipe": "thorough", "sam_lr_ceiling": 0.05, "closure": True},
    "sam-0.05-late-0.005": {"recipe": "thorough", "sam_lr_ceiling": 0.005, "closure": True},
    # SAM in the second LR phase only (lr / max lr = 0.1; ~1.4x measured under 30/60/80%)
    "sam-0.05-mid": {"recipe": "thorough", "sam_lr_fraction": 0.05, "sam_lr_ceiling": 0.5, "closure": True},
    # periodic SAM: two passes every k-th step, plain gradient between (cost 1 + 1/k)
    "psam-10": {"recipe": "thorough", "sam_every": 10, "sam_reuse": 0.0, "closure": True},
    "psam-10-0.15": {"recipe": "thorough", "sam_rho": 0.15, "sam_every": 10, "sam_reuse": 0.0, "closure": True},
    "psam-3": {"recipe": "thorough", "sam_every": 3, "sam_reuse": 0.0, "closure": True},
    "default": {"recipe": "default"},
    "thorough": {"recipe": "thorough", "closure": True},
}

#: seed6 modes: deepopt's recipes and the peers a user would pick instead, plus SAM at the
#: wall-clock of the 1x-cost deepopt run (what each does: ``benchmarks.train.MODES``).
SEED6_MODES = tuple(MODES)

_SHARING = (
    "Each finished run appends one JSON line to the results file, and each run checkpoints "
    "after every epoch in ~/.cache/deepopt/partial/ ($DEEPOPT_CACHE): a restart skips "
    "finished runs and resumes an unfinished one from its last epoch, bit for bit. On a "
    "2-core machine start the same command twice with --threads 1: the two processes share "
    "its runs (one file lock per run)."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description="deepopt's benchmarks, each resumable: "
        "overhead (cost per step), mnist1d (MNIST-1D pairs, minutes), zoo (the setups users run), "
        "ablation (one mechanism per run on the seed's CIFAR-10 nets) and seed6 (the seed's "
        "six-network benchmark); report writes BENCHMARKS.md's tables and plots from their rows. "
        "'python -m benchmarks NAME --help' lists a command's options. Run from the repository's "
        "root, after pip install -e '.[bench]'.")
    sub = p.add_subparsers(dest="suite", required=True)
    sub.add_parser("overhead", help="per-step CPU cost of recipes vs classical -> overhead.jsonl "
                   "(options: python -m benchmarks overhead --help)")
    sub.add_parser("mnist1d", help="MNIST-1D classical/activated pairs for MLP, CNN, GRU -> "
                   "mnist1d.jsonl (options: python -m benchmarks mnist1d --help)")
    sub.add_parser("zoo", help="the setups users run (schedules, optimizers, nets, losses), paired "
                   "by seed -> zoo.jsonl (options: python -m benchmarks zoo --help)")
    sub.add_parser("report", help="tables and plots from results files, printed or written into a "
                   "Markdown file (options: python -m benchmarks report --help)")
    for name, help_, description in (
        ("ablation", "mechanism ablation -> ablation.jsonl",
         "Train seed6 nets under the protocol with one candidate mechanism each (--mechanisms), "
         "to find out which ones raise test accuracy; --validation chooses settings without "
         "the test set."),
        ("seed6", "the seed's six-network benchmark -> seed6.jsonl",
         "The seed's benchmark (protocol/seed6.md): CIFAR-10, per-image standardization, no "
         "augmentation, SGD momentum 0.9, weight decay 5e-4, batch 64, LR 1e-2 divided by 10 "
         "at 30/60/80% of the budget; classical, deepopt's recipes and the peers a user would "
         "pick instead, on the same seeds and data order. Seeds are the outermost loop."),
    ):
        s = sub.add_parser(
            name, help=help_, description=textwrap.fill(description, 88),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=textwrap.fill(_SHARING, 88) + f"\n\nexample:\n  python -m benchmarks {name} --data "
            "../shared/data/cifar10-jpeg.tar --nets 6 --seeds 0 1 --threads 1",
        )
        s.add_argument(
            "--data",
            required=True,
            help="CIFAR-10: the tar, an ImageFolder dir or cifar-10-batches-py (decoded once, cached); required",
        )
        s.add_argument(
            "--nets", type=int, nargs="+", default=[6, 5, 1], help="seed6 net numbers (1-6). Default: %(default)s"
        )
        s.add_argument(
            "--seeds", type=int, nargs="+", default=[0, 1, 2],
            help="seeds: each fixes the initial weights and the data order of all its runs. "
            "Default: %(default)s",
        )
        s.add_argument(
            "--epochs", type=int, default=20, help="epoch budget (LR drops at 30/60/80%%). Default: %(default)s"
        )
        s.add_argument("--threads", type=int, default=2, help="torch threads of this process. Default: %(default)s")
        s.add_argument(
            "--out",
            type=Path,
            default=None,
            help=f"results file, one JSON line per finished run. Default: benchmarks/results/{name}.jsonl",
        )
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.add_argument(
            "--status", action="store_true",
            help="train nothing: list each run of this command as done (its final and max test "
            "accuracy), running in another process or paused (epochs done so far), or pending, "
            "with the hours of training each unfinished run has left, judged from the s/epoch of "
            "the finished rows (those of the same --threads first)",
        )
        if name == "ablation":
            s.add_argument(
                "--validation",
                action="store_true",
                help="train on 45,000 images and evaluate on 5,000 held-out training images "
                "(for choosing settings; results go to ablation-val.jsonl unless --out)",
            )
            s.add_argument(
                "--mechanisms",
                nargs="+",
                default=["classical", "default"],
                choices=sorted(MECHANISMS),
                metavar="NAME",
                help="candidates to run (names and settings: MECHANISMS in benchmarks.runner): "
                + ", ".join(sorted(MECHANISMS)) + ". Default: %(default)s",
            )
        else:
            s.add_argument(
                "--modes",
                nargs="+",
                default=list(SEED6_MODES),
                choices=SEED6_MODES,
                metavar="MODE",
                help="modes to run: " + "; ".join(f"{m} = {t}" for m, t in MODES.items()).replace("%", "%%")
                + ". Default: all",
            )
    return p


@contextlib.contextmanager
def claimed(lock: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking file lock on ``lock`` for the ``with`` block.

    Yields False, holding nothing, if another process holds it. The OS releases the lock
    when its holder dies, so a killed run is free to be resumed at once. The file is
    removed on leaving the block: a process that still acquires the removed file finds
    the run in the results file (re-read after claiming) and skips it.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> lock = Path(tempfile.mkdtemp()) / "run.lock"
        >>> with claimed(lock) as mine:
        ...     with claimed(lock) as theirs:
        ...         (mine, theirs)
        (True, False)
    """
    if fcntl is None:
        yield True
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Run the requested suite, skipping runs already in the results file."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["overhead"]:  # per-step cost, its own options
        from .overhead import main as overhead_main

        return overhead_main(argv[1:])
    if argv[:1] == ["mnist1d"]:  # MNIST-1D pairs across architectures, its own options
        from .mnist1d import main as mnist1d_main

        return mnist1d_main(argv[1:])
    if argv[:1] == ["zoo"]:  # the setups users run, its own options
        from .zoo import main as zoo_main

        return zoo_main(argv[1:])
    if argv[:1] == ["report"]:  # the tables and plots, its own options
        from .report import main as report_main

        return report_main(argv[1:])
    args = _parser().parse_args(argv)
    import torch

    from .data import load_cifar10, validation_split
    from .train import append_row, finished

    held_out = getattr(args, "validation", False)
    if args.out is None:
        args.out = Path(f"benchmarks/results/{args.suite}{'-val' if held_out else ''}.jsonl")
    if args.status:
        return _print_status(args)
    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data)
    if held_out:
        data = validation_split(data)
    done = finished(args.out)
    for net, mode, seed in _planned(args):
        # finished() keys a run by its budget, also for sam-equal-time, whose row
        # trains half the epochs and records the budget as budget_of.
        if (net, mode, seed, args.epochs) in done:
            continue
        partial = _partial(args, net, mode, seed)
        with claimed(partial.with_suffix(".lock")) as mine:
            if not mine:
                print(f"net {net} {mode} seed {seed}: running in another process, skipped",
                      flush=True)
                continue
            if args.out.exists() and (net, mode, seed, args.epochs) in finished(args.out):
                continue  # finished by another process since this one started
            row = _run_one(args, net, mode, seed, data, partial)
            append_row(args.out, row)
            partial.unlink(missing_ok=True)
        print(
            f"net {net} {mode:>18} seed {seed}: final {row['final_test_acc']:.2f} "
            f"max {row['max_test_acc']:.2f} ({row['sec_per_epoch']:.1f} s/epoch)",
            flush=True,
        )
    return 0


def _planned(args: argparse.Namespace) -> Iterator[tuple[int, str, int]]:
    """The ``(net, mode, seed)`` of every run of the command, in the order they run."""
    modes = args.mechanisms if args.suite == "ablation" else args.modes
    for seed in args.seeds:  # seeds outermost: one seed of everything first
        for net in args.nets:
            for mode in modes:
                yield net, mode, seed


def _partial(args: argparse.Namespace, net: int, mode: str, seed: int) -> Path:
    """The checkpoint a run writes after each epoch and resumes from (bit-identically).

    Kept in the cache, outside the work tree, so that a later session resumes it."""
    from .data import cache_dir

    return cache_dir() / "partial" / f"{args.out.stem}-net{net}-{mode}-s{seed}-e{args.epochs}.pt"


def _held_elsewhere(lock: Path) -> bool:
    """Whether another process holds ``lock`` now (without creating or removing it)."""
    if fcntl is None or not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _print_status(args: argparse.Namespace) -> int:
    """``--status``: where each run of the command stands, without training or loading data,
    and how long the unfinished ones will take (:func:`_epoch_seconds`)."""
    import torch

    from .train import finished_rows

    done = finished_rows(args.out)
    counts = dict.fromkeys(("done", "running", "paused", "pending"), 0)
    left, unknown = 0.0, 0
    for net, mode, seed in _planned(args):
        key = (net, mode, seed, args.epochs)
        partial = _partial(args, net, mode, seed)
        if key in done:
            state = "done"
            r = done[key]
            detail = f"final {r['final_test_acc']:.2f}, max {r['max_test_acc']:.2f}"
        else:
            epochs = len(torch.load(partial, weights_only=False)["test_acc"]) if partial.exists() else 0
            running = _held_elsewhere(partial.with_suffix(".lock"))
            state = "running" if running else "paused" if epochs else "pending"
            detail = f"{epochs}/{trained_epochs(mode, args.epochs)} epochs" if running or epochs else ""
            per_epoch = _epoch_seconds(done.values(), net, mode, args.threads)
            if per_epoch is None:
                unknown += 1
            else:
                seconds = per_epoch * (trained_epochs(mode, args.epochs) - epochs)
                left += seconds
                detail += (", " if detail else "") + f"~{seconds / 3600:.1f} h left"
        counts[state] += 1
        print(f"net {net} {mode:>18} seed {seed}: {state}" + (f" ({detail})" if detail else ""))
    print(", ".join(f"{n} {state}" for state, n in counts.items()) + f"  [{args.out}]")
    if left or unknown:
        print(f"about {left / 3600:.1f} h of training left at the s/epoch of the finished rows"
              " (one process per run; evaluation not counted)"
              + (f"; {unknown} run(s) with no row of their net to estimate from" if unknown else ""))
    return 0


def _epoch_seconds(rows: Collection[dict], net: int, mode: str, threads: int) -> float | None:
    """Seconds one training epoch of ``mode`` on ``net`` takes, judged from finished rows.

    The median ``sec_per_epoch`` of the rows of that net and mode, else of its
    ``classical`` (or 1x ``deepopt``) rows times the passes per step (2 for SAM); rows trained with
    ``threads`` threads first, as the thread count changes the time most. None without
    any row of the net."""
    two_pass = mode in ("sam", "sam-equal-time", "deepopt-thorough") or bool(
        (MECHANISMS.get(mode) or {}).get("closure"))
    for same_threads in (True, False):
        for base, factor in ((mode, 1), ("classical", 1 + two_pass), ("deepopt", 1 + two_pass)):
            times = [float(r["sec_per_epoch"]) for r in rows
                     if r.get("net") == net and r.get("mode") == base and "sec_per_epoch" in r
                     and (r.get("threads") == threads or not same_threads)]
            if times:
                return statistics.median(times) * factor
    return None


def _run_one(args: argparse.Namespace, net: int, mode: str, seed: int, data: tuple, partial: Path) -> dict:
    """One run of ``python -m benchmarks ablation`` or ``seed6``, as its result row."""
    from .train import run

    common = {"progress": not args.no_progress, "checkpoint": partial}
    if args.suite == "ablation":
        kwargs = MECHANISMS[mode]
        row = run(net, mode, seed, args.epochs, data, activate_kwargs=kwargs, **common)
        row["mechanism"] = {"name": mode, "settings": kwargs}
        row["evaluated_on"] = "validation (5,000 held-out training images)" if args.validation else "test"
        return row
    return run(net, mode, seed, args.epochs, data, **common)  # the mode alone says what runs
