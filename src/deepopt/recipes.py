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

__all__ = ["Settings", "RECIPES", "resolve"]


@dataclass(frozen=True)
class Settings:
    """All knobs of deepopt; a recipe is one instance, overrides replace fields.

    Attributes:
        rho: radius of the momentum-direction perturbation (zero extra passes);
            0 turns it off.
        ascent: perturb along ``+m`` (uphill, SAM's sign with the momentum standing in
            for the gradient) instead of ``-m`` (along the update, Momentum-SAM's sign).
        rho_follows_lr: scale ``rho`` by ``lr / (largest lr so far)`` so the
            perturbation shrinks with the learning-rate schedule.
        adaptive: scale-adaptive (ASAM) radius, per-weight ``|w| + 0.01``.
        noise: random weight perturbation: each training forward runs at ``w + e``,
            ``e`` Gaussian with std ``noise`` times each output unit's weight RMS; 0 is off.
        sam_rho: radius of exact two-pass SAM, used when ``step(closure)`` is given;
            0 turns it off.
        sam_warmup: ramp the SAM radius linearly from 0 to ``sam_rho`` over the first
            ``k`` steps (0 = full radius from the first step). A full radius while the
            loss is still on its initial plateau killed the last hidden layer of the
            seed's 13-layer MLP on 2 of 3 seeds (BENCHMARKS.md, section 1).
        sam_lr_fraction: run the two SAM passes only while the learning rate is at least
            this fraction of the largest seen so far (1.0 = until the first LR drop,
            0 = always); below it ``step(closure)`` takes one plain pass, so under the
            seed's schedule (drops at 30/60/80%) 1.0 costs about 1.3x instead of 2x. Measured
            to keep none of SAM's 100-epoch gain on the seed's net 6, which is made at the
            low LR (BENCHMARKS.md, section 1).
        sam_lr_ceiling: run the two SAM passes only while the learning rate is at most
            this fraction of the largest seen so far (1.0 = always; 0.5 = after the first
            drop by 2x or more; 0.005 = the seed's last phase, after its third /10 drop,
            about 1.2x); above it ``step(closure)`` takes one plain pass. SAM late in
            training only, the mirror of ``sam_lr_fraction``. Measured to keep at most
            part of SAM's 100-epoch gain on the seed's net 6 in any one LR phase
            (BENCHMARKS.md, section 1).
        sam_every: run the two SAM passes every ``k``-th step only; the steps between
            take one pass and reuse SAM's last sharpness direction (LookSAM).
        sam_reuse: LookSAM's ``alpha``, the weight of the reused direction (0 = plain
            gradient between the SAM steps: periodic SAM, cost ``1 + 1/k``). Measured unstable with SGD momentum at
            alpha 0.7 (BENCHMARKS.md, section 1).
        lookahead_k: Lookahead slow/fast weights, sync every ``k`` steps; 0 turns it off.
        lookahead_alpha: Lookahead's step of the slow weights towards the fast, in (0, 1].
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
        average_restart: when the learning rate changes (an LR drop), training continues
            from the averaged weights: the average of the phase that ends (SWA's point)
            is fine-tuned at the new LR. Needs ``average``.
        dropout_match: evaluate a net with dropout at weights rescaled so that each
            linear/conv layer's eval-mode output matches its output with dropout on, measured
            on the last training batch at the first evaluation after new steps, and kept
            only where that brings the eval output at least 2x closer to the mean of the
            dropout samples (the training weights are untouched; nets without dropout cost
            nothing). For deep stacks with heavy dropout whose eval mode is broken early in
            training (the seed's net 2 at 20 epochs; BENCHMARKS.md, section 1).
        calibrate: rescale the init on the first batch, only if the signal vanishes.
        calibrate_threshold: vanishing/exploding limit of the last/first layer
            output std ratio.
        guard: skip steps with non-finite gradients.
        max_skips: consecutive skipped steps before the guard raises.

    Example:
        >>> from deepopt import RECIPES
        >>> RECIPES["safe"].calibrate, RECIPES["safe"].rho
        (True, 0.0)
        >>> RECIPES["default"].dropout_match
        True
    """

    rho: float = 0.0
    ascent: bool = False
    rho_follows_lr: bool = False
    adaptive: bool = False
    noise: float = 0.0
    sam_rho: float = 0.0
    sam_warmup: int = 0
    sam_lr_fraction: float = 0.0
    sam_lr_ceiling: float = 1.0
    sam_every: int = 1
    sam_reuse: float = 0.7
    lookahead_k: int = 0
    lookahead_alpha: float = 0.5
    average: str | None = None
    ema_decay: float = 0.999
    average_width: float = 0.05
    average_follows_lr: bool = False
    average_every: int = 1
    average_restart: bool = False
    dropout_match: bool = False
    calibrate: bool = True
    calibrate_threshold: float = 1e-3
    guard: bool = True
    max_skips: int = 20

    def validate(self) -> Settings:
        """Raise ``ValueError`` naming the field, the value and the valid range."""
        for name in ("ascent", "rho_follows_lr", "adaptive", "average_restart", "average_follows_lr",
                     "dropout_match", "calibrate", "guard"):
            value = getattr(self, name)
            if not _is_bool(value):
                raise ValueError(f"{name}={value!r} is invalid: it must be True or False.")
        for name in ("rho", "noise", "sam_rho", "sam_lr_fraction", "sam_lr_ceiling", "sam_reuse", "lookahead_alpha", "ema_decay",
                     "average_width", "calibrate_threshold"):
            value = getattr(self, name)
            if _is_bool(value) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is invalid: it must be a finite number.")
        for name in ("rho", "noise", "sam_rho", "sam_reuse"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name}={value!r} is invalid: it must be a number >= 0 (0 turns it off).")
        # Step counts: integers (not bools, not floats) at or above their smallest value.
        for name, low, note in (("sam_warmup", 0, " (0 = off)"), ("sam_every", 1, " (1 = every step)"),
                                ("lookahead_k", 0, " (0 = off)"), ("average_every", 1, ""),
                                ("max_skips", 1, "")):
            value = getattr(self, name)
            if _is_bool(value) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {low}{note}.")
        if not 0.0 <= self.sam_lr_fraction <= 1.0:
            raise ValueError(
                f"sam_lr_fraction={self.sam_lr_fraction!r} is invalid: it must lie in [0, 1] (0 = SAM at every LR)."
            )
        if not 0.0 < self.sam_lr_ceiling <= 1.0:
            raise ValueError(
                f"sam_lr_ceiling={self.sam_lr_ceiling!r} is invalid: it must lie in (0, 1] (1 = SAM at every LR)."
            )
        if self.sam_lr_fraction > self.sam_lr_ceiling:
            raise ValueError(
                f"sam_lr_fraction={self.sam_lr_fraction!r} > sam_lr_ceiling={self.sam_lr_ceiling!r} leaves no LR "
                "at which SAM runs: SAM runs while lr / max lr lies in [sam_lr_fraction, sam_lr_ceiling]."
            )
        if not 0.0 < self.lookahead_alpha <= 1.0:
            raise ValueError(f"lookahead_alpha={self.lookahead_alpha!r} is invalid: it must lie in (0, 1].")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} is invalid: it must lie in [0, 1), e.g. 0.999.")
        if self.average not in (None, "ema", "power", "phase"):
            raise ValueError(f"average={self.average!r} is invalid: use None, 'ema', 'power' or 'phase'.")
        if not 0.0 < self.average_width < 0.28:
            raise ValueError(
                f"average_width={self.average_width!r} is invalid: it must lie in (0, 0.28), e.g. 0.05."
            )
        if self.average_restart and self.average is None:
            raise ValueError(
                "average_restart=True is invalid without averaging: also pass average='ema' or "
                "average='phase'."
            )
        if not 0.0 < self.calibrate_threshold < 1.0:
            raise ValueError(
                f"calibrate_threshold={self.calibrate_threshold!r} is invalid: it must lie in (0, 1), e.g. 1e-3."
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
    # schedule anneals the LR to zero; folded in every 4th step for the cost.
    "default": Settings(dropout_match=True, average="power", average_width=0.05, average_follows_lr=True,
                        average_every=4),
    # Up to 2x: exact SAM (rho 0.05, Foret et al.'s CIFAR value) through step(closure).
    # Its radius ramps up over the first 1,000 steps: at full radius from step 0, SAM left
    # the seed's 13-layer MLP at chance on 2 of 3 seeds (its last hidden layer died while
    # the loss was still on its initial plateau); with the ramp all three train. Within
    # noise at 20 epochs; at 100 epochs, where SGD overfits, +1.81 points on that net
    # (4 seeds) and +0.55 on the seed's net 5 (2 seeds: +1.02, +0.08).
    "thorough": Settings(sam_rho=0.05, sam_warmup=1000, dropout_match=True),
    # The safety nets only; stays so when the default grows (A/B of other mechanisms).
    "safe": Settings(),
}


def resolve(recipe: str, overrides: dict) -> Settings:
    """The settings of ``recipe`` with ``overrides`` applied and validated.

    Example:
        >>> resolve("safe", {"rho": 0.05}).rho
        0.05
        >>> resolve("default", {"rhoo": 0.05})
        Traceback (most recent call last):
        ...
        ValueError: unknown override(s) rhoo; valid overrides: adaptive, ...
    """
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is unknown; valid recipes: {', '.join(sorted(RECIPES))}.")
    valid = {f.name for f in fields(Settings)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"unknown override(s) {', '.join(unknown)}; valid overrides: {', '.join(sorted(valid))}."
        )
    return replace(RECIPES[recipe], **overrides).validate()
