"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the context's tail.

Summaries, code edits and retrieval answers repeat their input, so the last n tokens often
occurred before; what came after them then is a free guess at what comes next. The longest
matching tail (prompt_lookup_max down to prompt_lookup_min tokens) wins, and among its
occurrences the most recent one.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(token_ids: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to k tokens continuing `token_ids` by lookup; [] when no tail of min_n or more tokens recurs."""
    length = len(token_ids)
    if k < 1 or length < min_n + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = tokens[length - n:]
        windows = sliding_window_view(tokens[:length - 1], n)  # starts 0 .. length - n - 1: never the tail itself
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return token_ids[start:start + k]
    return []
