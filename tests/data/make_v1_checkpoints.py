"""Wrote ``v1_checkpoints.pt`` with deepopt's state format version 1 (git 1e9ed96).

Kept for the record of how the file was made; it runs only against that version, e.g.
from a worktree of that commit: ``cd tests && PYTHONPATH=../src python data/make_v1_checkpoints.py``
(writes next to this script). For
each case: a net trained AT steps, its model/optimizer/scheduler state and RNG, and the
weights (train and eval views) after TOTAL steps of the uninterrupted run, so a test can
check that today's deepopt resumes a version-1 checkpoint onto the same trajectory.
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_resume as r  # noqa: E402

CASES = ["default", "thorough", "rho", "lookahead", "noise", "restart", "looksam", "dropout_match"]

out = {}
for name in CASES:
    model, opt, sched = r.build(name)
    r.train_steps(name, model, opt, sched, 0, r.AT)
    # deep copies: training on mutates the tensors a state_dict() refers to
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "rng": torch.get_rng_state(), "overrides": r.RECIPES[name][0]})
    r.train_steps(name, model, opt, sched, r.AT, r.TOTAL)
    ckpt["final"] = r.final_state(model)
    out[name] = ckpt
torch.save(out, Path(__file__).with_name("v1_checkpoints.pt"))
