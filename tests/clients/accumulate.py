"""Gradient accumulation, a layer frozen then unfrozen mid-run, evaluation mid-epoch, BatchNorm.

SAM: cannot run (a functional loss: nn.functional.cross_entropy)
"""

import torch
from common import maybe_activate, save_training_weights, setup
from torch import nn

out = setup()
model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
model, optimizer = maybe_activate(model, optimizer)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
accumulate = 4
model[0].requires_grad_(False)  # the first layer starts frozen
for step in range(12):
    if step == 6:
        model[0].requires_grad_(True)  # ... and is unfrozen mid-run
    model.train()
    for micro in range(accumulate):
        i = (step * accumulate + micro) * 16 % 256
        loss = nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16]) / accumulate
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    if step % 4 == 1:
        model.eval()
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
save_training_weights(out, model=model)
