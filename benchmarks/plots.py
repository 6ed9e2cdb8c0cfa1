"""Test-accuracy curves per net of the seed6 and ablation runs (PNG, one per net).

Example:
    >>> seed_curves([[10.0, 20.0], [24.0, 30.0, 31.0]])
    ([17.0, 25.0], [10.0, 20.0], [24.0, 30.0])
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from .tables import mode_of

__all__ = ["seed_curves", "plot"]


def seed_curves(accs: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per epoch, the mean, lowest and highest accuracy over seeds (up to the shortest run).

    Example:
        >>> seed_curves([[10.0, 20.0], [24.0, 30.0, 31.0]])
        ([17.0, 25.0], [10.0, 20.0], [24.0, 30.0])
    """
    n = min(len(a) for a in accs)
    per_epoch = [[a[i] for a in accs] for i in range(n)]
    return ([statistics.fmean(v) for v in per_epoch], [min(v) for v in per_epoch],
            [max(v) for v in per_epoch])


def plot(rows: list[dict], out: Path, title: str) -> list[Path]:
    """One PNG per net: mean test-accuracy curve per mode over seeds.

    Classical and deepopt also get a shaded band from the lowest to the highest seed, so a
    mean of one seed that trains and one that does not reads as such.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    held_out = any(str(r.get("evaluated_on", "test")).startswith("validation") for r in rows)
    paths = []
    for net in sorted({r["net"] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        curves: dict[str, list[list[float]]] = defaultdict(list)
        for r in rows:
            if r["net"] == net:
                curves[mode_of(r)].append(r["test_acc"])
        colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 modes
        ordered = sorted(curves.items(), key=lambda kv: (kv[0] != "classical", kv[0]))
        for k, (mode, accs) in enumerate(ordered):
            mean, low, high = seed_curves(accs)
            epochs = range(1, len(mean) + 1)
            bold = mode in ("classical", "deepopt", "default")
            # classical dashed and on top: where a mode's curve is the same, both stay visible
            style = {"color": "black", "ls": "--", "zorder": 3} if mode == "classical" else {
                "color": "tab:blue" if bold else colors[k % len(colors)]}
            ax.plot(epochs, mean, label=f"{mode} (n={len(accs)})", lw=2.5 if bold else 1.2, **style)
            if bold and len(accs) > 1:  # peers unshaded: six bands would hide each other
                ax.fill_between(epochs, low, high, color=style["color"], alpha=0.12, lw=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ylabel = "validation accuracy (%)" if held_out else "test accuracy (%)"
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{title}: net {net} (mean over seeds; band: seed range)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out / f"{title}-net{net}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
