"""DDP and two-pass SAM: the ascent along the global gradient or along each rank's own (issue 39).

Under ``DistributedDataParallel`` the first (ascent) pass of SAM either all-reduces its
gradient, so every rank perturbs the weights by the same ``e = rho * g / ||g||`` of the
global batch (what deepopt does: the user's ``backward()`` syncs, and so does an explicit
closure), or runs under ``model.no_sync()`` (forward and backward), so each rank perturbs
along its own half batch's gradient (m-sharpness, Foret et al. 2021, section 4.1), and
saves that pass's all-reduce. The second pass is all-reduced in both, so the update (and
the weights after deepopt restores them from ``w + e``) is the same on every rank.

Setup: MNIST-1D (4,000 training sequences: the last 500 held out for validation; 1,000
test), a small 1-D CNN, 2 gloo ranks on CPU (one thread each), global batch 64 (32 per
rank), SGD momentum 0.9, LR 0.05, weight decay 5e-4, cosine to 0, ``--epochs`` epochs.
deepopt's ``recipe="safe"`` (calibration, guard; no averaging) with two-pass SAM at every
step at full radius (``deepopt.experimental.TwoPassSAM(rho)``) through an explicit closure
whose first call runs under ``no_sync()`` for ``per_rank``; ``none`` is the same loop
without SAM.

Each row: one (variant, rho, seed) with the final-epoch validation and test accuracy and
rank 0's wall time per step (training only; the barrier-bounded loop, variants
interleaved). The radius is chosen on validation (mean over seeds), per variant; test is
only read for the chosen one. Rows append to ``--out``; finished ones are skipped.

Run: nice -n 10 python -m benchmarks.scripts.ddp_ascent                        # runs what is missing
     nice -n 10 python -m benchmarks.scripts.ddp_ascent --timing 10 --rhos 0.1  # time per step
     python -m benchmarks.scripts.ddp_ascent --report > benchmarks/results/replay/ddp-ascent.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "results" / "replay" / "ddp-ascent.jsonl"
WORLD = 2
GLOBAL_BATCH = 64
VAL = 500
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
VARIANTS = ("global", "per_rank", "none")


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2, stride=2), nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 10, 10),
    )


def configs(rhos: list[float], seeds: list[int], epochs: int) -> list[dict]:
    out = []
    for seed in seeds:  # variants interleaved, so load on the machine hits each alike
        for rho in rhos:
            for variant in ("global", "per_rank"):
                out.append({"variant": variant, "rho": rho, "seed": seed, "epochs": epochs})
        out.append({"variant": "none", "rho": 0.0, "seed": seed, "epochs": epochs})
    return out


def key(row: dict) -> tuple:
    return row.get("kind", "accuracy"), row["variant"], float(row["rho"]), int(row["seed"]), int(row["epochs"])


def done(path: Path) -> set:
    if not path.is_file():
        return set()
    return {key(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}


# -- one run on one rank --------------------------------------------------------------------
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return 100.0 * acc


def build(cfg: dict) -> tuple:
    """(the DDP model, deepopt's optimizer) of one run; SAM at every step unless ``none``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import deepopt
    from deepopt.experimental import TwoPassSAM

    torch.manual_seed(cfg["seed"])
    model = cnn()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    # TwoPassSAM(rho): full radius from the first step, two passes on every step (the rows
    # were made with the former settings sam_rho=rho, sam_warmup=0, sam_lr_ceiling=1.0: the same).
    sam = [TwoPassSAM(cfg["rho"])] if cfg["variant"] != "none" else []
    _, opt = deepopt.activate(ddp, opt, recipe="safe", mechanisms=sam)
    return model, ddp, opt


def sam_step(ddp, opt, criterion, xb: torch.Tensor, yb: torch.Tensor, per_rank: bool) -> torch.Tensor:
    """``opt.step(closure)``; SAM's first call (the ascent) under ``no_sync()``, forward too, for per_rank."""
    calls = [0]

    def closure() -> torch.Tensor:
        sync = not (per_rank and calls[0] == 0)
        calls[0] += 1
        opt.zero_grad()
        with contextlib.nullcontext() if sync else ddp.no_sync():
            loss = criterion(ddp(xb), yb)
            loss.backward()
        return loss

    return opt.step(closure)


def run(cfg: dict, rank: int, data: dict) -> dict:
    model, ddp, opt = build(cfg)
    x, y = data["x"][:-VAL], data["y"][:-VAL]
    per_rank = GLOBAL_BATCH // WORLD
    steps_per_epoch = len(x) // GLOBAL_BATCH
    total = steps_per_epoch * cfg["epochs"]
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    criterion = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(1000 + cfg["seed"])  # the same data order everywhere
    local_first = cfg["variant"] == "per_rank"
    dist.barrier()
    start = time.perf_counter()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(x), generator=order)
        for s in range(steps_per_epoch):
            idx = perm[s * GLOBAL_BATCH + rank * per_rank:s * GLOBAL_BATCH + (rank + 1) * per_rank]
            sam_step(ddp, opt, criterion, x[idx], y[idx], local_first)
            schedule.step()
    dist.barrier()
    seconds = time.perf_counter() - start
    two_pass = opt.mechanism("sam").two_pass_steps if cfg["variant"] != "none" else 0
    same = _ranks_equal(model)
    return {**cfg, "val_acc": accuracy(model, data["x"][-VAL:], data["y"][-VAL:]),
            "test_acc": accuracy(model, data["x_test"], data["y_test"]), "steps": total,
            "two_pass_steps": two_pass, "ms_per_step": 1e3 * seconds / total, "ranks_bitwise_equal": same,
            "world": WORLD, "global_batch": GLOBAL_BATCH, "torch": torch.__version__}


def timing(rank: int, data: dict, rho: float, repeats: int, steps: int = 100) -> list[dict]:
    """ms per step of each variant in ``repeats`` rounds of ``steps`` steps, the variants
    alternating within each round (a constant LR, the first 10 steps of a round untimed)."""
    built = {v: build({"variant": v, "rho": rho, "seed": 0}) for v in VARIANTS}
    criterion = nn.CrossEntropyLoss()
    x, y = data["x"][:-VAL], data["y"][:-VAL]
    per_rank = GLOBAL_BATCH // WORLD
    times: dict = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v, (_, ddp, opt) in built.items():
            for s in range(steps + 10):
                if s == 10:
                    dist.barrier()
                    start = time.perf_counter()
                lo = (s * GLOBAL_BATCH) % (len(x) - GLOBAL_BATCH) + rank * per_rank
                sam_step(ddp, opt, criterion, x[lo:lo + per_rank], y[lo:lo + per_rank], v == "per_rank")
            dist.barrier()
            times[v].append(1e3 * (time.perf_counter() - start) / steps)
    return [{"kind": "timing", "variant": v, "rho": rho if v != "none" else 0.0, "seed": 0, "epochs": 0,
             "ms_per_step_median": statistics.median(t), "ms_per_step": t, "steps_per_round": steps,
             "world": WORLD, "global_batch": GLOBAL_BATCH, "torch": torch.__version__} for v, t in times.items()]


def _ranks_equal(model: nn.Module) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def worker(rank: int, port: int, todo: list[dict], out: str, repeats: int = 0) -> None:
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from deepopt.datasets import load_mnist1d

        data = load_mnist1d()
        # Each run's row is written as soon as it ends: an interrupted sweep resumes there.
        jobs = [lambda: timing(rank, data, todo[0]["rho"], repeats)] if repeats else \
            [lambda cfg=cfg: [run(cfg, rank, data)] for cfg in todo]
        for job in jobs:
            rows = job()
            if rank == 0:
                with open(out, "a") as f:
                    f.writelines(json.dumps(row) + "\n" for row in rows)
                print("\n".join(json.dumps(row) for row in rows), flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the table -------------------------------------------------------------------------------
def report(path: Path, epochs: int) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    timed = {r["variant"]: r for r in rows if r.get("kind") == "timing"}
    rows = [r for r in rows if r.get("kind", "accuracy") == "accuracy" and r["epochs"] == epochs]
    by: dict = {}
    for r in rows:
        by.setdefault((r["variant"], r["rho"]), []).append(r)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"MNIST-1D 1-D CNN, 2 gloo ranks, global batch {GLOBAL_BATCH}, {epochs} epochs, seeds {seeds}; "
             "final-epoch accuracy %, mean over seeds; ms/step: median over the runs (shared machine)",
             "variant   rho    val     test    ms/step  ranks bitwise equal"]
    chosen = {}
    for (variant, rho), rs in sorted(by.items(), key=lambda kv: (VARIANTS.index(kv[0][0]), kv[0][1])):
        rs = sorted(rs, key=lambda r: r["seed"])
        val = statistics.mean(r["val_acc"] for r in rs)
        if variant not in chosen or val > chosen[variant][1]:
            chosen[variant] = (rho, val)
        lines.append(f"{variant:9} {rho:<5g}  {val:6.2f}  {statistics.mean(r['test_acc'] for r in rs):6.2f}  "
                     f"{statistics.median(r['ms_per_step'] for r in rs):7.2f}  "
                     f"{all(r['ranks_bitwise_equal'] for r in rs)}  n={len(rs)}")
    lines.append("chosen on validation (test of the chosen radius; per seed):")
    base = {r["seed"]: r["test_acc"] for r in by.get(("none", 0.0), [])}
    for variant in VARIANTS:
        if variant not in chosen:
            continue
        rho = chosen[variant][0]
        rs = sorted(by[(variant, rho)], key=lambda r: r["seed"])
        per_seed = ", ".join(f"{r['test_acc']:.2f}" for r in rs)
        gain = [r["test_acc"] - base[r["seed"]] for r in rs if r["seed"] in base]
        vs = f"; vs none {_ci(gain)}" if gain and variant != "none" else ""
        lines.append(f"  {variant:9} rho {rho:<5g} test {statistics.mean(r['test_acc'] for r in rs):6.2f} "
                     f"({per_seed}){vs}; {statistics.median(r['ms_per_step'] for r in rs):.2f} ms/step")
    g, p = chosen.get("global"), chosen.get("per_rank")
    if g and p:
        gs = {r["seed"]: r for r in by[("global", g[0])]}
        diffs = [r["test_acc"] - gs[r["seed"]]["test_acc"] for r in by[("per_rank", p[0])] if r["seed"] in gs]
        if diffs:
            lines.append(f"  per_rank - global (test, chosen radii): {_ci(diffs)} "
                         f"(seeds: {', '.join(f'{d:+.2f}' for d in diffs)})")
    if timed:
        base_ms = timed["none"]["ms_per_step_median"] if "none" in timed else None
        lines.append(f"time per step, alternating rounds (median of {len(next(iter(timed.values()))['ms_per_step'])}"
                     f" rounds of {next(iter(timed.values()))['steps_per_round']} steps):")
        for variant in VARIANTS:
            if variant in timed:
                ms = timed[variant]["ms_per_step_median"]
                rel = f" ({ms / base_ms:.2f}x none)" if base_ms else ""
                lines.append(f"  {variant:9} {ms:6.2f} ms/step{rel}")
    return "\n".join(lines)


def _ci(values: list[float]) -> str:
    """Mean and 95% Student-t half-width over seeds."""
    from benchmarks.stats import interval

    mean, half = interval(values)
    return f"{mean:+.2f}" if len(values) < 2 else f"{mean:+.2f} ± {half:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--timing", type=int, default=0, metavar="ROUNDS",
                        help="instead: time the three variants (rho: the first of --rhos) in alternating "
                             "rounds of 100 steps")
    parser.add_argument("--report", action="store_true", help="print the table from the rows and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.out, args.epochs))
        return
    finished = done(args.out)
    if args.timing:
        rho = args.rhos[0]
        todo = [{"variant": "global", "rho": rho, "seed": 0, "epochs": 0}]
        if all(("timing", v, rho if v != "none" else 0.0, 0, 0) in finished for v in VARIANTS):
            todo = []
    else:
        todo = [c for c in configs(args.rhos, args.seeds, args.epochs) if key(c) not in finished]
    print(f"{len(todo)} runs to do ({len(finished)} rows already in {args.out})", flush=True)
    if not todo:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(free_port(), todo, str(args.out), args.timing), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
