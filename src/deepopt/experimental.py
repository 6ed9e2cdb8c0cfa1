"""Mechanisms measured not to earn a place in a recipe, kept for research and A/B runs.

Each is a class whose constructor holds its knobs; pass instances to
``deepopt.activate(..., mechanisms=[...])`` (one replaces the recipe's mechanism of the
same name). BENCHMARKS.md, section 1, has the measurements behind each verdict.

* :class:`MomentumPerturbation` with ``follows_lr``, ``ascent`` or ``adaptive`` (its plain
  form is ``Settings.rho``);
* :class:`TwoPassSAM` with a radius, a warm-up, ASAM's ``adaptive`` radius, an ``lr_range``,
  or LookSAM's ``every``/``reuse`` (``Settings.budget`` decides its steps otherwise);
* :class:`BudgetSAM` with another radius, warm-up, ASAM's ``adaptive`` radius or
  ``two_pass_cost`` than ``budget``'s (BENCHMARKS.md, section 5.2, screens them);
* :class:`Calibration` with another ``threshold`` than 1e-3;
* :class:`WeightNoise`: random weight perturbation;
* :class:`Lookahead`: slow/fast weights;
* :class:`WeightAverage` with ``restart=True``: continue from the average at each LR change;
* :class:`SwitchAverage`: continue from the average periodically (Switch EMA).

Example:
    >>> import torch, deepopt
    >>> from deepopt.experimental import Lookahead
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> model, opt = deepopt.activate(model, opt, mechanisms=[Lookahead(k=5, alpha=0.5)])
    >>> opt.mechanism("lookahead")
    Lookahead(k=5, alpha=0.5)
"""

from __future__ import annotations

from typing import Any

from .mechanisms.average import WeightAverage
from .mechanisms.budget import BudgetSAM
from .mechanisms.calibrate import Calibration
from .mechanisms.lookahead import Lookahead
from .mechanisms.noise import WeightNoise
from .mechanisms.perturb import MomentumPerturbation
from .mechanisms.sam import TwoPassSAM
from .mechanisms.switch import SwitchAverage
from .recipes import MOVED, RECIPES

__all__ = ["MomentumPerturbation", "TwoPassSAM", "BudgetSAM", "Calibration", "WeightNoise", "Lookahead", "WeightAverage",
           "SwitchAverage", "legacy_kwargs"]

#: What the ``thorough`` recipe meant before ``budget`` (SAM from the LR's first tenth on).
OLD_THOROUGH_SAM = {"sam_rho": 0.05, "sam_warmup": 1000, "sam_lr_ceiling": 0.1}
_SAM_KNOBS = ("sam_rho", "sam_warmup", "sam_lr_ceiling", "adaptive", "sam_every", "sam_reuse", "sam_lr_fraction")


def legacy_kwargs(knobs: dict[str, Any]) -> dict[str, Any]:
    """``activate()`` keyword arguments for settings written with knobs that left the settings.

    The knobs that moved (:data:`deepopt.recipes.MOVED`) become mechanisms with the same
    behaviour (LookSAM's ``sam_reuse`` keeps 0.1's default, 0.7), so benchmark rows run
    with them reproduce. With a SAM knob, ``recipe="thorough"`` means what it meant then:
    the default plus :data:`OLD_THOROUGH_SAM`.

    Example:
        >>> kw = legacy_kwargs({"recipe": "safe", "sam_rho": 0.05, "sam_every": 4, "noise": 0.1})
        >>> kw["recipe"], kw["mechanisms"]
        ('safe', [WeightNoise(sigma=0.1, seed=...), TwoPassSAM(rho=0.05, warmup=0, adaptive=False, lr_range=(0.0, 1.0), every=4, reuse=0.7)])
        >>> legacy_kwargs({"recipe": "thorough", "sam_lr_ceiling": 1.0})["mechanisms"]
        [TwoPassSAM(rho=0.05, warmup=1000, adaptive=False, lr_range=(0.0, 1.0), every=1, reuse=0.7)]
    """
    kw = dict(knobs)
    moved = {k: kw.pop(k) for k in list(kw) if k in MOVED}
    mechanisms = list(kw.pop("mechanisms", []))
    if not moved:
        return {**kw, "mechanisms": mechanisms} if mechanisms else kw
    sam = {"sam_rho": 0.0, "sam_warmup": 0, "sam_lr_ceiling": 1.0}
    if kw.get("recipe") == "thorough" and any(k in moved for k in _SAM_KNOBS):
        kw["recipe"], sam = "default", dict(OLD_THOROUGH_SAM)
    sam.update({k: moved[k] for k in sam if k in moved})
    base = RECIPES[kw.get("recipe", "default")]
    adaptive = bool(moved.get("adaptive", False))
    rho = kw.get("rho", base.rho)
    if rho > 0 and any(k in moved for k in ("ascent", "adaptive", "rho_follows_lr")):
        mechanisms.append(MomentumPerturbation(rho, follows_lr=bool(moved.get("rho_follows_lr", False)),
                                               ascent=bool(moved.get("ascent", False)), adaptive=adaptive))
    if moved.get("noise", 0) > 0:
        mechanisms.append(WeightNoise(moved["noise"]))
    if moved.get("lookahead_k", 0) > 0:
        mechanisms.append(Lookahead(moved["lookahead_k"], moved.get("lookahead_alpha", 0.5)))
    if sam["sam_rho"] > 0:
        mechanisms.append(TwoPassSAM(sam["sam_rho"], sam["sam_warmup"], adaptive=adaptive,
                                     lr_range=(moved.get("sam_lr_fraction", 0.0), sam["sam_lr_ceiling"]),
                                     every=moved.get("sam_every", 1), reuse=moved.get("sam_reuse", 0.7)))
    if "calibrate_threshold" in moved and kw.get("calibrate", base.calibrate):
        mechanisms.append(Calibration(moved["calibrate_threshold"]))
    if moved.get("average_restart"):
        kind = kw.get("average", base.average)
        mechanisms.append(WeightAverage(kind, kw.get("ema_decay", base.ema_decay),
                                        every=kw.get("average_every", base.average_every),
                                        width=kw.get("average_width", base.average_width),
                                        follows_lr=kw.get("average_follows_lr", base.average_follows_lr),
                                        restart=True))
    return {**kw, "mechanisms": mechanisms}
