"""The seed6 training loop (protocol/seed6.md) on CPU, and its JSON-lines result rows.

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
- channels_last (model + data): net 1 cpu -6..-8%, net 4 -12% once and +6% once (noise
  level), 2 threads worse. Not used: no robust gain, and channels_last parameters break
  ``p.view(-1)`` / ``parameters_to_vector`` in mechanisms.
- torch.compile: no gain on the MLPs, 30% slower on net 1, plus 17-67 s compile per run.
  Not used.
- oneDNN (``torch.backends.mkldnn``): disabling it makes net 1 ~4x slower (91 vs 23 ms/step,
  same load); ``deterministic=True`` costs nothing measurable (cpu 11.9 vs 12-15) and is not
  needed; ``fp32_precision="bf16"`` (cpu 11.3) changes the numerics, so not used.
- Every configuration tried (1/2 threads, channels_last, compile) gave bit-identical
  weights for two runs of the same seed. Chosen: eager fp32, NCHW, oneDNN on (defaults);
  the thread count is the caller's and is recorded in each row.

Example::

    from deepopt.bench.data import load_cifar10
    from deepopt.bench.train import append_row, finished, run

    data = load_cifar10("../shared/data/cifar10-jpeg.tar")
    if (5, "classical", 0, 20) not in finished("runs/seed6.jsonl"):
        append_row("runs/seed6.jsonl", run(5, "classical", 0, 20, data))
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepopt.bench.nets import build_net

__all__ = [
    "BATCH_SIZE",
    "EVAL_BATCH_SIZE",
    "LR",
    "MOMENTUM",
    "WEIGHT_DECAY",
    "append_row",
    "evaluate",
    "finished",
    "milestones",
    "run",
]

# The protocol's fixed settings (seed6.md, "Training (classical)").
LR = 1e-2
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BATCH_SIZE = 64
EVAL_BATCH_SIZE = 1000
_LR_DROPS = (0.3, 0.6, 0.8)  # LR x0.1 at these fractions of the epoch budget

Data = Sequence[torch.Tensor]


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
) -> dict:
    """Train seed network ``net`` for ``epochs`` epochs under the seed6 protocol.

    Model, loss, optimizer (SGD lr 1e-2, momentum 0.9, weight decay 5e-4), batch
    size 64, per-epoch reshuffle and LR schedule (x0.1 at :func:`milestones`) are
    the same in every mode; ``mode == "classical"`` trains plainly, any other mode
    differs only by one ``deepopt.activate(model, optimizer, **activate_kwargs)``
    call. The same ``seed`` gives the same initialisation (``torch.manual_seed``
    before :func:`~deepopt.bench.nets.build_net`) and the same data order (a
    separate ``torch.Generator``) in every mode.

    Args:
        net: seed network, 1..6.
        mode: ``"classical"``, or any other label for an activated run (the label is
            only recorded; ``activate_kwargs`` says what is activated).
        seed: initialisation and data-order seed.
        epochs: epoch budget; also sets the LR drops.
        data: ``(x_train, y_train, x_test, y_test)`` tensors, as from
            :func:`deepopt.bench.data.load_cifar10`.
        activate_kwargs: keyword arguments of ``deepopt.activate``; default none.
            The extra key ``"closure": True`` (removed before the call) makes the
            loop pass a closure that recomputes the loss to ``optimizer.step``.
        progress: show a tqdm bar over epochs.

    Threads are not set here: call ``torch.set_num_threads`` first (see the speed
    note at the top of this module: one thread per run, two runs in parallel, is
    the fastest on a 2-core machine).

    Returns:
        The result row: ``net, mode, seed, epochs``; ``test_acc`` (percent, after
        each epoch), ``final_test_acc``, ``max_test_acc``; ``train_loss`` (mean
        training loss of each epoch); ``sec_per_epoch`` (mean training time per
        epoch, evaluation excluded); ``settings`` (``activate_kwargs`` as given);
        ``torch`` (version), ``git_commit``, ``threads``.

    Raises:
        ValueError: ``epochs < 1`` or ``net`` not in 1..6.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: pass a positive integer number of epochs")
    x_train, y_train, x_test, y_test = data
    settings = dict(activate_kwargs or {})
    kwargs = dict(settings)
    use_closure = bool(kwargs.pop("closure", False))

    torch.manual_seed(seed)
    model = build_net(net)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    if mode != "classical":
        import deepopt  # only activated runs depend on the framework

        model, optimizer = deepopt.activate(model, optimizer, **kwargs)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones(epochs), gamma=0.1)
    order = torch.Generator().manual_seed(seed)

    from tqdm.auto import tqdm

    test_acc: list[float] = []
    train_loss: list[float] = []
    train_sec: list[float] = []
    n = len(x_train)
    bar = tqdm(range(epochs), desc=f"net{net} {mode} s{seed}", disable=not progress)
    for _ in bar:
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=order)
        loss_sum = 0.0
        for i in range(0, n, BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            xb, yb = x_train[idx], y_train[idx]
            if use_closure:
                loss = _step_with_closure(model, optimizer, xb, yb)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
        scheduler.step()
        train_sec.append(time.perf_counter() - t0)
        train_loss.append(loss_sum / n)
        test_acc.append(evaluate(model, x_test, y_test))
        bar.set_postfix(acc=f"{test_acc[-1]:.2f}", loss=f"{train_loss[-1]:.3f}")
    bar.close()

    return {
        "net": net,
        "mode": mode,
        "seed": seed,
        "epochs": epochs,
        "test_acc": test_acc,
        "final_test_acc": test_acc[-1],
        "max_test_acc": max(test_acc),
        "train_loss": train_loss,
        "sec_per_epoch": sum(train_sec) / len(train_sec),
        "settings": settings,
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "threads": torch.get_num_threads(),
    }


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
def _git_commit() -> str | None:
    """HEAD of the repository holding this file, with ``+dirty`` if tracked files changed."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
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


def finished(path: str | os.PathLike[str]) -> set[tuple[int, str, int, int]]:
    """The ``(net, mode, seed, epochs)`` of every complete row in ``path``.

    A missing file gives the empty set; lines that are not complete JSON rows
    (e.g. cut off by a crash) are skipped.
    """
    p = Path(path)
    if not p.exists():
        return set()
    done = set()
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
                done.add((int(r["net"]), str(r["mode"]), int(r["seed"]), int(r["epochs"])))
            except (ValueError, KeyError, TypeError):
                continue
    return done
