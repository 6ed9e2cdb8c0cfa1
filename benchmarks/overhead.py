"""``python -m benchmarks overhead``: per-step cost of a recipe against classical training.

Classical and activated steps run in alternating blocks inside one single-threaded
process and are timed with the process's CPU clock, so load from other jobs on the
machine slows both alike and the ratio stays honest. Rows go to
``benchmarks/results/overhead.jsonl``. Besides the seed6 nets (1-6, CIFAR-sized inputs),
``mlp`` is a tiny MLP (64 -> 128 -> 10) whose step is so cheap that deepopt's fixed
per-step cost shows.

Example (shell)::

    python -m benchmarks overhead --nets mlp 6 5 1 --settings '{}' '{"rho": 0.1}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["alternating_ms", "step_costs", "main"]


def _net(text: str) -> int | str:
    """A ``--nets`` value: ``mlp`` or a seed6 net number."""
    if text == "mlp":
        return text
    if text.isdigit() and 1 <= int(text) <= 6:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a net: mlp or 1-6")


def alternating_ms(steps_a: Callable[[int], object], steps_b: Callable[[int], object], steps: int = 300,
                   block: int = 25) -> tuple[float, float]:
    """Median CPU milliseconds per step of two step functions timed in alternating blocks.

    Each function is called with the step's index within its block. Both see the same
    load of the moment, so the ratio of the medians is honest on a shared machine; the
    first block of each is a warm-up.

    Example:
        >>> a, b = alternating_ms(lambda i: None, lambda i: sum(range(1000)), steps=50, block=10)
        >>> a < b
        True
    """
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(max(2, steps // block)):
        for fn, out in zip((steps_a, steps_b), times):
            t0 = time.process_time()
            for i in range(block):
                fn(i)
            out.append((time.process_time() - t0) * 1000 / block)
    return statistics.median(times[0][1:]), statistics.median(times[1][1:])


def step_costs(net: int | str, settings: dict, steps: int = 300, block: int = 25, seed: int = 0) -> dict:
    """Median CPU milliseconds per training step, classical vs activated with ``settings``.

    ``net`` is a seed6 net number (inputs 3x32x32) or ``"mlp"`` (64 -> 128 -> 10, inputs of 64);
    batches of 64 synthetic examples, SGD with momentum.
    """
    import deepopt
    from benchmarks.nets import build_net
    from deepopt.experimental import legacy_kwargs

    from .train import LR, MOMENTUM, WEIGHT_DECAY

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64 * block, *((64,) if net == "mlp" else (3, 32, 32)), generator=g)
    y = torch.randint(0, 10, (64 * block,), generator=g)
    # Exact SAM runs only through step(closure); both arms take that form so that the
    # ratio prices the second pass (for plain SGD it is the same computation).
    closure = None
    runs = []
    for activated in (False, True):
        torch.manual_seed(seed)
        if net == "mlp":
            model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        else:
            model = build_net(net)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        if activated:
            model, opt = deepopt.activate(model, opt, **legacy_kwargs(settings))
            closure = any(m.needs_closure for m in opt.mechanisms)
        runs.append((model, opt))

    def stepper(model, opt):
        def one_step(i: int) -> None:
            xb, yb = x[i * 64:(i + 1) * 64], y[i * 64:(i + 1) * 64]

            def loss_and_grad():
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            if closure:
                opt.step(loss_and_grad)
            else:
                loss_and_grad()
                opt.step()
        return one_step

    classical, activated = alternating_ms(*(stepper(*r) for r in runs), steps=steps, block=block)
    return {"net": net, "settings": settings, "ms_per_step_classical": classical,
            "ms_per_step_activated": activated, "ratio": activated / classical,
            "steps": steps, "closure": closure, "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks overhead",
        description="Per-step CPU cost of deepopt's settings against classical training on the "
        "seed6 nets and a tiny MLP: classical and activated steps alternate in blocks in one single-threaded "
        "process, timed with its CPU clock, so other jobs slow both alike. One JSON row per net "
        "and settings is appended to --out.",
        epilog="example: python -m benchmarks overhead --nets mlp 6 5 1 --settings '{}' '{\"rho\": 0.1}'",
    )
    p.add_argument("--nets", type=_net, nargs="+", default=[6, 5, 1], metavar="NET",
                   help="seed6 net numbers (1-6), or mlp: a 64-128-10 MLP where deepopt's fixed "
                   "per-step cost shows. Default: %(default)s")
    p.add_argument("--settings", nargs="+", default=["{}"], metavar="JSON",
                   help="JSON dicts of deepopt.activate keyword arguments, e.g. '{\"recipe\": \"thorough\"}' "
                   "'{\"rho\": 0.1}'; '{}' is the default recipe. Default: '{}'")
    p.add_argument("--steps", type=int, default=300,
                   help="training steps per mode and net, timed in blocks of 25 (the first block is a "
                   "warm-up; the median block is reported). Default: %(default)s")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.jsonl"), metavar="FILE",
                   help="results file, one JSON line per net and settings. Default: %(default)s")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for net in args.nets:
        for text in args.settings:
            row = step_costs(net, json.loads(text), steps=args.steps)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"net {net} {text}: {row['ms_per_step_classical']:.2f} -> "
                  f"{row['ms_per_step_activated']:.2f} ms/step ({row['ratio']:.3f}x)", flush=True)
    return 0
