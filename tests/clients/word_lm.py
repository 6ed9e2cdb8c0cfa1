"""Word language model: tied weights, AdamW, clipping, evaluation mid-epoch, whole-model save.

Saves the best model whole (``torch.save(model, f)``) and reloads it with
``torch.load`` inside ``torch.serialization.safe_globals``, as pytorch/examples does.

SAM: cannot run (the criterion gets a reshaped output, not the model's)
"""

import torch
from common import maybe_activate, save_training_weights, setup
from lm_model import RNNModel
from torch import nn

out = setup()
ntoken, seq = 50, 12
data = torch.randint(0, ntoken, (64, seq + 1))
train, valid = data[:48], data[48:]
model = RNNModel(ntoken, 16)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
model, optimizer = maybe_activate(model, optimizer)
criterion = nn.CrossEntropyLoss()


def evaluate():
    model.eval()
    with torch.no_grad():
        return criterion(model(valid[:, :-1]).reshape(-1, ntoken), valid[:, 1:].reshape(-1)).item()


best = None
for _ in range(2):
    for i in range(0, len(train), 8):
        model.train()
        batch = train[i:i + 8]
        model.zero_grad()
        loss = criterion(model(batch[:, :-1]).reshape(-1, ntoken), batch[:, 1:].reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        if i == 24:  # a look at the validation loss in the middle of the epoch
            evaluate()
    val = evaluate()
    if best is None or val < best:
        with open(out / "model.pt", "wb") as f:
            torch.save(model, f)
        torch.save(model.state_dict(), out / "model_state.pt")  # what the test compares with
        best = val

with open(out / "model.pt", "rb") as f, torch.serialization.safe_globals(
        [RNNModel, nn.Dropout, nn.Embedding, nn.LSTM, nn.Linear]):
    reloaded = torch.load(f)
assert reloaded.decoder.weight is reloaded.encoder.weight  # still tied
save_training_weights(out, model=model)
