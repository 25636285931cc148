"""Verifying draft tokens: which of the k proposed tokens the target keeps, and the token after them.

A sequence with drafts d1..dk has k + 1 logits rows (after its last known token, and after each
draft). Every row is processed as the plain sampler would process it at that position: the
penalties count the drafts before it as output, and min_tokens blocks EOS while the output,
drafts included, is short.

- Greedy: the drafts that equal the target's argmax are kept up to the first mismatch, where
  the target's argmax is emitted instead (after k matches, a bonus token from the last row).
  The output is exactly the non-speculative greedy output.
- Sampling (Leviathan et al. 2023, Chen et al. 2023): draft d, drawn from the proposer's q, is
  kept with probability min(1, p(d) / q(d)) where p is the target's distribution (temperature,
  top-k/p, min-p); at the first rejection a token is drawn from the residual max(0, p - q),
  renormalised; after k acceptances a bonus token from p. Each emitted token is then
  distributed exactly as p. Prompt lookup proposes deterministically: q = one-hot(d), so d is
  kept with probability p(d) and the residual is p without d.

The uniform and residual draws come from the sequence's own generator when it is seeded.
"""

from __future__ import annotations

import torch

from tokenmill.executor.sampler import Sampler, SamplingBatch, logprobs_of, target_probs
from tokenmill.step_plan import SamplerOutput


def verify(sampler: Sampler, logits: torch.Tensor, batch: SamplingBatch, drafts: list[list[int]],
           draft_probs: list[torch.Tensor | None]) -> tuple[list[int], SamplerOutput]:
    """Rows of `logits`/`batch`: len(drafts[i]) + 1 for sequence i, in order. Returns how many
    tokens each sequence emits (accepted drafts + 1) and a SamplerOutput over the emitted rows."""
    x = sampler.processed(logits, batch)
    params = batch.params
    greedy_tokens = x.argmax(-1).tolist()
    sampled_rows = [r for r, p in enumerate(params) if not p.greedy]
    probs = target_probs(x[sampled_rows], [params[r] for r in sampled_rows]) if sampled_rows else None
    prob_row = {r: i for i, r in enumerate(sampled_rows)}

    counts: list[int] = []
    emitted_rows: list[int] = []
    tokens: list[int] = []
    start = 0
    for draft, q in zip(drafts, draft_probs):
        if params[start].greedy:
            out = _verify_greedy(draft, greedy_tokens[start:start + len(draft) + 1])
        else:
            p = probs[prob_row[start]:prob_row[start] + len(draft) + 1]
            out = _verify_sampled(sampler, draft, p, q, batch.generators[start])
        counts.append(len(out))
        emitted_rows += range(start, start + len(out))
        tokens += out
        start += len(draft) + 1

    if not any(p.logprobs is not None for p in params):
        return counts, SamplerOutput(tokens, None, None, None)
    rows = torch.tensor(emitted_rows, device=logits.device)
    return counts, logprobs_of(logits[rows], torch.tensor(tokens, device=logits.device),
                               [params[r] for r in emitted_rows])


def _verify_greedy(draft: list[int], target: list[int]) -> list[int]:
    out = []
    for d, t in zip(draft, target):
        if d != t:
            break
        out.append(d)
    out.append(target[len(out)])
    return out


def _verify_sampled(sampler: Sampler, draft: list[int], p: torch.Tensor, q: torch.Tensor | None,
                    generator: torch.Generator | None) -> list[int]:
    """Rejection sampling over one sequence's rows; p [k + 1, V] target, q [k, V] draft (None: one-hot)."""
    out = []
    for j, d in enumerate(draft):
        q_d = 1.0 if q is None else float(q[j, d])
        if sampler.uniform(generator, p.device) * q_d < float(p[j, d]):
            out.append(d)
            continue
        if q is None:
            residual = p[j].clone()
            residual[d] = 0.0
        else:
            residual = (p[j] - q[j]).clamp_(min=0.0)
        total = float(residual.sum())
        # A zero residual means p <= q everywhere, i.e. p == q, where rejection has probability 0.
        residual = residual / total if total > 0 else p[j]
        out.append(int(sampler.race(residual[None], [generator])[0]))
        return out
    out.append(int(sampler.race(p[len(draft)][None], [generator])[0]))
    return out
