"""How many draft tokens each request should verify this step: only as many as pay for themselves.

Speculation often makes things slower (users of vLLM and llama.cpp report it): each drafted
token costs drafting time and a row of the verification pass, and pays only if accepted. The
controller keeps, per request, a running estimate of the per-token acceptance rate alpha, so
the expected tokens from k drafts are 1 + alpha + ... + alpha^k, and the measured cost of a
step as a function of its token count (and of a draft model's seconds per drafted token).
Each step it picks the m requests likeliest to accept and one k for them (a draft model's
rounds are batched, one forward per draft position) that maximise the step's expected tokens
per second; everyone else, and everyone when nothing beats plain decoding by 2%, decodes
normally.

A new request starts from the acceptance seen over all requests (so a good draft is used from
the first step, a bad one is not), and until a few verifications have been seen at all every
request probes with its full k. A request that stops speculating is still observed: for
n-gram lookup the guess it would have made is checked against the token it got (free); with
a draft model, its evidence decays toward the overall rate and every PROBE_EVERY idle steps it
verifies one draft, when a request with the overall acceptance would gain from drafting. So it
resumes when speculation pays again. The model can be wrong, so the clock has the last word:
for each batch size, decode steps with and without drafts are timed (proposing included; one
step in PROBE_EVERY decodes plainly to keep the comparison fresh), and while drafting measures
slower, only one step in PROBE_EVERY may draft.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

PRIOR_ALPHA = 0.5  # acceptance before any evidence at all
PRIOR_WEIGHT = 2.0  # pseudo-trials behind a request's prior (the overall rate)
FORGET = 0.9  # weight of a request's older evidence per round, so alpha follows the text as it changes
OVERALL_FORGET = 0.99  # the same for the rate over all requests
EXPLORE_TRIALS = 8  # until this many draft trials were verified overall, every request probes with its full k
IDLE_DECAY = 0.97  # per step without speculation or shadow evidence: drift back toward the overall rate
PROBE_EVERY = 32  # idle steps after which a request without shadow evidence verifies one draft
MIN_GAIN = 1.02  # a k must raise expected throughput by 2% to be chosen
REALIZED_WINDOW = 8  # measured decode steps, with and without drafts, that the comparison averages
REALIZED_MIN = 3  # steps of each kind before the comparison may hold drafting back


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one step emits with k drafts when each is accepted with probability alpha (i.i.d.)."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class StepCost:
    """Seconds of a step against its token count, learned online: a moving average per power-of-two
    bucket of the count, interpolated linearly between the buckets seen."""

    def __init__(self, unmeasured: float = 1.0, smoothing: float = 0.2):
        self.unmeasured = unmeasured  # what any step costs before one is measured
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
        """Predicted step time; with nothing measured, `unmeasured` whatever the count."""
        points = sorted(self._buckets.values())
        if not points:
            return self.unmeasured
        if tokens <= points[0][0] or len(points) == 1:  # one size seen: flat (optimistic until measured)
            return points[0][1]
        for (t0, s0), (t1, s1) in zip(points, points[1:]):
            if tokens <= t1:
                return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0) if t1 > t0 else s1
        (t0, s0), (t1, s1) = points[-2], points[-1]  # beyond the largest seen: extend the last segment
        slope = max((s1 - s0) / (t1 - t0), 0.0) if t1 > t0 else s1 / t1
        return s1 + slope * (tokens - t1)


@dataclass
class _Realized:
    """Measured tokens per second of decode steps of one batch size, with drafts and without: the
    mean of the last REALIZED_WINDOW of each."""

    spec: deque = field(default_factory=lambda: deque(maxlen=REALIZED_WINDOW))
    plain: deque = field(default_factory=lambda: deque(maxlen=REALIZED_WINDOW))
    held_back: int = 0  # steps since the last one allowed to draft while drafting measured slower
    drafting: int = 0  # drafting steps since the last plain one (plain steps are timed now and then too)

    def add(self, drafted: bool, rate: float) -> None:
        (self.spec if drafted else self.plain).append(rate)

    @property
    def losing(self) -> bool:
        enough = len(self.spec) >= REALIZED_MIN and len(self.plain) >= REALIZED_MIN
        return enough and sum(self.spec) / len(self.spec) < sum(self.plain) / len(self.plain)


@dataclass
class _Acceptance:
    accepted: float = 0.0
    trials: float = 0.0
    idle_steps: int = 0  # steps since it last verified a draft or was checked by a shadow guess

    def alpha(self, prior: float) -> float:
        return (self.accepted + prior * PRIOR_WEIGHT) / (self.trials + PRIOR_WEIGHT)

    def add(self, accepted: int, trials: int, forget: float = FORGET) -> None:
        self.accepted = forget * self.accepted + accepted
        self.trials = forget * self.trials + trials
        self.idle_steps = 0

    def decay(self) -> None:
        self.accepted *= IDLE_DECAY
        self.trials *= IDLE_DECAY
        self.idle_steps += 1


class SpecController:
    def __init__(self, max_k: int, adaptive: bool = True, draft_cost: StepCost | None = None):
        self.max_k = max_k
        self.adaptive = adaptive
        self.target_cost = StepCost()  # the target's step by tokens computed; flat until measured
        self.draft_cost = draft_cost  # a draft model's seconds per drafted token by sequences drafting (None: free)
        self._acceptance: dict[int, _Acceptance] = {}
        self._overall = _Acceptance()
        self._shadow: dict[int, int] = {}  # seq_id -> the first token it would have proposed
        self._realized: dict[int, _Realized] = {}  # by power-of-two bucket of the decoding batch

    @property
    def overall_alpha(self) -> float:
        o = self._overall
        return o.accepted / o.trials if o.trials else PRIOR_ALPHA

    def alpha(self, seq_id: int) -> float:
        return self._acceptance.get(seq_id, _Acceptance()).alpha(self.overall_alpha)

    def choose(self, caps: dict[int, int], step_tokens: int, decodes: int) -> dict[int, int]:
        """k per sequence (seq_id -> at most caps[seq_id]), for a step that computes `step_tokens`
        tokens and samples for `decodes` sequences without drafts; sequences left out decode normally.

        The m requests most likely to accept draft k tokens each (draft rounds are batched: one
        forward per draft position for all m): the (m, k) with the most expected tokens per second.
        """
        if not self.adaptive or self._overall.trials < EXPLORE_TRIALS:
            return {sid: min(cap, self.max_k) for sid, cap in caps.items()}
        realized = self._realized.setdefault((max(decodes, 1) - 1).bit_length(), _Realized())
        if realized.losing:  # the cost model said it pays, the clock says it does not: hold back
            realized.held_back += 1
            if realized.held_back < PROBE_EVERY:
                return {}
            realized.held_back = 0  # one step drafts again, to see whether it pays now
        ranked = sorted(caps, key=self.alpha, reverse=True)
        alphas = [self.alpha(sid) for sid in ranked]
        decodes = max(decodes, 1)
        best_rate = decodes / self.target_cost.seconds(step_tokens) * MIN_GAIN
        best_m = best_k = 0
        for m in range(1, len(ranked) + 1):
            round_seconds = self.draft_cost.seconds(m) * m if self.draft_cost else 0.0
            for k in range(1, self.max_k + 1):
                ks = [min(k, caps[sid]) for sid in ranked[:m]]
                tokens = decodes - m + sum(expected_tokens(a, kk) for a, kk in zip(alphas, ks))
                rate = tokens / (self.target_cost.seconds(step_tokens + sum(ks)) + k * round_seconds)
                if rate > best_rate:
                    best_rate, best_m, best_k = rate, m, k
        chosen = {sid: min(best_k, caps[sid]) for sid in ranked[:best_m]}
        # A request left out only for its own low acceptance, when a typical one would pay, probes now and then.
        base = decodes / self.target_cost.seconds(step_tokens)
        one_draft = self.target_cost.seconds(step_tokens + 1) + (self.draft_cost.seconds(1) if self.draft_cost else 0.0)
        typical_pays = (decodes + self.overall_alpha) / one_draft > base * MIN_GAIN
        for sid in ranked[best_m:]:
            if typical_pays and self._probe_due(sid):
                chosen[sid] = 1
        if chosen:
            realized.drafting += 1
            if len(realized.plain) < REALIZED_MIN or realized.drafting >= PROBE_EVERY:
                realized.drafting = 0
                return {}  # a plain step, timed, for the comparison
        return chosen

    def realized(self, decodes: int, drafted: bool, tokens_per_second: float) -> None:
        """A decode step's measured output rate (proposing included), for the check on the cost model."""
        self._realized.setdefault((max(decodes, 1) - 1).bit_length(), _Realized()).add(drafted, tokens_per_second)

    def _probe_due(self, seq_id: int) -> bool:
        """A draft-model request idle for PROBE_EVERY steps verifies one draft to see if it pays again."""
        acceptance = self._acceptance.get(seq_id)
        return self.draft_cost is not None and acceptance is not None and acceptance.idle_steps >= PROBE_EVERY

    def observe(self, seq_id: int, proposed: int, accepted: int) -> None:
        """A verification: `accepted` of `proposed` drafts kept (the first rejection ends the trials)."""
        trials = accepted + (accepted < proposed)
        self._acceptance.setdefault(seq_id, _Acceptance()).add(accepted, trials)
        self._overall.add(accepted, trials, OVERALL_FORGET)

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
            self._overall.add(int(guess == token), 1, OVERALL_FORGET)

    def forget(self, seq_id: int) -> None:
        self._acceptance.pop(seq_id, None)
        self._shadow.pop(seq_id, None)
