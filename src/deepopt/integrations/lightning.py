"""Lightning: ``Trainer(callbacks=[DeepOpt()])`` trains an unchanged LightningModule with deepopt.

What the callback does, and where:

* ``on_fit_start`` (after the strategy built the optimizers from ``configure_optimizers``,
  before a checkpoint's optimizer state is restored): wraps the optimizer with
  :func:`deepopt.activate` and puts the wrapper in ``trainer.strategy.optimizers`` (Lightning
  re-wraps it in a ``LightningOptimizer``). LR schedulers keep pointing at the original
  optimizer, whose ``param_groups`` the wrapper shares. Resuming (``fit(ckpt_path=...)``)
  then loads deepopt's state from the optimizer state, which carries it.
* Training batches run at the perturbed weights, validation/test/predict batches at the
  evaluation weights, whether ``training_step`` calls ``self(x)`` or a submodule.
* Checkpoints (``ModelCheckpoint``, ``Trainer.save_checkpoint``): ``checkpoint["state_dict"]``
  holds the evaluation weights, as ``state_dict()`` does in either mode (:mod:`deepopt.checkpoint`),
  so the best checkpoint holds the weights whose validation score picked it, and
  ``load_from_checkpoint`` and ``test(ckpt_path=...)`` use them; the training weights and the
  average are in ``checkpoint["optimizer_states"]``, and ``fit(ckpt_path=...)`` resumes exactly.

Works with ``accumulate_grad_batches`` (one perturbation and one average update per
optimizer step), ``gradient_clip_val``, schedulers from ``configure_optimizers`` and
``precision="bf16-mixed"``. One optimizer per LightningModule.

Two-pass SAM (``recipe="thorough"``, a ``budget``) runs through the closure Lightning passes to
``optimizer.step``: its ``training_step`` and ``backward``, then Lightning's clipping. With
``accumulate_grad_batches=k`` that closure holds only the step's last micro-batch (the
earlier ones ran before the step, into ``.grad``), so SAM's pass at ``w + e`` would have
taken the gradient of one micro-batch of ``k``, divided by ``k``. The callback therefore
runs the window's earlier micro-batches (``training_step``, the loss divided by ``k``,
``backward``, under ``no_sync`` when data parallel) before Lightning's closure on that
pass, so both passes take the gradient of the same ``k`` micro-batches.

Example:
    >>> import lightning.pytorch as pl                       # doctest: +SKIP
    >>> from deepopt.integrations.lightning import DeepOpt    # doctest: +SKIP
    >>> trainer = pl.Trainer(max_epochs=5, callbacks=[DeepOpt(rho=0.05, average="ema")])  # doctest: +SKIP
    >>> trainer.fit(model, train_loader, val_loader)          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "deepopt.integrations.lightning needs Lightning: pip install 'deepopt[lightning]'"
    ) from e

from ..activate import activate, deactivate
from ..optimizer import DeepOptimizer
from ..recipes import resolve

__all__ = ["DeepOpt"]


class DeepOpt(pl.Callback):
    """Lightning callback that trains with deepopt; takes :func:`deepopt.activate`'s arguments.

    Args:
        recipe: ``"default"``, ``"thorough"`` or ``"safe"`` (see :data:`deepopt.RECIPES`).
        enabled: ``False`` leaves training untouched, for A/B runs.
        **overrides: fields of :class:`deepopt.Settings`, e.g. ``rho=0.05, average="ema"``.

    Attributes:
        optimizer: the :class:`~deepopt.DeepOptimizer` of the current fit (``None`` before).

    Note:
        Start-up calibration measures the LightningModule's own ``forward``: it runs when
        ``training_step`` calls ``self(...)``; otherwise it is skipped with a warning.
        With ``recipe="thorough"`` Lightning's closure, hence ``training_step``, runs twice
        per optimizer step once the LR has fallen to a tenth of its peak (exact two-pass SAM).
    """

    def __init__(self, recipe: str = "default", enabled: bool = True, **overrides: Any) -> None:
        resolve(recipe, overrides)  # a typo fails here, not at fit time
        self.recipe = recipe
        self.enabled = enabled
        self.overrides = overrides
        self.optimizer: DeepOptimizer | None = None
        self._module: pl.LightningModule | None = None
        self._trainer: pl.Trainer | None = None
        self._window: list[tuple[Any, int]] | None = None  # SAM + accumulation: (batch, batch_idx) since the last step

    # -- wrapping ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap the optimizer built from ``configure_optimizers`` (before state restore)."""
        if not self.enabled:
            return
        if self.optimizer is not None and self._module is not None:
            deactivate(self._module, self.optimizer)  # a new fit builds new optimizers
            self.optimizer = None
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"DeepOpt supports one optimizer per LightningModule; configure_optimizers "
                f"returned {len(optimizers)}. Return a single optimizer (param groups may differ), "
                "or use deepopt.activate on one of them by hand."
            )
        base = optimizers[0]
        if isinstance(base, LightningOptimizer):
            base = base.optimizer
        _, wrapped = activate(pl_module, base, recipe=self.recipe, enabled=True, **self.overrides)
        assert isinstance(wrapped, DeepOptimizer)
        total = trainer.estimated_stepping_batches  # inf for an open-ended fit
        wrapped.total_steps = int(total) if math.isfinite(total) else None  # where a budget spends
        trainer.strategy.optimizers = [wrapped]  # Lightning wraps it in a LightningOptimizer
        self.optimizer, self._module, self._trainer = wrapped, pl_module, trainer
        self._window = None
        if wrapped.mechanism("sam") is not None and trainer.accumulate_grad_batches > 1 and not wrapped.closure_driven:
            self._window = []
            step = wrapped.step
            wrapped.step = lambda closure=None, **kwargs: self._step_over_window(step, closure, **kwargs)  # type: ignore[method-assign]

    # -- SAM with gradient accumulation --------------------------------------------------------
    def _step_over_window(self, step: Callable[..., Any], closure: Callable[[], Any] | None, **kwargs: Any) -> Any:
        """``step(closure)`` where every call of the closure after the first (SAM's pass at
        ``w + e``, after deepopt cleared ``.grad``) first runs the window's earlier micro-batches."""
        earlier, self._window = (self._window or [])[:-1], []
        if closure is None or not earlier:
            return step(closure, **kwargs)
        calls = 0

        def whole_window() -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                self._backward(earlier)
            return closure()

        return step(whole_window, **kwargs)

    def _backward(self, batches: list[tuple[Any, int]]) -> None:
        """``training_step`` and ``backward`` of ``batches`` as Lightning's loop runs them
        while it accumulates (the loss divided by ``accumulate_grad_batches``, no gradient sync)."""
        trainer = self._trainer
        assert trainer is not None
        strategy = trainer.strategy
        block_sync = getattr(strategy, "block_backward_sync", contextlib.nullcontext)
        for batch, batch_idx in batches:
            with block_sync():
                out = strategy.training_step(batch, batch_idx)
                loss = out.get("loss") if isinstance(out, Mapping) else out
                if loss is not None:
                    strategy.backward(loss / trainer.accumulate_grad_batches, self.optimizer)

    # -- views ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        """Show the perturbed weights, also to ``training_step``s that never call ``self(...)``."""
        opt = self.optimizer
        if opt is not None and self._calibration_pending() is None:  # else the first self(...) calibrates first
            opt.show("perturbed")
        if self._window is not None:
            self._window.append((batch, batch_idx))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Give up calibrating if the first batch never went through the module's ``forward``."""
        calibration = self._calibration_pending()
        if calibration is not None:
            calibration.calibrated = False
            rank_zero_warn(
                "deepopt: start-up calibration skipped because training_step did not call the "
                "LightningModule itself (self(x)); the other mechanisms are active."
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leave the training weights in place."""
        if self.optimizer is not None:
            self.optimizer.show("train")

    def _show_eval(self, *_: Any) -> None:
        """Show the evaluation weights (validation, test and predict batches)."""
        if self.optimizer is not None:
            self.optimizer.show("eval")

    on_validation_batch_start = _show_eval
    on_test_batch_start = _show_eval
    on_predict_batch_start = _show_eval

    def _calibration_pending(self) -> Any:
        """The calibration mechanism while it waits for the module's first forward, else ``None``."""
        calibration = None if self.optimizer is None else self.optimizer.mechanism("calibrate")
        return calibration if calibration is not None and calibration.calibrated is None else None
