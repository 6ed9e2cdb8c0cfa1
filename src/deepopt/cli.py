"""The ``deepopt`` command: ``demo`` and ``run``.

* ``deepopt demo``: train one network twice on MNIST-1D, classical and with deepopt,
  and compare them (:mod:`deepopt.demo`).
* ``deepopt run -- python train.py ARGS``: the user's unmodified script with deepopt
  activated on every optimizer it builds (:mod:`deepopt.launcher`).

``demo`` needs the ``demo`` extra (``pip install "deepopt[demo]"``); without it it stops
with one line naming what is missing. The core, ``run`` and ``--help`` need only torch
and numpy. The benchmarks and their report are not in the package: they live beside it
in the repository (``python -m benchmarks ...`` from a checkout), and ``deepopt bench`` /
``deepopt report`` say so in one line.

Example::

    $ deepopt demo --epochs 20
    $ deepopt run -- python train.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_parser", "main"]

#: Commands that moved out of the package into the lab beside it in the repository.
MOVED = {"bench": "python -m benchmarks SUITE ...", "report": "python -m benchmarks report ..."}

#: The packages behind the demo extra, by the module each is imported as.
EXTRA_PACKAGES = {"tqdm": "tqdm", "matplotlib": "matplotlib", "mnist1d": "mnist1d", "PIL": "pillow"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None  # None also if sys.modules[module] is None
    except ValueError:  # imported already, without a spec
        return True


def _needs_extra(command: str, packages: list[str]) -> str:
    return (f"deepopt {command} needs the demo extra: pip install 'deepopt[demo]' "
            f"(missing: {', '.join(packages)})")


def _missing_extra(command: str) -> str | None:
    """The line saying what ``command`` lacks of the demo extra, or None if it is all there."""
    missing = [package for module, package in EXTRA_PACKAGES.items() if not _installed(module)]
    return _needs_extra(command, missing) if missing else None


def build_parser() -> argparse.ArgumentParser:
    """The ``deepopt`` argument parser with its subcommands."""
    from deepopt import RECIPES, __version__
    from deepopt.demo import add_arguments

    parser = argparse.ArgumentParser(
        prog="deepopt",
        description="deepopt: one call that changes only how a PyTorch network is trained. "
        "This command runs the demo and your own training script.",
        epilog="Run 'deepopt COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"deepopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    demo = sub.add_parser(
        "demo",
        help="train a network on MNIST-1D twice, classical and with deepopt, and compare "
        "(table, PNG of test-accuracy curves, JSON of per-epoch numbers)",
        description="Train the same network twice on MNIST-1D (generated offline): once "
        "classically and once after deepopt.activate(model, optimizer), with the same "
        "seed, initial weights and data order. Prints a side-by-side table (final and "
        "max test accuracy, train time, overhead ratio) and writes a PNG of both "
        "test-accuracy curves and a JSON file of the per-epoch numbers into --out.",
    )
    add_arguments(demo)
    run = sub.add_parser(
        "run",
        help="run your unmodified training script with deepopt activated on every optimizer it builds",
        description="Run 'python SCRIPT ARGS' (or 'python -m MODULE ARGS') with this interpreter, "
        "deepopt activated on every optimizer the script builds, at the first forward of the model "
        "holding its parameters (for an optimizer stepped only with step(closure), inside the "
        "closure). One line per activation goes to stderr, and one for each thing deepopt cannot do "
        "on the script (e.g. it builds no torch.optim optimizer). The exit status is the script's. "
        "Example: deepopt run --recipe safe -- python train.py --epochs 3",
    )
    run.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                     help="deepopt recipe: default (about 1x cost), safe (calibration and guard only) "
                     "or thorough (the default with budget=1.5: two-pass SAM late in the run, where deepopt can "
                     "replay the script's loss; it says once whether it can). Default: default")
    run.add_argument("--off", action="store_true", help="run the script classically (the A/B twin run)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe setting, e.g. --set budget=1.25 (repeatable)")
    run.add_argument("script_command", nargs=argparse.REMAINDER, metavar="-- python SCRIPT ARGS",
                     help="the command that runs your script")
    return parser


def _extra_guard(command: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or one line and status 2 if it needs a package of an extra that is missing."""
    try:
        return fn(*args)
    except ModuleNotFoundError as e:
        package = EXTRA_PACKAGES.get((e.name or "").split(".")[0])
        if package is None:
            raise
        print(_needs_extra(command, [package]), file=sys.stderr)
        return 2


BOOTSTRAP = (
    "import os, runpy, sys\n"
    "import deepopt.launcher as L\n"
    "L.install_from_env()\n"
    "mode, target = sys.argv[1], sys.argv[2]\n"
    "sys.argv = sys.argv[2:]\n"
    "if mode == '-m':\n"
    "    sys.path[0] = os.getcwd()\n"
    "    runpy.run_module(target, run_name='__main__', alter_sys=True)\n"
    "else:\n"
    "    sys.path[0] = os.path.dirname(os.path.abspath(target))\n"
    "    runpy.run_path(target, run_name='__main__')\n"
)


def _run(args: argparse.Namespace) -> int:
    import json
    import os
    import subprocess

    from deepopt.demo import parse_overrides
    from deepopt.launcher import ENV
    from deepopt.recipes import resolve

    command = list(args.script_command)
    if command and command[0] == "--":
        command = command[1:]
    if command and os.path.basename(command[0]).startswith("python") and not command[0].endswith(".py"):
        command = command[1:]  # always this interpreter: the one deepopt is installed in
    usage = "usage: deepopt run [--recipe NAME] [--off] [--set KEY=VALUE ...] -- python SCRIPT [ARGS...]"
    if command[:1] == ["-m"]:
        if len(command) < 2:
            print(usage, file=sys.stderr)
            return 2
        mode, rest = "-m", command[1:]
    elif command and not command[0].startswith("-"):
        mode, rest = "path", command
    else:
        print(usage, file=sys.stderr)
        return 2
    try:
        overrides = parse_overrides(args.overrides)
        resolve(args.recipe, overrides)
    except (ValueError, TypeError) as e:
        print(f"deepopt run: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env[ENV] = json.dumps({"recipe": args.recipe, "enabled": not args.off, "overrides": overrides})
    return subprocess.call([sys.executable, "-c", BOOTSTRAP, mode, *rest], env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepopt`` console script; returns the exit status.

    Args:
        argv: the arguments after the program name; default ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MOVED:
        print(f"deepopt {argv[0]}: the benchmarks moved out of the package; from a checkout of the "
              f"repository run '{MOVED[argv[0]]}' (see BENCHMARKS.md)", file=sys.stderr)
        return 2
    if argv[:1] == ["demo"] and not {"-h", "--help"} & set(argv[1:]):
        message = _missing_extra("demo")
        if message:
            print(message, file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from deepopt.demo import run_from_args

        return _extra_guard("demo", run_from_args, args)
    if args.command == "run":
        return _run(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
