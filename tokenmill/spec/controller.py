"""How many draft tokens each request should verify this step: only as many as pay for themselves.

Speculation often makes things slower (users of vLLM and llama.cpp report it): each drafted
token costs drafting time and a row of the verification pass, and pays only if accepted. The
controller keeps, per request, a running estimate of the per-token acceptance rate alpha, so
the expected tokens from k drafts are 1 + alpha + ... + alpha^k, and the measured cost of a
step as a function of its token count. For each request with a proposal it picks the k (0
included) that maximises the step's expected tokens per second, given the drafts already
chosen for others; k = 0 means the request decodes normally this step. A request that stops
speculating is still observed: for n-gram lookup the guess it would have made is checked
against the token it got (free), and otherwise its evidence decays toward the prior, so it
tries again later and resumes when it pays.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_ALPHA = 0.5  # acceptance before any evidence: optimistic enough to try
PRIOR_WEIGHT = 2.0  # pseudo-trials behind the prior
FORGET = 0.9  # weight of older evidence per round, so alpha follows the text as it changes
IDLE_DECAY = 0.97  # per step without speculation or shadow evidence: drift back toward the prior
MIN_GAIN = 1.02  # a k must raise expected throughput by 2% to be chosen


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one step emits with k drafts when each is accepted with probability alpha (i.i.d.)."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class StepCost:
    """Seconds of a step against its token count, learned online: a moving average per power-of-two
    bucket of the count, interpolated linearly between the buckets seen."""

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self._buckets: dict[int, tuple[float, float]] = {}  # bucket -> (mean tokens, mean seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1:
            return
        bucket = (tokens - 1).bit_length()
        if bucket not in self._buckets:
            self._buckets[bucket] = (float(tokens), seconds)
            return
        t, s = self._buckets[bucket]
        a = self.smoothing
        self._buckets[bucket] = (t + a * (tokens - t), s + a * (seconds - s))

    def seconds(self, tokens: int) -> float:
        """Predicted step time; with nothing measured every count costs 1 (flat: speculation looks free)."""
        points = sorted(self._buckets.values())
        if not points:
            return 1.0
        if tokens <= points[0][0] or len(points) == 1:
            return points[0][1] if tokens <= points[0][0] else points[0][1] * tokens / points[0][0]
        for (t0, s0), (t1, s1) in zip(points, points[1:]):
            if tokens <= t1:
                return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0) if t1 > t0 else s1
        (t0, s0), (t1, s1) = points[-2], points[-1]  # beyond the largest seen: extend the last segment
        slope = max((s1 - s0) / (t1 - t0), 0.0) if t1 > t0 else s1 / t1
        return s1 + slope * (tokens - t1)


@dataclass
class _Acceptance:
    accepted: float = 0.0
    trials: float = 0.0

    @property
    def alpha(self) -> float:
        return (self.accepted + PRIOR_ALPHA * PRIOR_WEIGHT) / (self.trials + PRIOR_WEIGHT)

    def add(self, accepted: int, trials: int) -> None:
        self.accepted = FORGET * self.accepted + accepted
        self.trials = FORGET * self.trials + trials

    def decay(self) -> None:
        self.accepted *= IDLE_DECAY
        self.trials *= IDLE_DECAY


class SpecController:
    def __init__(self, max_k: int, adaptive: bool = True):
        self.max_k = max_k
        self.adaptive = adaptive
        self.target_cost = StepCost()  # the target's step, by tokens computed
        self.draft_seconds_per_token = 0.0  # what proposing one draft token costs (n-gram: ~0)
        self._acceptance: dict[int, _Acceptance] = {}
        self._shadow: dict[int, int] = {}  # seq_id -> the first token it would have proposed

    def alpha(self, seq_id: int) -> float:
        return self._acceptance.get(seq_id, _Acceptance()).alpha

    def choose(self, caps: dict[int, int], step_tokens: int, decodes: int) -> dict[int, int]:
        """k per sequence (seq_id -> at most caps[seq_id]), for a step that computes `step_tokens`
        tokens and samples for `decodes` sequences without drafts; sequences left out decode normally."""
        if not self.adaptive:
            return {sid: min(cap, self.max_k) for sid, cap in caps.items()}
        tokens, extra, draft_time = float(max(decodes, 1)), 0, 0.0
        chosen: dict[int, int] = {}
        for sid, cap in caps.items():
            alpha = self.alpha(sid)
            now = tokens / (self.target_cost.seconds(step_tokens + extra) + draft_time)
            best_k, best = 0, now * MIN_GAIN
            for k in range(1, min(cap, self.max_k) + 1):
                rate = (tokens - 1 + expected_tokens(alpha, k)) / (
                    self.target_cost.seconds(step_tokens + extra + k) + draft_time + k * self.draft_seconds_per_token)
                if rate > best:
                    best_k, best = k, rate
            if best_k:
                chosen[sid] = best_k
                tokens += expected_tokens(alpha, best_k) - 1
                extra += best_k
                draft_time += best_k * self.draft_seconds_per_token
        return chosen

    def observe(self, seq_id: int, proposed: int, accepted: int) -> None:
        """A verification: `accepted` of `proposed` drafts kept (the first rejection ends the trials)."""
        self._acceptance.setdefault(seq_id, _Acceptance()).add(accepted, accepted + (accepted < proposed))

    def shadow(self, seq_id: int, first_token: int) -> None:
        """A proposal made but not verified: check it against the token the step gives instead."""
        self._shadow[seq_id] = first_token

    def observe_token(self, seq_id: int, token: int) -> None:
        """The token a sequence decoded without speculation."""
        guess = self._shadow.pop(seq_id, None)
        acceptance = self._acceptance.setdefault(seq_id, _Acceptance())
        if guess is None:
            acceptance.decay()
        else:
            acceptance.add(int(guess == token), 1)

    def forget(self, seq_id: int) -> None:
        self._acceptance.pop(seq_id, None)
        self._shadow.pop(seq_id, None)
