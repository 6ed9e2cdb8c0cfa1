"""A character-level GPT whose forward returns ``logits, loss`` (nanoGPT's style): AdamW,
warm-up then cosine to a twentieth of the peak, clipping, evaluation with ``model.eval()``.

SAM: runs (the model returns its loss)
"""

import math

import torch
from common import maybe_activate, save_training_weights, setup
from torch import nn

out = setup()
text = (torch.__doc__ or "") * 4
chars = sorted(set(text))
data = torch.tensor([chars.index(c) for c in text])
block, vocab = 16, len(chars)


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, 32)
        self.pos = nn.Embedding(block, 32)
        self.block = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True, norm_first=True)
        self.head = nn.Linear(32, vocab)

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        logits = self.head(self.block(x, src_mask=mask, is_causal=True))
        loss = None if targets is None else nn.functional.cross_entropy(logits.view(-1, vocab), targets.view(-1))
        return logits, loss


def batch(gen):
    i = torch.randint(len(data) - block - 1, (8,), generator=gen)
    return torch.stack([data[j:j + block] for j in i]), torch.stack([data[j + 1:j + block + 1] for j in i])


model = GPT()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
model, optimizer = maybe_activate(model, optimizer)
steps, warmup = 30, 3
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                              0.05 + 0.475 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
gen = torch.Generator().manual_seed(0)
for step in range(steps):
    x, y = batch(gen)
    logits, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if step % 10 == 9:
        model.eval()
        with torch.no_grad():
            val = model(*batch(torch.Generator().manual_seed(1)))[1].item()
        model.train()
save_training_weights(out, model=model)
