"""Parameters in half and bfloat16 (``model.half()``, ``model.to(torch.bfloat16)``).

SAM: cannot run (a functional loss: nn.functional.mse_loss)
"""

import torch
from common import maybe_activate, save_training_weights, setup
from torch import nn

out = setup()
half = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).half()
bf16 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(torch.bfloat16)
opt_half = torch.optim.SGD(half.parameters(), lr=0.01)
opt_bf16 = torch.optim.SGD(bf16.parameters(), lr=0.01, momentum=0.9)
half, opt_half = maybe_activate(half, opt_half)
bf16, opt_bf16 = maybe_activate(bf16, opt_bf16)
x, y = torch.randn(64, 8), torch.randn(64, 1)
for _ in range(15):
    for model, opt in ((half, opt_half), (bf16, opt_bf16)):
        dtype = next(model.parameters()).dtype
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
save_training_weights(out, half=half, bf16=bf16)
