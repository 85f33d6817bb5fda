"""The torch network of the event model (training only; sampling runs on numpy copies)."""
from __future__ import annotations

import torch
from torch import nn

# Continuous step features: age at the event, time left to the reference age, reference
# known, a flagged condition of the patient row still to begin, time to its onset age,
# and how long before the reference that onset lies.
N_CONT = 6


class EventNet(nn.Module):
    """GRU over event tokens, conditioned on the patient vector, with three heads.

    Step input: token + gap-bin + value-bin embeddings, the patient vector's projection
    and continuous time features. Heads: next token; then, given that token, its gap bin
    and its value bin (teacher-forced in training, sampled in that order at generation).
    """

    def __init__(self, n_tokens: int, n_gap: int, n_val: int, n_cond: int,
                 d_in: int = 96, hidden: int = 192, d_head: int = 64, dropout: float = 0.1):
        super().__init__()
        self.tok_emb = nn.Embedding(n_tokens, d_in)
        self.gap_emb = nn.Embedding(n_gap, d_in)
        self.val_emb = nn.Embedding(n_val, d_in)
        self.cond = nn.Linear(n_cond, d_in)
        self.cont = nn.Linear(N_CONT, d_in, bias=False)
        self.h0 = nn.Linear(n_cond, hidden)
        self.gru = nn.GRU(d_in, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.tok_head = nn.Linear(hidden, n_tokens)
        self.gap_h = nn.Linear(hidden, d_head)
        self.gap_tok = nn.Embedding(n_tokens, d_head)
        self.gap_out = nn.Linear(d_head, n_gap)
        self.val_h = nn.Linear(hidden, d_head)
        self.val_tok = nn.Embedding(n_tokens, d_head)
        self.val_out = nn.Linear(d_head, n_val)

    def forward(self, tok, gap, val, cont, cond, tok_next, h0=None):
        """Logits for next token [B,T,V], its time class [B,T,G] and its value bin [B,T,NV],
        and the last state (to continue with the next chunk of the same sequences)."""
        x = (self.tok_emb(tok) + self.gap_emb(gap) + self.val_emb(val)
             + self.cond(cond)[:, None, :] + self.cont(cont))
        if h0 is None:
            h0 = torch.tanh(self.h0(cond))[None]
        h, h_last = self.gru(x, h0)
        h = self.drop(h)
        tok_logits = self.tok_head(h)
        g = torch.relu(self.gap_h(h) + self.gap_tok(tok_next))
        v = torch.relu(self.val_h(h) + self.val_tok(tok_next))
        return tok_logits, self.gap_out(g), self.val_out(v), h_last
