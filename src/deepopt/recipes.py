"""Named recipes: which mechanisms ``activate`` turns on, and with what settings.

Every default carries its reason; the ablation behind each is in BENCHMARKS.md.

Example:
    >>> from deepopt.recipes import resolve
    >>> resolve("default", {}).guard
    True
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

__all__ = ["Settings", "RECIPES", "MOVED", "resolve"]


@dataclass(frozen=True)
class Settings:
    """All knobs of deepopt; a recipe is one instance, overrides replace fields.

    Attributes:
        rho: radius of the momentum-direction perturbation (Momentum-SAM, zero extra
            passes): each training forward runs at ``w - rho * m / ||m||``; 0 turns it off.
        budget: the most compute deepopt may spend, relative to the classical run, in
            ``[1, 2.25]``: ``b > 1`` buys exact two-pass SAM (Foret et al.) on a share
            ``(b - 1) / 1.25`` of the steps (a two-pass step costs up to 2.25 plain ones), the last ones where the run announces its length, else those after
            the LR has fallen to a tenth of its peak (``deepopt.mechanisms.budget``). It
            needs ``step(closure)`` or a loop deepopt can replay (:mod:`deepopt.replay`);
            elsewhere it says so once and trains as at 1.0.
        average: ``None``, ``"ema"``, ``"power"`` (power-function EMA, Karras et al. 2024:
            its window is ``average_width`` of the steps taken so far, so it needs no
            horizon) or ``"phase"`` (uniform average within the current LR phase); what
            ``model.eval()`` computes with.
        ema_decay: EMA decay in ``[0, 1)``.
        average_width: the power-function EMA's relative width ``sigma_rel`` in
            ``(0, 0.28)``: 0.05 averages roughly the last tenth of the steps so far.
        average_follows_lr: shrink the averaging window in proportion to
            ``lr / (largest lr so far)``: where a schedule anneals the LR to zero the
            average converges to the iterate, which the schedule has already averaged.
        average_every: fold the weights into the average every ``k``-th step only (the
            EMA decay is adjusted to keep its horizon in steps): ``1/k`` of the cost.
        average_samples: with ``average="power"``, fold in once per ``1/k`` of the window's
            width (at least ``average_every`` steps apart), so that the cost per step falls
            as ``1 / steps``; 0: every ``average_every`` steps. The other averages, whose
            window does not grow, ignore it.
        dropout_match: evaluate a net with dropout at weights rescaled so that each
            linear/conv layer's eval-mode output matches its output with dropout on, measured
            on the last training batch at the first evaluation after new steps, and kept
            only where that brings the eval output at least 2x closer to the mean of the
            dropout samples (the training weights are untouched; nets without dropout cost
            nothing). For deep stacks with heavy dropout whose eval mode is broken early in
            training (the seed's net 2 at 20 epochs; BENCHMARKS.md, section 1).
        calibrate: rescale the init on the first batch, only if the signal vanishes.
        guard: skip steps with non-finite gradients.
        max_skips: consecutive skipped steps before the guard raises.

    Example:
        >>> from deepopt import RECIPES
        >>> RECIPES["safe"].calibrate, RECIPES["safe"].rho
        (True, 0.0)
        >>> RECIPES["default"].dropout_match
        True

    The knobs of mechanisms measured not to help moved to constructor arguments of
    :mod:`deepopt.experimental` classes (:data:`MOVED`).
    """

    rho: float = 0.0
    budget: float = 1.0
    average: str | None = None
    ema_decay: float = 0.999
    average_width: float = 0.05
    average_follows_lr: bool = False
    average_every: int = 1
    average_samples: int = 0
    dropout_match: bool = False
    calibrate: bool = True
    guard: bool = True
    max_skips: int = 20

    def validate(self) -> Settings:
        """Raise ``ValueError`` naming the field, the value and the valid range."""
        for name in ("average_follows_lr", "dropout_match", "calibrate", "guard"):
            value = getattr(self, name)
            if not _is_bool(value):
                raise ValueError(f"{name}={value!r} is invalid: it must be True or False.")
        for name in ("rho", "budget", "ema_decay", "average_width"):
            value = getattr(self, name)
            if _is_bool(value) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is invalid: it must be a finite number.")
        if self.rho < 0:
            raise ValueError(f"rho={self.rho!r} is invalid: it must be a number >= 0 (0 turns it off).")
        if not 1.0 <= self.budget <= 2.25:
            raise ValueError(f"budget={self.budget!r} is invalid: it must lie in [1, 2.25], e.g. 1.5 (1: no "
                             "extra compute; 2.25: two passes on every step).")
        # Step counts: integers (not bools, not floats) at or above their smallest value.
        for name, low, note in (("average_every", 1, ""),
                                 ("average_samples", 0, " (0 = every average_every steps)"), ("max_skips", 1, "")):
            value = getattr(self, name)
            if _is_bool(value) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {low}{note}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} is invalid: it must lie in [0, 1), e.g. 0.999.")
        if self.average not in (None, "ema", "power", "phase"):
            raise ValueError(f"average={self.average!r} is invalid: use None, 'ema', 'power' or 'phase'.")
        if not 0.0 < self.average_width < 0.28:
            raise ValueError(
                f"average_width={self.average_width!r} is invalid: it must lie in (0, 0.28), e.g. 0.05."
            )
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _is_bool(value: object) -> bool:
    """``bool`` or a NumPy bool (which is neither a ``bool`` nor a number)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


RECIPES: dict[str, Settings] = {
    # Calibration rescues nets whose signal vanishes (seed Net 4, demo deep net) and is
    # bit-identical elsewhere; the guard costs one fused check per step. Dropout-matched
    # evaluation changes only what eval() computes, and only where the rescaled net is much
    # closer to the dropout ensemble (the seed's net 2, whose eval mode is broken at 20
    # epochs). Evaluation weights: a power-function EMA (EDM2) over the last ~5% of the
    # steps so far, its window shrinking with the LR: the best validation mean of 10
    # averaging rules over the zoo's 19 setups (BENCHMARKS.md 1.0), worth something where
    # the LR stays high (no schedule, noisy gradients) and exactly the iterate where a
    # schedule anneals the LR to zero. Folded in once per 1/8 of its window (at least 4
    # steps apart), so its cost falls as 1/steps: equal to folding every 4th step on the
    # zoo's validation splits (+0.26 vs +0.24 points), a fifth of the folds over a 20-epoch run.
    "default": Settings(dropout_match=True, average="power", average_width=0.05, average_follows_lr=True,
                        average_every=4, average_samples=8),
    # The default plus a compute budget of 1.5x: exact two-pass SAM (rho 0.05, Foret et al.'s
    # CIFAR value) on the last 40% of a run that announces its length, else once the LR has
    # fallen to a tenth of its peak, never past 40% of the steps so far. SAM late in
    # training finds the flat minima SAM throughout does (Zhou et al., ICLR 2025). Its
    # predecessor (SAM on every step after the LR fell to a tenth, no cap: ~1.75x under the
    # seed's drops) gave +0.53/+0.80 points on nets 6/5 at 20 epochs and +1.44 on net 6 at
    # 100; against classical trained 1.25-2x longer: a tie on net 6, +0.80 on net 5
    # (BENCHMARKS.md, section 5, which also measures budgets 1.25, 1.5 and 2).
    "thorough": Settings(budget=1.5, dropout_match=True, average="power", average_width=0.05,
                         average_follows_lr=True, average_every=4, average_samples=8),
    # The safety nets only; stays so when the default grows (A/B of other mechanisms).
    "safe": Settings(),
}


#: Knobs that left the settings for constructor arguments of deepopt.experimental classes:
#: mechanisms measured not to help, the SAM knobs ``budget`` replaced, and calibration's
#: threshold (a research knob).
MOVED = {
    "noise": "WeightNoise(sigma=...)",
    "ascent": "MomentumPerturbation(rho=..., ascent=True)",
    "adaptive": "MomentumPerturbation(rho=..., adaptive=True) or TwoPassSAM(rho=..., adaptive=True)",
    "rho_follows_lr": "MomentumPerturbation(rho=..., follows_lr=True)",
    "sam_every": "TwoPassSAM(rho=..., every=...)",
    "sam_reuse": "TwoPassSAM(rho=..., every=..., reuse=...)",
    "sam_lr_fraction": "TwoPassSAM(rho=..., lr_range=(fraction, ceiling))",
    "lookahead_k": "Lookahead(k=..., alpha=...)",
    "lookahead_alpha": "Lookahead(k=..., alpha=...)",
    "average_restart": "WeightAverage(kind=..., restart=True)",
    "sam_rho": "TwoPassSAM(rho=...)",
    "sam_warmup": "TwoPassSAM(rho=..., warmup=...)",
    "sam_lr_ceiling": "TwoPassSAM(rho=..., lr_range=(0.0, ceiling))",
    "calibrate_threshold": "Calibration(threshold=...)",
}


def resolve(recipe: str, overrides: dict) -> Settings:
    """The settings of ``recipe`` with ``overrides`` applied and validated.

    Example:
        >>> resolve("safe", {"rho": 0.05}).rho
        0.05
        >>> resolve("default", {"rhoo": 0.05})
        Traceback (most recent call last):
        ...
        ValueError: unknown override(s) rhoo; valid overrides: average, ...
    """
    moved = sorted(set(overrides) & set(MOVED))
    if moved:
        raise ValueError(
            f"{', '.join(moved)} moved to deepopt.experimental: pass "
            + "; ".join(f"mechanisms=[{MOVED[k]}]" for k in moved)
            + " to activate(), e.g. mechanisms=[deepopt.experimental.Lookahead(k=5)]."
            + (" For SAM late in the run at a set cost, pass budget=1.5 instead." if any(
                k.startswith("sam_") for k in moved) else "")
        )
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is unknown; valid recipes: {', '.join(sorted(RECIPES))}.")
    valid = {f.name for f in fields(Settings)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"unknown override(s) {', '.join(unknown)}; valid overrides: {', '.join(sorted(valid))}."
        )
    return replace(RECIPES[recipe], **overrides).validate()
