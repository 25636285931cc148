"""The token embedding, split by vocabulary rows under tensor parallelism.

Each rank holds vocab / world consecutive rows of the table. A rank looks up the tokens whose
ids fall in its rows and writes zeros for the others; an all-reduce then sums the ranks' vectors,
of which exactly one is not zero, so every rank gets every token's vector, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.executor.parallel import TensorParallel


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.rows = tp.share(vocab_size)
        # Made empty: the weights are loaded anyway, and nn.Embedding's random init on the meta device
        # imports torch._dynamo (1.8 s of start-up).
        self.weight = nn.Parameter(torch.empty(self.rows.stop - self.rows.start, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.rows.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill_(outside[:, None], 0.0)
        return self.tp.all_reduce(x)
