"""nanoGPT's sample.py, evaluating instead of sampling: build the model from each checkpoint's
"model" and model_args, with no deepopt at all, and print its val loss on the same batches."""

import sys

import torch
from char_gpt import GPT, estimate_loss

sys.modules["deepopt"] = None  # the deployed model must not need deepopt: `import deepopt` raises
torch.set_num_threads(1)
for path in sys.argv[1:]:
    checkpoint = torch.load(path, map_location="cpu")
    model = GPT(**checkpoint["model_args"])
    state_dict = checkpoint["model"]
    for k in list(state_dict):
        if k.startswith("_orig_mod."):  # as nanoGPT: a torch.compile'd model's prefix
            state_dict[k[len("_orig_mod."):]] = state_dict.pop(k)
    model.load_state_dict(state_dict)
    print(repr(estimate_loss(model)))
