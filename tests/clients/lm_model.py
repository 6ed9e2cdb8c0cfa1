"""The word-language-model client's network, in its own module as in the original example."""

from torch import nn


class RNNModel(nn.Module):
    """Embedding, LSTM and a decoder whose weight is the embedding's (tied weights)."""

    def __init__(self, ntoken: int, ninp: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, ninp, batch_first=True)
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight  # one parameter used by two layers

    def forward(self, x):
        h, _ = self.rnn(self.drop(self.encoder(x)))
        return self.decoder(self.drop(h))
