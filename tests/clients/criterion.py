"""``loss = criterion(model(x), y)`` with an ``nn.Module`` loss: BatchNorm, dropout, label
smoothing, SGD with Nesterov momentum, a step schedule, evaluation mid-run.

SAM: runs (criterion(model(x), y))
"""

import torch
from common import maybe_activate, save_training_weights, setup
from torch import nn

out = setup()
model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
model, optimizer = maybe_activate(model, optimizer)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)
criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
for step in range(20):
    i = step * 16 % 256
    loss = criterion(model(x[i:i + 16]), y[i:i + 16])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    if step % 5 == 4:
        model.eval()
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        model.train()
save_training_weights(out, model=model)
