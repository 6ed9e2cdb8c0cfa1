"""What every client script shares: seeding, the explicit-activate switch, the output folder.

The scripts are written the way training code is usually written; the only addition is
:func:`maybe_activate`, which adds ``deepopt.activate`` when ``DEEPOPT_CLIENT=activate``
(the third way a user meets deepopt, besides ``deepopt run`` and ``deepopt run --off``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def setup() -> Path:
    """Seed, one thread, and the output folder given as the first argument."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    return out


def maybe_activate(model, optimizer):
    """``deepopt.activate(model, optimizer)`` when ``DEEPOPT_CLIENT=activate``, else unchanged."""
    if os.environ.get("DEEPOPT_CLIENT") == "activate":
        import deepopt

        budget = os.environ.get("DEEPOPT_BUDGET")  # the tests' stand-in for --set budget=...
        return deepopt.activate(model, optimizer, recipe=os.environ.get("DEEPOPT_RECIPE", "default"),
                                **({"budget": float(budget)} if budget else {}))
    return model, optimizer


def save_training_weights(out: Path, **models: torch.nn.Module) -> None:
    """The training weights of each model, for comparison (the harness's, not the script's:
    under deepopt ``state_dict()`` holds the evaluation weights)."""
    try:
        from deepopt.checkpoint import training_state_dict
    except ImportError:  # a plain run: state_dict() in train mode is the training weights
        def training_state_dict(m):
            return m.state_dict()
    for model in models.values():
        model.train()
    torch.save({name: training_state_dict(m) for name, m in models.items()}, out / "weights.pt")
