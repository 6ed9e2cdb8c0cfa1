"""Hugging Face ``transformers``: ``Trainer(..., callbacks=[DeepOpt()])`` trains with deepopt.

How it fits the Trainer's design:

* The Trainer builds its optimizer (``create_optimizer``), wraps it with accelerate
  (``AcceleratedOptimizer``) and, when resuming, loads ``optimizer.pt`` into it, all
  *before* the first callback event that sees the optimizer, ``on_train_begin``. There the
  callback wraps the optimizer inside the ``AcceleratedOptimizer`` with
  :func:`deepopt.activate`, so every ``step``/``zero_grad``/``state_dict`` of the Trainer
  goes through deepopt; the LR scheduler keeps the shared ``param_groups``.
* ``optimizer.pt`` of every checkpoint carries deepopt's state. Since the Trainer loaded it
  before the callback ran, the callback reads deepopt's part itself from the checkpoint
  being resumed: ``args.resume_from_checkpoint`` if set, else
  ``<output_dir>/checkpoint-<global step>`` (what ``resume_from_checkpoint=True`` picks).
  A checkpoint elsewhere cannot be seen by a callback: deepopt's state then restarts,
  with a warning (the model and the base optimizer still resume).
* The model's forward hooks show the perturbed weights in training and the evaluation
  weights in ``evaluate()``/``predict()`` (the Trainer puts the model in eval mode).
* With weight averaging, saved models (checkpoints, ``save_model()``, the model
  ``load_best_model_at_end`` picks by its eval metric) hold the evaluation weights, as
  ``state_dict()`` does in either mode (:mod:`deepopt.checkpoint`); the training weights
  travel in ``optimizer.pt``, so ``train(resume_from_checkpoint=...)`` resumes exactly.

Example:
    >>> from transformers import Trainer, TrainingArguments           # doctest: +SKIP
    >>> from deepopt.integrations.huggingface import DeepOpt           # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=TrainingArguments("out"), train_dataset=train,
    ...                   callbacks=[DeepOpt(rho=0.05, average="ema")])  # doctest: +SKIP
    >>> trainer.train(); trainer.evaluate()                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.utils import logging
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "deepopt.integrations.huggingface needs transformers and accelerate: "
        "pip install 'deepopt[huggingface]'"
    ) from e

from ..activate import activate
from ..optimizer import DeepOptimizer
from ..recipes import resolve

__all__ = ["DeepOpt"]

logger = logging.get_logger(__name__)

OPTIMIZER_NAME = "optimizer.pt"
TRAINER_STATE_NAME = "trainer_state.json"


class DeepOpt(TrainerCallback):
    """Trainer callback that trains with deepopt; takes :func:`deepopt.activate`'s arguments.

    Args:
        recipe: ``"default"``, ``"thorough"`` or ``"safe"`` (see :data:`deepopt.RECIPES`).
        enabled: ``False`` leaves training untouched, for A/B runs.
        **overrides: fields of :class:`deepopt.Settings`, e.g. ``rho=0.05, average="ema"``.

    Attributes:
        optimizer: the :class:`~deepopt.DeepOptimizer` of the current ``train()`` (``None`` before).

    Note:
        The Trainer never passes a closure to ``step``; with ``recipe="thorough"`` two-pass
        SAM runs without one when the model returns its loss (the usual case: a model given
        labels), else deepopt says why in one line. DeepSpeed/FSDP setups are not supported.
    """

    def __init__(self, recipe: str = "default", enabled: bool = True, **overrides: Any) -> None:
        resolve(recipe, overrides)  # a typo fails here, not at train time
        self.recipe = recipe
        self.enabled = enabled
        self.overrides = overrides
        self.optimizer: DeepOptimizer | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        """Wrap the Trainer's optimizer; when resuming, restore deepopt's state."""
        if not self.enabled:
            return
        if model is None or optimizer is None:
            raise ValueError("DeepOpt needs the Trainer's model and optimizer at on_train_begin.")
        holder, base = _unwrap(optimizer)
        if isinstance(base, DeepOptimizer):
            self.optimizer = base  # a second train() on the same Trainer
            base.total_steps = state.max_steps or None
            return
        if holder is None:
            raise ValueError(
                f"DeepOpt cannot install itself: the Trainer's optimizer is a {type(optimizer).__name__} "
                "that does not hold a torch optimizer in .optimizer (DeepSpeed?). Build the optimizer "
                "yourself with deepopt.activate and pass Trainer(optimizers=(optimizer, None)) instead."
            )
        _, wrapped = activate(model, base, recipe=self.recipe, enabled=True, **self.overrides)
        assert isinstance(wrapped, DeepOptimizer)
        _install(holder, wrapped)
        self.optimizer = wrapped
        wrapped.total_steps = state.max_steps or None  # where a budget spends its SAM steps
        if state.global_step > 0:
            self._resume(args, state)

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        assert self.optimizer is not None
        folder = _checkpoint_folder(args, state)
        if folder is None:
            logger.warning(
                "deepopt: resuming at step %d but no checkpoint of that step was found in "
                "args.resume_from_checkpoint or args.output_dir; deepopt's state (averages, "
                "perturbation, calibration) restarts.", state.global_step)
            return
        saved = torch.load(os.path.join(folder, OPTIMIZER_NAME), map_location="cpu", weights_only=True)
        if "deepopt" in saved:
            self.optimizer.load_state_dict(saved)


def _unwrap(optimizer: Any) -> tuple[Any, torch.optim.Optimizer | None]:
    """(innermost holder, innermost optimizer) through ``.optimizer`` wrappers (accelerate)."""
    holder, inner = None, optimizer
    while not isinstance(inner, DeepOptimizer) and isinstance(getattr(inner, "optimizer", None),
                                                             torch.optim.Optimizer):
        holder, inner = inner, inner.optimizer
    return holder, inner if isinstance(inner, torch.optim.Optimizer) else None


def _install(holder: Any, wrapped: DeepOptimizer) -> None:
    """Put ``wrapped`` inside accelerate's optimizer wrapper, step patches included."""
    holder.optimizer = wrapped
    if getattr(holder, "scaler", None) is not None and hasattr(holder, "_optimizer_original_step_method"):
        # accelerate's fp16 path swaps optimizer.step for a patched copy captured at prepare
        # time; capture them again, from the wrapper, or steps would bypass deepopt.
        from accelerate.optimizer import patch_optimizer_step

        holder._optimizer_original_step_method = wrapped.step
        holder._optimizer_patched_step_method = patch_optimizer_step(holder, wrapped.step)


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str | None:
    candidates = []
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.append(args.resume_from_checkpoint)
    candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
    for folder in candidates:
        try:
            with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
                step = json.load(f).get("global_step")
        except (OSError, ValueError):
            continue
        if step == state.global_step and os.path.isfile(os.path.join(folder, OPTIMIZER_NAME)):
            return folder
    return None
