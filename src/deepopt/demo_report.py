"""What ``deepopt demo`` prints and draws: the side-by-side table, the notes under it
(which mechanism made the two runs differ) and the PNG of both accuracy curves.

Every function here reads a :func:`deepopt.demo.run_demo` result and nothing else.

Example:
    >>> from deepopt.demo import run_demo
    >>> from deepopt.demo_report import format_table
    >>> result = run_demo(net="mlp", epochs=1, limit=200, progress=False)
    >>> print(format_table(result))  # doctest: +ELLIPSIS
    MNIST-1D, mlp, 1 epochs, 2 seeds...
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["format_table", "plot_curves"]


def _fmt(stat: dict[str, float], n: int, signed: bool = False, digits: int = 2) -> str:
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign}.{digits}f}"
    if n > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def format_table(result: dict[str, Any]) -> str:
    """The side-by-side comparison table of a :func:`run_demo` result, as text."""
    cfg, summ = result["config"], result["summary"]
    n = len(cfg["seeds"])
    recipe = cfg["recipe"] + "".join(f", {k}={v!r}" for k, v in cfg["overrides"].items())
    seeds = f"{n} seed{'s' if n > 1 else ''}" + (" (mean ± std; difference paired per seed)" if n > 1 else "")
    rows = [
        ("final test accuracy (%)", summ["final_test_acc"], True),
        ("max test accuracy (%) (test-selected)", summ["max_test_acc"], True),
        ("train time (s)", summ["train_seconds"], False),
    ]
    header = ("", "classical", "deepopt", "difference")
    body = [
        (label, _fmt(s["classical"], n), _fmt(s["deepopt"], n), _fmt(s["difference"], n, signed=True) if diff else "")
        for label, s, diff in rows
    ]
    body.append(("overhead ratio (deepopt / classical time)", "", f"{summ['overhead_ratio']:.2f}x", ""))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]

    def line(r: Sequence[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()

    title = (
        f"MNIST-1D, {cfg['net']}, {cfg['epochs']} epochs, {seeds}, recipe {recipe}\n"
        f"train {cfg['train_size']} / test {cfg['test_size']} examples, SGD lr {cfg['optimizer']['lr']:g} "
        f"momentum {cfg['optimizer']['momentum']:g}, batch {cfg['batch_size']}, LR /10 at epochs {cfg['lr_milestones']}"
    )
    rule = "-" * len(line(header))
    notes = [textwrap.fill(n, width=max(len(rule), 80)) for n in _notes(result)]
    return "\n".join([title, rule, line(header), rule, *map(line, body), rule, *notes])


def _notes(result: dict[str, Any]) -> list[str]:
    runs = result["seeds"]
    n = len(runs)
    calibrated = sum(bool(s["deepopt"].get("calibrated")) for s in runs)
    skipped = sum(int(s["deepopt"].get("skipped_steps", 0)) for s in runs)
    notes = [
        f"deepopt: start-up calibration applied in {calibrated} of {n} run{'s' if n > 1 else ''}, "
        f"{skipped} step{'s' if skipped != 1 else ''} skipped by the divergence guard."
    ]
    same = all(
        s["classical"][k] == s["deepopt"][k] for s in runs for k in ("test_acc", "train_loss")
    )
    if same:
        notes.append(
            "The two runs are identical: with these settings deepopt changed nothing in this "
            "network's training (no calibration was needed, no step was skipped) nor in what "
            "it evaluates. Other mechanisms are opt-in, e.g. --set rho=0.05 or --recipe thorough."
        )
        return notes
    cause = _cause(result)
    if cause:
        notes.append(cause)
    return notes


def _per_step_mechanisms(settings: dict[str, Any]) -> list[str]:
    """What ``settings`` (a row's, maybe with 0.1's knobs) switch on besides calibration and the guard."""
    from .experimental import legacy_kwargs
    from .mechanisms import compose
    from .recipes import Settings

    kw = legacy_kwargs({k: v for k, v in settings.items() if k != "recipe"})
    extra = kw.pop("mechanisms", [])
    known = {f for f in Settings.__dataclass_fields__}
    chosen = compose(Settings(**{k: v for k, v in kw.items() if k in known}), extra)
    return [m.label for m in chosen if m.name not in ("calibrate", "guard")]


def _cause(result: dict[str, Any]) -> str:
    """One plain sentence or two on which deepopt mechanism made the runs differ."""
    runs = result["seeds"]
    n = len(runs)
    settings = result["config"].get("settings", {})
    cal = [s["deepopt"] for s in runs if s["deepopt"].get("calibrated")]
    skipped = sum(int(s["deepopt"].get("skipped_steps", 0)) for s in runs)
    # Averaging changes only which weights are evaluated: named beside the training causes.
    averaged = bool(settings.get("average"))
    others = [m for m in _per_step_mechanisms(settings) if m not in ("weight averaging", "dropout-matched evaluation")]
    causes = (["start-up calibration"] if cal else []) + (["the divergence guard"] if skipped else []) + others
    if not causes and averaged:
        return (f"What made the difference: weight averaging ({settings['average']}) alone: training "
                "was the same, the evaluated weights are the average of the training weights.")
    also = (f" The evaluated weights are also averaged ({settings['average']}); that changes what "
            "eval() computes, not the training.") if averaged else ""
    return _training_cause(causes, others, cal, skipped, n, settings) + also


def _training_cause(causes: list[str], others: list[str], cal: list[dict], skipped: int, n: int,
                    settings: dict[str, Any]) -> str:
    """The sentence on what made training differ."""
    if len(causes) > 1:
        return (
            f"What made the difference: several mechanisms acted ({', '.join(causes)}); this "
            "comparison does not separate their effects (switch one off with --set, e.g. "
            "--set calibrate=false)."
        )
    if skipped:
        return (
            f"What made the difference: the divergence guard alone, which skipped {skipped} "
            f"step{'s' if skipped != 1 else ''} whose gradients were not finite (the classical "
            "run applied them); start-up calibration did not act."
        )
    if others:
        return (
            f"What made the difference: {others[0]} alone (start-up calibration did not act and "
            "the divergence guard skipped no step)."
        )
    if not cal:
        return ""
    ratios = sorted(r["signal_ratio"] for r in cal if isinstance(r.get("signal_ratio"), float))
    where = "" if len(cal) == n else f" (it acted in {len(cal)} of {n} runs; where it did not, both runs are the same)"
    measured = ""
    if ratios:
        span = f"{ratios[0]:.1e}" if ratios[0] == ratios[-1] else f"{ratios[0]:.1e} to {ratios[-1]:.1e}"
        threshold = settings.get("calibrate_threshold", 1e-3)
        if ratios[-1] < 1 or ratios[0] > 1:
            measured = (
                f" At the initial weights the signal vanished through depth: some layer's output "
                f"std was {span} times the first layer's (below the {threshold:g} threshold), so "
                "the gradients vanish with it and classical SGD makes little or no progress."
            )
        if ratios[0] > 1:
            measured = (
                f" At the initial weights the signal exploded through depth: some layer's output "
                f"std was {span} times the first layer's (above the {1 / threshold:g} limit)."
            )
    return (
        f"What made the difference: start-up calibration, alone{where}; the divergence guard "
        f"skipped no step and no other mechanism changes training.{measured} deepopt rescaled each "
        "layer's weights once, on the first batch, to unit output std (LSUV); after that both "
        "runs use the very same SGD loop."
    )


# What a reader of the picture needs, rather than the --net name.
NET_TITLES = {
    "deep": "20-layer plain conv net (Xavier init, no BatchNorm)",
    "mlp": "MLP 40-100-100-10",
    "cnn": "3-layer conv net",
    "gru": "bidirectional GRU",
}


def plot_curves(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a PNG of the test-accuracy curves of both runs (mean and min-max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, colour, style, width in (("classical", "tab:gray", "-", 3.0), ("deepopt", "tab:blue", "--", 1.6)):
        curves = np.array([s[name]["test_acc"] for s in result["seeds"]])
        epochs = np.arange(1, curves.shape[1] + 1)
        label = f"{name} (final {curves[:, -1].mean():.1f}%)"
        ax.plot(epochs, curves.mean(0), color=colour, ls=style, lw=width, label=label)
        if len(curves) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=colour, alpha=0.2, lw=0)
    for m in cfg["lr_milestones"]:
        if m < cfg["epochs"]:
            ax.axvline(m + 0.5, color="k", ls=":", lw=0.8)
    n = len(result["seeds"])
    recipe = cfg["recipe"] + "".join(f", {k}={v!r}" for k, v in cfg["overrides"].items())
    ax.set_title(
        f"MNIST-1D, {NET_TITLES.get(cfg['net'], cfg['net'])}: test accuracy\n"
        f"classical vs deepopt (recipe {recipe}), same seed, initial weights and data order"
        + (f"\n{n} seeds: mean, band min-max" if n > 1 else ""),
        fontsize=10,
    )
    ax.set_xlabel("epoch (dotted: LR / 10)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)  # the whole scale: chance (10%) and a perfect score both in view
    ax.grid(alpha=0.3)
    # Below the axes: inside, it would sit over a curve (the classical one, low on "deep").
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
