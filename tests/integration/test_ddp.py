"""DistributedDataParallel (gloo, CPU, loopback): deepopt under real data parallelism.

One spawn of two processes runs every scenario (spawning costs more than training here);
the tests then compare what the ranks saved with each other and with a one-process run
on the same global batches, computed in the test process itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import deepopt
from deepopt.experimental import WeightNoise

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo unavailable"
)

WORLD = 2
STEPS = 4
GLOBAL = 16
ROOT = Path(__file__).resolve().parents[2]
# average_every=1: the average folds in every step (the default recipe's 4 would fold none of
# these 4 steps after the first), so the evaluation weights compared and the folds counted
# cover every step.
SETTINGS = {"rho": 0.1, "average": "ema", "ema_decay": 0.9, "average_every": 1}
NOISE = 0.05  # deepopt.experimental.WeightNoise, on top of SETTINGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict:
    env = {"MASTER_ADDR": "127.0.0.1"}
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


# -- models and data (identical in every process) ---------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def vanishing() -> nn.Module:
    """A deep plain ReLU MLP whose signal vanishes: start-up calibration rescales it."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(9):
        lin = nn.Linear(10 if i == 0 else 32, 32 if i < 8 else 3)
        nn.init.xavier_uniform_(lin.weight, gain=0.3)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()] if i < 8 else [lin]
    return nn.Sequential(*layers)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * GLOBAL, 10, generator=g)
    return x, (x.sum(1) > 0).long() + (x[:, 0] > 1).long()


SCENARIOS = ("after", "before", "calibrate", "accumulate", "sam", "sam_closure", "sam_per_rank")
SAM = {"average": "ema", "ema_decay": 0.9, "average_every": 1}  # + two-pass SAM at every step, replayed


def sam_mechanisms() -> list:
    """Two-pass SAM at full radius on every step (a fresh mechanism per activation)."""
    from deepopt.experimental import TwoPassSAM

    return [TwoPassSAM(0.05)]


def train(model, opt, rank: int, world: int, accumulate: int = 1, ddp=None, criterion=None) -> None:
    """The user's loop: rank ``rank`` takes its slice of each global batch, in ``accumulate``
    micro-batches (``no_sync`` on all but the last when ``ddp`` is given)."""
    loss_of = criterion or nn.functional.cross_entropy
    x, y = data()
    per_rank = GLOBAL // world
    micro = per_rank // accumulate
    for step in range(STEPS):
        model.train()
        for k in range(accumulate):
            lo = step * GLOBAL + rank * per_rank + k * micro
            sync = ddp is None or k == accumulate - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                loss = loss_of(model(x[lo:lo + micro]), y[lo:lo + micro])
                (loss / accumulate).backward()
        opt.step()
        opt.zero_grad()


def train_sam_closure(ddp, opt, rank: int, world: int, per_rank: bool) -> None:
    """The user's loop with an explicit SAM closure; ``per_rank``: its first call (SAM's
    ascent) runs under ``ddp.no_sync()``, forward and backward, so each rank perturbs along
    its own gradient; the second call (at ``w + e``) is all-reduced as usual."""
    x, y = data()
    per = GLOBAL // world
    criterion = nn.CrossEntropyLoss()
    for step in range(STEPS):
        lo = step * GLOBAL + rank * per
        calls = [0]

        def closure(xb=x[lo:lo + per], yb=y[lo:lo + per], calls=calls) -> torch.Tensor:
            local = per_rank and calls[0] == 0
            calls[0] += 1
            opt.zero_grad()
            with ddp.no_sync() if local else contextlib.nullcontext():
                loss = criterion(ddp(xb), yb)
                loss.backward()
            return loss

        opt.step(closure)


def snapshot(model: nn.Module, opt) -> dict:
    model.train()
    params = [p.detach().clone() for p in model.parameters()]
    model.eval()
    evals = [t.clone() for t in model.state_dict().values()]
    model.train()
    return {"params": params, "eval": evals, "steps": opt.steps, "calibrated": opt.mechanism("calibrate").calibrated,
            "avg_count": opt.mechanism("average").count}


def count_perturbations(opt) -> list[int]:
    """Count the perturbations actually applied (none before the optimizer has momentum)."""
    calls = [0]
    show = opt.show

    def counted(view):
        was = opt.views.current
        show(view)
        calls[0] += view == "perturbed" != was and opt.views.current == "perturbed"

    opt.show = counted
    return calls


def record_seen_weights(module: nn.Module) -> list[torch.Tensor]:
    """The first weight as each training forward of ``module`` sees it."""
    seen: list[torch.Tensor] = []
    first = next(module.parameters())

    def record(_module: nn.Module, _args: tuple) -> None:
        if torch.is_grad_enabled():  # not calibration's measuring pass
            seen.append(first.detach().clone())

    module.register_forward_pre_hook(record)
    return seen


# -- the two-process worker ---------------------------------------------------------------
def scenario(name: str, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    factory = vanishing if name == "calibrate" else mlp
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "sam":  # both passes all-reduced by DDP: the ascent is the global gradient's
        ddp = DDP(model)
        _, opt = deepopt.activate(ddp, opt, mechanisms=sam_mechanisms(), **SAM)
        train(ddp, opt, rank, world, ddp=ddp, criterion=nn.CrossEntropyLoss())
        return {**snapshot(ddp, opt), "two_pass": opt.mechanism("sam").two_pass_steps}
    if name in ("sam_closure", "sam_per_rank"):  # an explicit closure; its ascent global or per rank
        ddp = DDP(model)
        _, opt = deepopt.activate(ddp, opt, mechanisms=sam_mechanisms(), **SAM)
        train_sam_closure(ddp, opt, rank, world, per_rank=name == "sam_per_rank")
        return {**snapshot(ddp, opt), "two_pass": opt.mechanism("sam").two_pass_steps}
    if name == "before":
        model, opt = deepopt.activate(model, opt, **SETTINGS, mechanisms=[WeightNoise(NOISE)])
        ddp = DDP(model)
    else:
        ddp = DDP(model)
        _, opt = deepopt.activate(ddp, opt, **SETTINGS, mechanisms=[WeightNoise(NOISE)])
    calls = count_perturbations(opt)
    seen = record_seen_weights(ddp.module[0])  # inside DDP's forward, after deepopt's hook
    train(ddp, opt, rank, world, accumulate=2 if name == "accumulate" else 1, ddp=ddp)
    out = snapshot(ddp, opt)
    out["perturb_calls"] = calls[0]
    out["seen"] = seen
    return out


def sharded_errors() -> dict:
    """activate's error for FSDP1 and FSDP2 models (empty string: could not build one)."""
    errors = {}
    builders = {}
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        builders["fsdp1"] = lambda m: FSDP(m, device_id=torch.device("cpu"))
    except ImportError:
        pass
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        builders["fsdp2"] = lambda m: fully_shard(m, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    except ImportError:
        pass
    for name, build in builders.items():
        try:
            model = build(mlp())
        except Exception as e:  # noqa: BLE001 - report why, the test decides
            errors[name] = f"could not build: {e!r}"
            continue
        try:
            deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1))
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = str(e)
    return errors


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int, out_dir: str) -> Iterator[dict]:
    """One rank of a gloo group on loopback; what it puts in the dict is saved as rank{rank}.pt."""
    torch.set_num_threads(1)
    os.environ.update(loopback_env())
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results: dict = {}
        yield results
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while another still communicates
    finally:
        dist.destroy_process_group()


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port, out_dir) as results:
        results.update({name: scenario(name, rank, world) for name in SCENARIOS})
        results["sharded"] = sharded_errors()


def spawn(fn, args: tuple, nprocs: int, timeout: float) -> None:
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {timeout}s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    spawn(worker, (WORLD, free_port(), str(out)), nprocs=WORLD, timeout=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(name: str) -> dict:
    """The same run in one process, no torch.distributed, full global batches."""
    model = (vanishing if name == "calibrate" else mlp)()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "sam":
        model, opt = deepopt.activate(model, opt, mechanisms=sam_mechanisms(), **SAM)
        train(model, opt, rank=0, world=1, criterion=nn.CrossEntropyLoss())
        return {**snapshot(model, opt), "two_pass": opt.mechanism("sam").two_pass_steps}
    model, opt = deepopt.activate(model, opt, **SETTINGS, mechanisms=[WeightNoise(NOISE)])
    train(model, opt, rank=0, world=1, accumulate=2 if name == "accumulate" else 1)
    return snapshot(model, opt)


# -- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCENARIOS)
def test_ranks_hold_bitwise_equal_training_and_evaluation_weights(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    for key in ("params", "eval"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key
    assert r0["steps"] == r1["steps"] == STEPS


@pytest.mark.parametrize("name", ["after", "before", "calibrate", "accumulate", "sam"])
def test_two_ranks_match_one_process_on_the_same_global_batch(ranks, name):
    ref = single_process(name)
    got = ranks[0][name]
    assert got["calibrated"] == ref["calibrated"] == (name == "calibrate")
    assert got.get("two_pass", STEPS) == ref.get("two_pass", STEPS) == STEPS  # SAM ran at every step
    for key in ("params", "eval"):
        for a, b in zip(got[key], ref[key]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sam_ascent_is_the_global_gradient_unless_the_closure_asks_for_each_rank_own(ranks):
    # The replayed loop (no closure) equals an explicit closure whose both passes DDP
    # all-reduces: its ascent is along the global gradient. Under no_sync in the closure's
    # first call each rank perturbs along its own gradient: the weights differ, yet (above)
    # both ranks still hold bitwise-equal weights, since the update is all-reduced and the
    # weights are restored from w + e by copy.
    replayed, closure, per_rank = (ranks[0][n] for n in ("sam", "sam_closure", "sam_per_rank"))
    assert replayed["two_pass"] == closure["two_pass"] == per_rank["two_pass"] == STEPS
    for key in ("params", "eval"):
        for a, b in zip(replayed[key], closure[key]):
            assert torch.equal(a, b), key
    assert any(not torch.equal(a, b) for a, b in zip(closure["params"], per_rank["params"]))


def test_calibration_moved_the_weights_alike_everywhere(ranks):
    # Without the all-reduced stds each rank would rescale from its own half batch.
    untouched = [p.detach() for p in vanishing().parameters()]
    got = ranks[0]["calibrate"]["params"]
    assert got[0].norm() > 2 * untouched[0].norm()


def test_accumulation_with_no_sync_applies_mechanisms_once_per_step(ranks):
    for r in ranks:
        acc = r["accumulate"]
        assert acc["steps"] == STEPS and acc["avg_count"] == STEPS
        # one perturbation per step (random noise from the first; the momentum part from
        # the second): never one per micro-batch
        assert acc["perturb_calls"] == r["after"]["perturb_calls"] == STEPS
        seen = acc["seen"]
        assert len(seen) == 2 * STEPS
        for step in range(STEPS):  # both micro-batches of a step see the same weights
            assert torch.equal(seen[2 * step], seen[2 * step + 1])
        assert not torch.equal(seen[2], r["after"]["seen"][0])  # ... and they did move


def test_fsdp1_is_refused_naming_fully_shard_and_fsdp2_is_accepted(ranks):
    errors = ranks[0]["sharded"]
    assert errors, "neither FSDP nor fully_shard could be imported"
    for name, msg in errors.items():
        if msg.startswith("could not build"):
            pytest.skip(f"{name}: {msg}")
    if "fsdp1" in errors:
        assert "does not support this sharded model" in errors["fsdp1"] and "fully_shard" in errors["fsdp1"]
    if "fsdp2" in errors:  # tests/integration/test_fsdp.py tests it in depth
        assert errors["fsdp2"] == "no error"


def test_example_runs_under_torchrun():
    env = {**os.environ, **loopback_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(ROOT / "examples" / "ddp_train.py"), "--steps", "6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "weights bitwise equal on all 2 ranks: True" in proc.stdout
