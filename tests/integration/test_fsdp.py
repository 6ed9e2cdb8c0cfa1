"""FSDP2 (``fully_shard``, gloo, CPU, loopback): deepopt on sharded parameters.

The harness of test_ddp.py: one spawn of two processes runs every scenario; the tests
compare what the ranks saved with each other and with a one-process, unsharded run on the
same global batches, computed in the test process itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_ddp import (
    GLOBAL,
    ROOT,
    STEPS,
    data,
    free_port,
    gloo_rank,
    loopback_env,
    mlp,
    spawn,
    vanishing,
)
from torch import nn

import deepopt
from deepopt.experimental import legacy_kwargs

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo unavailable"
)

WORLD = 2
NAN_STEP = 2  # rank 1's half of this global batch is NaN
# average_every=1: every step folds in (the default's would fold none of these few steps).
AVERAGE = {"average": "ema", "ema_decay": 0.9, "average_every": 1, "average_samples": 0}
SCENARIOS = {
    "default": dict(recipe="default", rho=0.1, **AVERAGE),  # + the momentum perturbation
    "calibrate": dict(recipe="default", **AVERAGE),
    "thorough": dict(recipe="thorough", sam_warmup=0, sam_lr_ceiling=1.0, **AVERAGE),
    # The same SAM without a closure: deepopt replays criterion(model(x), y) on the shards.
    "sam_replay": dict(recipe="thorough", sam_warmup=0, sam_lr_ceiling=1.0, **AVERAGE),
    "nan": dict(recipe="default", rho=0.1, **AVERAGE),
    # A NaN loss on one rank with finite gradients: only the all-reduced flag skips it there too.
    "nan_loss": dict(recipe="default", rho=0.1, **AVERAGE),
    "root_only": dict(recipe="default", rho=0.1, **AVERAGE),
    "dropout": dict(recipe="default", **AVERAGE),
}


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 32), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(32, 3))


# fully_shard on the root only: the root then keeps the gathered weights from a forward to
# its backward (and after an evaluation), which deepopt must make it gather again.
ROOT_ONLY = {"root_only", "thorough", "nan_loss"}
FACTORIES = {"calibrate": vanishing, "dropout": dropout_mlp}


def batches(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data()
    if name == "nan":
        x = x.clone()
        lo = NAN_STEP * GLOBAL + GLOBAL // 2
        x[lo:lo + GLOBAL // 2] = float("nan")
    return x, y


def train(model, opt, name: str, rank: int, world: int, steps: range) -> list[torch.Tensor]:
    """The user's loop on rank ``rank``'s share of each global batch; an evaluation after step 1.

    Returns the evaluation outputs (on the first global batch)."""
    x, y = batches(name)
    per_rank = GLOBAL // world
    outs = []
    for step in steps:
        model.train()
        lo = step * GLOBAL + rank * per_rank
        xb, yb = x[lo:lo + per_rank], y[lo:lo + per_rank]
        if name in ("thorough", "nan_loss"):
            bad = name == "nan_loss" and step == NAN_STEP and rank == world - 1

            def closure(xb=xb, yb=yb, bad=bad):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss + float("nan") if bad else loss
            opt.step(closure)
        elif name == "sam_replay":
            nn.CrossEntropyLoss()(model(xb), yb).backward()
            opt.step()
        else:
            torch.manual_seed(100 + step)  # dropout masks: the same per step in every run
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        opt.zero_grad()
        if step == 1:  # an evaluation mid-run, then training goes on
            model.eval()
            with torch.no_grad():
                outs.append(model(x[:GLOBAL]))
    model.eval()
    with torch.no_grad():
        outs.append(model(x[:GLOBAL]))
    model.train()
    return outs


def build(name: str, mesh=None):
    model = FACTORIES.get(name, mlp)()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear) and name not in ROOT_ONLY:
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # legacy_kwargs: recipe="thorough" with sam_* knobs becomes the default + TwoPassSAM(...).
    return deepopt.activate(model, opt, **legacy_kwargs(SCENARIOS["default" if name == "resume" else name]))


def full_snapshot(model, opt) -> dict:
    """Training weights and evaluated weights, gathered (what a full-state-dict export gives)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.train()
    opt.zero_grad()  # back in training: the training weights are shown again
    params = [p.full_tensor() for p in opt.params()]
    model.eval()
    evals = list(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).values())
    model.train()
    guard, sam = opt.mechanism("guard"), opt.mechanism("sam")
    return {"params": params, "eval": evals, "steps": opt.steps, "skipped": guard.skipped,
            "calibrated": opt.mechanism("calibrate").calibrated, "avg_count": opt.mechanism("average").count,
            "two_pass": None if sam is None else sam.two_pass_steps}


def resume(rank: int, world: int, mesh, ckpt: str) -> dict:
    """Two steps, a DCP checkpoint, a fresh model and optimizer loading it, the remaining steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = build("resume", mesh)
    train(model, opt, "default", rank, world, range(2))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    del model, opt

    model, opt = build("resume", mesh)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    outs = train(model, opt, "default", rank, world, range(2, STEPS))
    return {**full_snapshot(model, opt), "outs": outs}


def sharded_errors(mesh) -> dict:
    """activate's error for the older FSDP wrapper and for a mechanism that cannot act on shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    errors = {}
    for name, build_model, extra in (
        ("fsdp1", lambda: FSDP(mlp(), device_id=torch.device("cpu")), []),
        ("noise", lambda: fully_shard(mlp(), mesh=mesh), [deepopt.experimental.WeightNoise(0.05)]),
    ):
        model = build_model()
        try:
            deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1), mechanisms=extra)
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = str(e)
    return errors


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with gloo_rank(rank, world, port, out_dir) as results:
        mesh = init_device_mesh("cpu", (world,))
        for name in SCENARIOS:
            model, opt = build(name, mesh)
            outs = train(model, opt, name, rank, world, range(STEPS))
            results[name] = {**full_snapshot(model, opt), "outs": outs}
        results["resume"] = resume(rank, world, mesh, str(Path(out_dir) / "ckpt"))
        results["errors"] = sharded_errors(mesh)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    spawn(worker, (WORLD, free_port(), str(out)), nprocs=WORLD, timeout=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(name: str) -> dict:
    """The same run in one process, unsharded, on full global batches."""
    model, opt = build(name)
    outs = train(model, opt, name, 0, 1, range(STEPS))
    model.train()
    opt.zero_grad()
    params = [p.detach().clone() for p in opt.params()]
    model.eval()
    evals = [t.clone() for t in model.state_dict().values()]
    model.train()
    sam = opt.mechanism("sam")
    return {"params": params, "eval": evals, "outs": outs, "steps": opt.steps, "skipped": opt.mechanism("guard").skipped,
            "calibrated": opt.mechanism("calibrate").calibrated, "two_pass": None if sam is None else sam.two_pass_steps}


# -- tests ----------------------------------------------------------------------------------
NAMES = [*SCENARIOS, "resume"]


@pytest.mark.parametrize("name", NAMES)
def test_ranks_agree_bitwise(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    for key in ("params", "eval", "outs"):
        for a, b in zip(r0[key], r1[key], strict=True):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("name", [n for n in NAMES if n != "dropout"])  # dropout masks differ per rank
def test_sharded_run_equals_the_unsharded_one(ranks, name):
    ref = single_process("default" if name == "resume" else name)
    if name == "resume":
        ref["outs"] = ref["outs"][-1:]  # the resumed run evaluated after its last step only
    got = ranks[0][name]
    assert (got["steps"], got["skipped"], got["calibrated"]) == (ref["steps"], ref["skipped"], ref["calibrated"])
    assert got.get("two_pass") == ref["two_pass"] == (STEPS if "thorough" in name or "sam" in name else None)
    for key in ("params", "eval", "outs"):
        assert len(got[key]) == len(ref[key]), key
        for a, b in zip(got[key], ref[key]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_evaluation_weights_are_the_average_not_the_training_weights(ranks):
    got = ranks[0]["default"]
    assert got["avg_count"] == STEPS
    assert not torch.allclose(got["eval"][0], got["params"][0])


def test_calibration_rescaled_the_sharded_weights(ranks):
    assert ranks[0]["calibrate"]["calibrated"] is True
    assert ranks[0]["calibrate"]["params"][0].norm() > 2 * vanishing()[0].weight.norm()


@pytest.mark.parametrize("name", ["nan", "nan_loss"])
def test_nan_on_one_rank_is_skipped_on_all(ranks, name):
    for r in ranks:
        assert r[name]["skipped"] == 1 and r[name]["steps"] == STEPS - 1
        assert all(torch.isfinite(p).all() for p in r[name]["params"])


def test_dcp_resume_is_the_uninterrupted_run_bitwise(ranks):
    for r in ranks:
        for key in ("params", "eval"):
            for a, b in zip(r["resume"][key], r["default"][key], strict=True):
                assert torch.equal(a, b), key
        assert torch.equal(r["resume"]["outs"][-1], r["default"]["outs"][-1])
        assert r["resume"]["avg_count"] == r["default"]["avg_count"]


def test_refusals_name_the_way(ranks):
    errors = ranks[0]["errors"]
    assert "fully_shard" in errors["fsdp1"] and "FullyShardedDataParallel" in errors["fsdp1"], errors["fsdp1"]
    assert "weight noise" in errors["noise"].lower() or "WeightNoise" in errors["noise"], errors["noise"]


def test_example_runs_under_torchrun():
    env = {**os.environ, **loopback_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(ROOT / "examples" / "fsdp_train.py"), "--steps", "6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed run equals the uninterrupted one: True" in proc.stdout
