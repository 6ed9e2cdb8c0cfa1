"""The seed6 training loop (protocol/seed6.md) on CPU, and its JSON-lines result rows.

One loop for every mode of :data:`MODES`: ``classical``, deepopt's recipes (``deepopt``,
``deepopt-thorough``) and the peers a user would pick instead, each as its authors ship
it: exact two-pass SAM (:func:`sam_step`), SWA and EMA by ``torch.optim.swa_utils``, and
``sam-equal-time``, SAM at the wall-clock of a 1x-cost run.

Speed (profiled 2026-11-22 on this box: 2 vCPU AMD EPYC with AVX-512, torch 2.13 CPU,
oneDNN 3.12; a few hundred SGD steps on the real data; s/epoch = 782 steps x ms/step,
evaluation excluded). Other benchmark jobs kept ~1.5 cores busy during most runs, so
"cpu" (this process's CPU ms/step) is the steadier figure; "quiet" = machine otherwise idle.

    net  quiet, 2 thr     loaded, 1 thr     loaded, 2 thr     torch.compile (1 thr)
    5    5.0 ms (3.9 s)   cpu 9.5           cpu 10.5          cpu 9.7, compile 35 s
    6    3.0 ms (2.4 s)   cpu 5.0           cpu 5.8           cpu 5.5, compile 17 s
    1    10.6 ms (8.3 s)  cpu 13-15         cpu 20, wall 46   cpu 17.3, compile 29 s
    4    -                cpu 135-139       cpu 175, wall 338 cpu 143, compile 67 s
         (net 4: ~106 s/epoch on one full core; eval of the 10k test images 18-27 s loaded)

- 2 threads barely beat 1 on a quiet machine (net 1: 10.6 vs <= 10.5 ms/step), and
  under load libgomp's spin-waiting makes them 8-15x slower (net 1: 203-241 ms/step vs
  16-31) unless OMP_WAIT_POLICY=PASSIVE is set before torch is imported (39 ms/step).
  Best throughput on this box: two runs in parallel, one thread each
  (``torch.set_num_threads(1)``); with 2 threads per run, export OMP_WAIT_POLICY=PASSIVE.
  Net 4 is the exception that costs nothing (AVX2 box, 2026-11-30, with ``SeedConv2d``):
  one run on two threads as the only job trains an epoch in 206-222 s, two one-thread
  runs side by side in 398-430 s each: the same throughput, and the first run lands
  sooner. Net 3: 130 s on two threads alone, ~200 s each side by side (1.3x in favour of
  pairs).
- channels_last (model + data): net 1 cpu -6..-8%, net 4 -12% once and +6% once (noise
  level), 2 threads worse. Not used: no robust gain, and channels_last parameters break
  ``p.view(-1)`` / ``parameters_to_vector`` in mechanisms.
- torch.compile: no gain on the MLPs, 30% slower on net 1, plus 17-67 s compile per run.
  Not used.
- oneDNN (``torch.backends.mkldnn``): disabling it makes net 1 ~4x slower (91 vs 23 ms/step,
  same load); ``deterministic=True`` costs nothing measurable (cpu 11.9 vs 12-15) and is not
  needed; ``fp32_precision="bf16"`` (cpu 11.3) changes the numerics, so not used.
- Nets 2 and 3 (profiled 2026-11-30 on a 2 vCPU AMD EPYC with AVX2, idle, synthetic
  batches): oneDNN's convolution backward dominates, and on the tiny maps at the end of
  the conv stacks it is pathological (net 3's 512 -> 1024 conv on 2 x 2: 292 ms of
  backward and 56 of forward in a 519 ms step, two thirds of the step in that one layer).
  :class:`~benchmarks.nets.SeedConv2d` computes outputs of at most 2 x 2 pixels as
  one matrix product: net 3 519 -> 203 ms/step on one thread (131 on two), net 4
  ~400 -> ~355, net 1 ~34 -> ~32 (the MLPs, nets 5 and 6, have no conv). Same
  convolution, other summation order, so conv-net runs from before it (all of net 1's
  and net 4's seed-1 pair; git commit in each row) and after it differ in the last bits;
  both runs of every pair use one code.
- Every configuration tried (1/2 threads, channels_last, compile) gave bit-identical
  weights for two runs of the same seed. Chosen: eager fp32, NCHW, oneDNN on (defaults);
  the thread count is the caller's and is recorded in each row.

Example::

    from benchmarks.data import load_cifar10
    from benchmarks.train import append_row, finished, run

    data = load_cifar10("../shared/data/cifar10-jpeg.tar")
    if (5, "classical", 0, 20) not in finished("runs/seed6.jsonl"):
        append_row("runs/seed6.jsonl", run(5, "classical", 0, 20, data))
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Collection, Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.nets import build_net

__all__ = [
    "BATCH_SIZE",
    "EMA_DECAY",
    "EVAL_BATCH_SIZE",
    "LR",
    "MODES",
    "MOMENTUM",
    "SAM_RHO",
    "SWA_START",
    "WEIGHT_DECAY",
    "append_row",
    "current_settings",
    "evaluate",
    "finished",
    "finished_rows",
    "inert_settings",
    "is_current",
    "milestones",
    "run",
    "sam_step",
    "trained_epochs",
]

# The protocol's fixed settings (seed6.md, "Training (classical)").
LR = 1e-2
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BATCH_SIZE = 64
EVAL_BATCH_SIZE = 1000
_LR_DROPS = (0.3, 0.6, 0.8)  # LR x0.1 at these fractions of the epoch budget

Data = Sequence[torch.Tensor]

# The peers' settings, as their authors publish them.
SAM_RHO = 0.05  # SAM (Foret et al. 2021): rho 0.05, their CIFAR value and davda54/sam's default
SWA_START = 0.75  # SWA averages the epoch-end weights from 75% of the budget on
EMA_DECAY = 0.999  # torch.optim.swa_utils.get_ema_multi_avg_fn's default

#: The seed6 modes (``python -m benchmarks seed6``): name -> what the loop does. Model, loss,
#: optimizer, batch size, data order and LR schedule shape are the same in all of them.
MODES: dict[str, str] = {
    "classical": "the protocol's plain SGD loop",
    "deepopt": "deepopt.activate(model, optimizer) with recipe 'default'",
    "deepopt-thorough": "the thorough recipe before budget (the default plus two-pass SAM, rho 0.05 "
    "ramped over 1,000 steps, on every step once the LR is at most a tenth of its peak) and "
    "optimizer.step(closure)",
    "deepopt-budget-1.25": "deepopt.activate(..., budget=1.25) and optimizer.step(closure)",
    "deepopt-budget-1.5": "deepopt.activate(..., budget=1.5) and optimizer.step(closure)",
    "deepopt-budget-2": "deepopt.activate(..., budget=2) and optimizer.step(closure)",
    "sam": f"exact two-pass SAM, rho {SAM_RHO} (benchmarks.train.sam_step, not deepopt)",
    "swa": "torch.optim.swa_utils SWA: AveragedModel of the epoch-end weights from "
    f"{SWA_START:.0%} of the budget on, update_bn, the average evaluated",
    "ema": f"torch.optim.swa_utils EMA (decay {EMA_DECAY}, weights and buffers, every step), "
    "the average evaluated",
    "sam-equal-time": "sam for half the epoch budget (a SAM step costs two passes), so its "
    "wall-clock matches the 1x-cost deepopt run of the full budget",
}

# The deepopt modes: keyword arguments of deepopt.activate ("closure" is the loop's own key).
_ACTIVATIONS: dict[str, dict] = {
    "deepopt": {"recipe": "default"},
    # Written in the knobs of its time: legacy_kwargs makes it the default + TwoPassSAM(...).
    "deepopt-thorough": {"recipe": "thorough", "sam_lr_ceiling": 0.1, "closure": True},
    # The loop's F.cross_entropy cannot be replayed: a closure, bit for bit what replay gives
    # a CrossEntropyLoss module (tests/test_sam_replay.py).
    "deepopt-budget-1.25": {"recipe": "default", "budget": 1.25, "closure": True},
    "deepopt-budget-1.5": {"recipe": "default", "budget": 1.5, "closure": True},
    "deepopt-budget-2": {"recipe": "default", "budget": 2.0, "closure": True},
}
# Modes that hold the same budget at half the epochs: trained epochs = this x the budget.
_EQUAL_TIME = {"sam-equal-time": 0.5}


def trained_epochs(mode: str, epochs: int) -> int:
    """Epochs ``mode`` trains on a budget of ``epochs``: the budget, or half of it
    (rounded half up, at least 1) for an equal-wall-clock mode such as ``sam-equal-time``.
    """
    if mode in _EQUAL_TIME:
        return max(1, int(_EQUAL_TIME[mode] * epochs + 0.5))
    return epochs


def milestones(epochs: int) -> list[int]:
    """Epochs after which the LR is divided by 10: ``round(f * epochs)`` for f in 0.3, 0.6, 0.8.

    1,000 epochs give ``[300, 600, 800]`` as in the original; 20 give ``[6, 12, 16]``.
    """
    return [round(f * epochs) for f in _LR_DROPS]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE
) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in percent, in eval mode, without gradients.

    The model's train/eval mode is restored afterwards.

    Args:
        model: the classifier; its output's argmax over dim 1 is the prediction.
        x: inputs, ``N x ...``.
        y: integer labels, ``N``.
        batch_size: evaluation batch size (default 1000).
    """
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, len(x), batch_size):
            correct += int(
                (model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum()
            )
    finally:
        model.train(was_training)
    return 100.0 * correct / len(x)


def run(
    net: int,
    mode: str,
    seed: int,
    epochs: int,
    data: Data,
    *,
    activate_kwargs: dict | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> dict:
    """Train seed network ``net`` on a budget of ``epochs`` epochs under the seed6 protocol.

    Model, loss, optimizer (SGD lr 1e-2, momentum 0.9, weight decay 5e-4), batch
    size 64, per-epoch reshuffle and LR schedule shape (x0.1 at :func:`milestones`
    of the epochs trained) are the same in every mode. The same ``seed`` gives the
    same initialisation (``torch.manual_seed`` before
    :func:`~benchmarks.nets.build_net`) and the same data order (a separate
    ``torch.Generator``) in every mode.

    Modes (:data:`MODES`):

    - ``classical``: the plain loop.
    - ``deepopt`` / ``deepopt-thorough``: one ``deepopt.activate`` call with recipe
      ``default`` / ``thorough``; the thorough run steps with ``optimizer.step(closure)``.
    - ``sam``: exact two-pass SAM, rho 0.05, by :func:`sam_step` (a reference
      implementation, not deepopt).
    - ``swa``: ``torch.optim.swa_utils.AveragedModel`` of the epoch-end weights from the
      epoch at :data:`SWA_START` of the budget on; from then on the average is
      evaluated, after ``update_bn``.
    - ``ema``: ``AveragedModel`` with ``get_ema_multi_avg_fn(EMA_DECAY)`` over weights and
      buffers, updated after every step; the average is evaluated.
    - ``sam-equal-time``: ``sam`` for half the epochs (:func:`trained_epochs`), the
      wall-clock of one 1x-cost run of the full budget. The row's ``epochs`` is the
      number trained and ``budget_of`` the nominal budget it stands in for.

    The ablation's labels: a mode outside :data:`MODES` given ``activate_kwargs`` is
    one ``deepopt.activate(model, optimizer, **activate_kwargs)`` call, the label only
    recorded. ``classical`` with ``activate_kwargs={"closure": True}`` is the plain
    loop through ``optimizer.step(closure)``; for ``deepopt``/``deepopt-thorough``
    the given kwargs replace the recipe's keys.

    Args:
        net: seed network, 1..6.
        mode: a :data:`MODES` name, or an ablation label with ``activate_kwargs``.
        seed: initialisation and data-order seed.
        epochs: epoch budget; sets the LR drops (of the epochs trained).
        data: ``(x_train, y_train, x_test, y_test)`` tensors, as from
            :func:`benchmarks.data.load_cifar10`.
        activate_kwargs: keyword arguments of ``deepopt.activate``; default none.
            The extra key ``"closure": True`` (removed before the call) makes the
            loop pass a closure that recomputes the loss to ``optimizer.step``.
        progress: show a tqdm bar over epochs.
        checkpoint: file for the state after each epoch (model, optimizer, scheduler,
            averages, both RNGs, the per-epoch figures); if it exists the run continues
            from it, bit-identically, so a killed run loses at most one epoch.

    Threads are not set here: call ``torch.set_num_threads`` first (see the speed
    note at the top of this module: one thread per run, two runs in parallel, is
    the fastest on a 2-core machine).

    Returns:
        The result row: ``net, mode, seed, epochs`` (epochs trained); ``test_acc``
        (percent, after each epoch, of the evaluated model: the average for
        ``swa``/``ema``), ``final_test_acc``, ``max_test_acc``; ``train_loss`` (mean
        training loss of each epoch, at the trained weights); ``sec_per_epoch`` (mean
        training time per epoch, evaluation and ``update_bn`` excluded) and
        ``cpu_sec_per_epoch`` (the same in process CPU time, which other jobs on the
        machine do not inflate; kept in the checkpoint, so it spans resumes, except epochs
        from a checkpoint written before the field existed); ``settings``
        (``activate_kwargs`` as given, or the mode's settings); for a deepopt run
        ``resolved`` (every deepopt setting the recipe and overrides gave); ``torch``
        (version), ``git_commit``, ``threads``, ``cpu`` (model and vector extension); and
        for an equal-time mode ``budget_of``.

    Raises:
        ValueError: ``epochs < 1``, ``net`` not in 1..6, an unknown mode without
            ``activate_kwargs``, or ``activate_kwargs`` for a peer (sam/swa/ema) or
            ``classical`` with keys other than ``closure``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: pass a positive integer number of epochs")
    x_train, y_train, x_test, y_test = data
    n_epochs = trained_epochs(mode, epochs)
    kind, settings = _resolve(mode, activate_kwargs, n_epochs)
    kwargs = dict(settings) if kind == "activate" else {}
    kwargs.pop("closure", None)
    use_closure = kind in ("activate", "classical") and bool(settings.get("closure", False))

    torch.manual_seed(seed)
    model = build_net(net)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    if kind == "activate":
        import deepopt  # only activated runs depend on the framework
        from deepopt.experimental import legacy_kwargs  # the ablation's rows use 0.1's knobs

        model, optimizer = deepopt.activate(model, optimizer, **legacy_kwargs(kwargs))
    # The protocol's schedule in every mode, SWA included: SWA's authors pair it with a
    # constant or cyclic LR (SWALR), but the seed6 schedule is fixed by the protocol (the
    # same in every mode), so SWA here averages along it, without SWALR.
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones(n_epochs), gamma=0.1)
    swa_utils = torch.optim.swa_utils
    averaged: swa_utils.AveragedModel | None = None
    if kind == "ema":
        averaged = swa_utils.AveragedModel(
            model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True
        )
    elif kind == "swa":
        averaged = swa_utils.AveragedModel(model)
    swa_start = settings.get("swa_start_epoch", 0)
    order = torch.Generator().manual_seed(seed)

    from deepopt.progress import progress_bar

    test_acc: list[float] = []
    train_loss: list[float] = []
    train_sec: list[float] = []
    train_cpu_sec: list[float] = []  # process CPU time: what other jobs on the machine do not inflate
    first = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        order.set_state(state["order"])
        torch.set_rng_state(state["rng"])
        test_acc, train_loss, train_sec = state["test_acc"], state["train_loss"], state["train_sec"]
        train_cpu_sec = state.get("train_cpu_sec", [])  # absent from checkpoints of older versions
        first = len(test_acc)
    n = len(x_train)
    bar = progress_bar(range(first, n_epochs), desc=f"net{net} {mode} s{seed}", enabled=progress,
                       initial=first, total=n_epochs, unit="epoch")
    for epoch in bar:
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        perm = torch.randperm(n, generator=order)
        loss_sum = 0.0
        for i in range(0, n, BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            xb, yb = x_train[idx], y_train[idx]
            if kind == "sam":
                loss = sam_step(model, optimizer, xb, yb, rho=SAM_RHO)
            elif use_closure:
                loss = _step_with_closure(model, optimizer, xb, yb)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
            if kind == "ema":
                averaged.update_parameters(model)  # type: ignore[union-attr]
            loss_sum += float(loss.detach()) * len(idx)
        scheduler.step()
        evaluated: nn.Module = model
        if kind == "swa" and epoch >= swa_start:
            averaged.update_parameters(model)  # type: ignore[union-attr]
            evaluated = averaged  # type: ignore[assignment]
        elif kind == "ema":
            evaluated = averaged  # type: ignore[assignment]
        train_sec.append(time.perf_counter() - t0)
        train_cpu_sec.append(time.process_time() - c0)
        if kind == "swa" and evaluated is averaged:
            # BatchNorm statistics of the averaged weights, as SWA's recipe does before
            # using them (a no-op for the BN-free seed nets; kept for fidelity). Not
            # counted as training time: it is needed here only because every epoch is
            # evaluated.
            swa_utils.update_bn(
                (x_train[j : j + BATCH_SIZE] for j in range(0, n, BATCH_SIZE)), averaged
            )
        train_loss.append(loss_sum / n)
        test_acc.append(evaluate(evaluated, x_test, y_test))
        bar.set_postfix(acc=f"{test_acc[-1]:.2f}", loss=f"{train_loss[-1]:.3f}")
        if checkpoint is not None:
            _save_atomic(checkpoint, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "averaged": None if averaged is None else averaged.state_dict(),
                "order": order.get_state(), "rng": torch.get_rng_state(),
                "test_acc": test_acc, "train_loss": train_loss, "train_sec": train_sec,
                "train_cpu_sec": train_cpu_sec,
            })
    bar.close()

    row = {
        "net": net,
        "mode": mode,
        "seed": seed,
        "epochs": n_epochs,
        "test_acc": test_acc,
        "final_test_acc": test_acc[-1],
        "max_test_acc": max(test_acc),
        "train_loss": train_loss,
        "sec_per_epoch": sum(train_sec) / len(train_sec),
        "cpu_sec_per_epoch": sum(train_cpu_sec) / len(train_cpu_sec) if train_cpu_sec else None,
        "settings": settings,
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "cpu": _cpu(),
        "threads": torch.get_num_threads(),
    }
    resolved = getattr(optimizer, "settings", None)
    if resolved is not None:  # what the recipe meant when this row was run
        row["resolved"] = resolved.as_dict()
        sam = optimizer.mechanism("sam")
        if sam is not None:  # how many steps took two passes: the measured share of the budget
            row["two_pass_steps"], row["steps"] = sam.two_pass_steps, optimizer.steps
    if mode in _EQUAL_TIME:
        row["budget_of"] = epochs
    return row


def _resolve(mode: str, activate_kwargs: dict | None, n_epochs: int) -> tuple[str, dict]:
    """The loop's kind (classical, activate, sam, swa, ema) and the row's ``settings``."""
    given = None if activate_kwargs is None else dict(activate_kwargs)
    if mode == "classical":
        if given and set(given) - {"closure"}:
            raise ValueError(
                f"mode 'classical' takes no deepopt settings, got activate_kwargs={given!r}; "
                "only {'closure': True} (the plain loop through step(closure)) is allowed"
            )
        return "classical", given or {}
    if mode in _ACTIVATIONS:
        return "activate", {**_ACTIVATIONS[mode], **(given or {})}
    if mode in MODES:  # the peers: not deepopt, so no activate_kwargs
        if given is not None:
            raise ValueError(
                f"mode {mode!r} is a peer method, not a deepopt activation: pass no "
                f"activate_kwargs (got {given!r})"
            )
        if mode in ("sam", "sam-equal-time"):
            return "sam", {"rho": SAM_RHO}
        if mode == "swa":
            return "swa", {
                "swa_start_epoch": int(SWA_START * n_epochs),
                "update_bn": True,
                "swalr": False,
            }
        return "ema", {"ema_decay": EMA_DECAY, "use_buffers": True}
    if given is None:
        raise ValueError(
            f"mode={mode!r} is unknown: use one of {', '.join(MODES)}, or pass "
            "activate_kwargs to run a labelled deepopt activation"
        )
    return "activate", given


def sam_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    rho: float = SAM_RHO,
) -> torch.Tensor:
    """One exact SAM step (Foret et al., ICLR 2021); returns the loss at the weights ``w``.

    Reference implementation, written out here rather than taken from a package: SAM's
    authors ship no PyPI package (google-research/sam is JAX research code; the PyTorch
    port everyone uses, davda54/sam, is a file on GitHub, not on PyPI; third-party
    optimizer collections re-implement it). It follows davda54/sam's ``first_step`` /
    ``second_step`` and leaves deepopt out entirely:

    1. loss and gradient ``g`` at ``w``;
    2. ``e = rho * g / (||g|| + 1e-12)``, ``||g||`` the L2 norm over all parameters of
       ``optimizer`` (the loss gradient only: weight decay stays in the optimizer);
    3. loss and gradient at ``w + e``, BatchNorm running statistics left as they were
       after the first pass (all buffers saved and restored: davda54/sam's advice);
    4. ``w`` restored by copy and ``optimizer.step()`` with the gradient of step 3.

    Args:
        model: the network (in train mode).
        optimizer: the base optimizer over (some of) ``model``'s parameters.
        xb: input batch.
        yb: integer labels.
        rho: the neighbourhood radius.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    with torch.no_grad():
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            raise RuntimeError("sam_step: no parameter of the optimizer got a gradient")
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in with_grad]), p=2)
        scale = rho / (grad_norm + 1e-12)
        old = [p.detach().clone() for p in with_grad]
        for p in with_grad:
            p.add_(p.grad * scale)  # w + e
        buffers = [b.detach().clone() for b in model.buffers()]
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(xb), yb).backward()
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)  # the second pass does not count in the BN statistics
        for p, w in zip(with_grad, old, strict=True):
            p.copy_(w)  # back to w, keeping the gradient taken at w + e
    optimizer.step()
    return loss.detach()


def _save_atomic(path: str | Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _step_with_closure(
    model: nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor
) -> torch.Tensor:
    """One step through ``optimizer.step(closure)``; returns the loss of the first evaluation.

    The first closure call is the loss at the current weights (what the classical
    loop records); later calls (e.g. at perturbed weights) are not recorded.
    """
    first: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        if not first:
            first.append(loss.detach())
        return loss

    returned = optimizer.step(closure)
    if first:
        return first[0]
    if isinstance(returned, torch.Tensor):
        return returned.detach()
    raise RuntimeError("optimizer.step(closure) never called the closure, so no loss was computed")


@cache
def _cpu() -> str:
    """The CPU model and its widest vector extension: wall-clock figures compare only
    within one kind of machine (AVX-512 and AVX2 machines here differ ~1.5-2x per step)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    vector = next((v for v in ("avx512f", "avx2", "neon", "asimd") if v in flags), "")
    return f"{model}, {vector}" if vector else model


@cache
def _git_commit() -> str | None:
    """HEAD of the repository holding this file, with ``+dirty`` if tracked files changed."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def append_row(path: str | os.PathLike[str], row: dict) -> None:
    """Append ``row`` as one JSON line to ``path`` (parent folders created).

    The line is written with a single ``write`` and flushed to disk, so an
    interrupted runner leaves at most one truncated last line, which
    :func:`finished` ignores.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row) + "\n"
    with open(p, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line  # end a line cut off by a crash; do not glue onto it
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def current_settings(mode: str) -> dict | None:
    """What a seed6 deepopt mode's recipe resolves to now (``None`` for the other modes).

    Compared with a row's ``resolved`` to find runs of a recipe that has changed since.

    Example:
        >>> current_settings("deepopt-budget-1.5")["budget"], current_settings("sam")
        (1.5, None)
    """
    if mode not in _ACTIVATIONS:
        return None
    from deepopt.experimental import legacy_kwargs
    from deepopt.recipes import resolve

    kwargs = legacy_kwargs({k: v for k, v in _ACTIVATIONS[mode].items() if k != "closure"})
    kwargs.pop("mechanisms", None)  # not Settings: what the mode's name stands for
    return resolve(kwargs.pop("recipe"), kwargs).as_dict()


def _recipe_changed(resolved: dict, now: dict, inert: Collection[str] = ()) -> bool:
    """Whether a row's ``resolved`` settings differ from what its recipe resolves to now.

    A setting added to :class:`deepopt.Settings` after the row was written counts as its
    default, which reproduces the behaviour from before it existed: adding a knob does not
    make finished runs stale; turning it on in the recipe does, except on nets where the
    knob cannot act (``inert``, see :func:`inert_settings`).
    """
    defaults = _setting_defaults()
    return any(resolved.get(k, defaults.get(k)) != v for k, v in now.items() if k not in inert)


@cache
def inert_settings(net: int) -> frozenset[str]:
    """The settings that cannot change a run of seed net ``net``: its runs need no redoing for them.

    ``dropout_match`` acts only on nets with dropout (of the seed's six, net 2).

    Example:
        >>> sorted(inert_settings(1)), sorted(inert_settings(2))
        (['dropout_match'], [])
    """
    from deepopt.mechanisms.dropout_match import has_dropout

    with torch.random.fork_rng():  # building the net draws its init: leave the RNG alone
        dropout = has_dropout(build_net(net))
    return frozenset() if dropout else frozenset({"dropout_match"})


@cache
def _setting_defaults() -> dict:
    from dataclasses import fields

    from deepopt.recipes import Settings

    return {f.name: f.default for f in fields(Settings)}


def is_current(row: dict) -> bool:
    """Whether a seed6 row still describes its mode (``False`` for a recipe changed since).

    Rows of other modes, and ablation rows (which keep their own label and settings), are
    always current. Used by the runner (a stale run is redone) and by ``python -m benchmarks report``
    (a stale row is left out of the tables until its run is redone).

    Example:
        >>> is_current({"net": 6, "mode": "classical", "seed": 0, "epochs": 20})
        True
        >>> is_current({"net": 6, "mode": "deepopt", "seed": 0, "epochs": 20})  # before the average
        False
        >>> is_current({"net": 2, "mode": "deepopt", "seed": 0, "epochs": 20,
        ...             "resolved": {**current_settings("deepopt"), "dropout_match": False}})
        False
    """
    now = None if "mechanism" in row else current_settings(str(row.get("mode")))
    if now is None:
        return True
    # Rows began recording ``resolved`` before any recipe averaged: a row without it ran
    # with no average (the default's rows of nets 5 and 6 from 0.1 are such rows).
    resolved = row.get("resolved", {**now, "average": None})
    return not _recipe_changed(resolved, now, inert_settings(int(row["net"])))


def finished(path: str | os.PathLike[str]) -> set[tuple[int, str, int, int]]:
    """The ``(net, mode, seed, epoch budget)`` of every complete row in ``path``.

    The keys of :func:`finished_rows`.

    Example:
        >>> finished("no/such/file.jsonl")
        set()
    """
    return set(finished_rows(path))


def finished_rows(path: str | os.PathLike[str]) -> dict[tuple[int, str, int, int], dict]:
    """Every complete row in ``path``, by ``(net, mode, seed, epoch budget)``; the last wins.

    The budget is the row's ``budget_of`` where it has one (an equal-time run such as
    ``sam-equal-time`` trains fewer epochs than the budget it is run for), else its
    ``epochs``; so a runner asks for ``(net, mode, seed, budget)`` in every mode.
    A seed6 ``deepopt``/``deepopt-thorough`` row whose ``resolved`` settings differ from
    what its recipe resolves to now (:func:`current_settings`) does not count: the run is
    redone and ``python -m benchmarks report`` keeps the later row. A setting newer than the row counts
    as its default there. A missing file gives an empty dict; lines that are not complete JSON rows (e.g. cut off by a crash) are skipped.
    """
    p = Path(path)
    done: dict[tuple[int, str, int, int], dict] = {}
    if not p.exists():
        return done
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
                budget = int(r.get("budget_of", r["epochs"]))
                if not is_current(r):  # its recipe has changed since: not finished, run it again
                    continue
                done[int(r["net"]), str(r["mode"]), int(r["seed"]), budget] = r
            except (ValueError, KeyError, TypeError):
                continue
    return done
