"""The output processor: a step's new tokens -> text, stop strings, grammar progress, RequestOutputs.

The scheduler has appended each sequence's new tokens and ended those that met a stop token or
a length limit (`Scheduler.update_from_output`). This module reads the same tokens one at a
time, as the user will: their logprobs, their text (detokenized incrementally), the stop
strings they complete and the grammar they advance. A stop string or a complete grammar ends a
sequence at that token; the tokens the step emitted after it are dropped. At the token where
the scheduler ended a sequence, a stop token wins over a stop string and a stop string over the
length limit, so the finish reason is the one the first met condition gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.errors import InvalidParameterError
from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.sequence import Sequence
from tokenmill.step_plan import ScheduledChunk, SequenceUpdate, StepResult
from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    finished_seqs: int = 0

    @property
    def finished(self) -> bool:
        return self.finished_seqs == len(self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}  # by seq_id

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if self.tokenizer is not None:
            for seq in request.seqs:
                self._detokenizers[seq.seq_id] = IncrementalDetokenizer(
                    self.tokenizer, request.prompt_token_ids, request.params.skip_special_tokens)

    def pop(self, request_id: str) -> Request | None:
        """Take a request out (aborted, or finished)."""
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request is not None else ():
            self._detokenizers.pop(seq.seq_id, None)
        return request

    def process(self, chunks: list[ScheduledChunk], result: StepResult, updates: list[SequenceUpdate],
                scheduled_at: float, now: float) -> dict[str, Exception]:
        """Record the step in the sequences and their requests; return the requests whose grammar
        failed (they must end: the grammar hit llguidance's work limits, the request's fault)."""
        for chunk in chunks:
            metrics = self.requests[chunk.seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = scheduled_at
        for seq, logprobs in result.prompt_logprobs:
            seq.prompt_logprobs += [logprob_entry(logprobs, i) for i in range(len(logprobs.token_ids))]
        failed: dict[str, Exception] = {}
        for update in updates:
            seq = update.seq
            request = self.requests[seq.request_id]
            error = self._read_tokens(update, result, now)
            if error is not None:
                failed[seq.request_id] = error
            request.metrics.spec_draft_tokens += update.proposed
            request.metrics.spec_accepted_tokens += update.accepted
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            if seq.finish_reason is not None:
                request.finished_seqs += 1
        return failed

    def outputs(self, updates: list[SequenceUpdate], now: float) -> list[RequestOutput]:
        """The outputs of the requests that sampled this step (in order); finished ones are taken out."""
        touched = {u.seq.request_id: self.requests[u.seq.request_id] for u in updates if u.seq.request_id in self.requests}
        outputs = []
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                self.pop(request.request_id)
            outputs.append(_output(request))
        return outputs

    def _read_tokens(self, update: SequenceUpdate, result: StepResult, now: float) -> Exception | None:
        seq, tokens, params = update.seq, update.tokens, update.seq.params
        ended_by_scheduler = seq.finish_reason  # set at the last token when a stop token or a limit ended it
        outputs_before = seq.num_output_tokens - len(tokens)
        detokenizer = self._detokenizers.get(seq.seq_id)
        samples = result.samples
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.logprobs is not None:
                seq.logprobs.append(logprob_entry(samples, update.first_row + i))
                seq.cumulative_logprob += samples.logprobs[update.first_row + i]
            delta = detokenizer.step(token) if detokenizer is not None else ""
            seq.text += delta
            num_output = outputs_before + i + 1
            if seq.grammar is not None and token not in self.eos_token_ids and not seq.grammar.advance(token):
                self._end(seq, len(tokens) - i - 1, "abort", None)
                return InvalidParameterError(params.structured_outputs.field, (
                    f"the grammar failed at output token {num_output}: {seq.grammar.error}"))
            if last and ended_by_scheduler == "stop":  # an EOS or a stop token id: nothing else counts
                return None
            if params.stop and delta and num_output >= params.min_tokens and _cut_stop_string(seq, len(delta)):
                self._end(seq, len(tokens) - i - 1, "stop", seq.stop_reason)  # as in vLLM, stop strings wait for min_tokens too
                return None
            if seq.grammar is not None and seq.grammar.done:  # the grammar is complete: nothing may follow
                self._end(seq, len(tokens) - i - 1, "stop", None)
                return None
        return None

    @staticmethod
    def _end(seq: Sequence, later_tokens: int, reason: str, stop_reason: int | str | None) -> None:
        """End `seq` here: the step's `later_tokens` tokens after this one were never emitted."""
        if later_tokens:
            del seq.token_ids[-later_tokens:]
        seq.finish_reason, seq.stop_reason = reason, stop_reason


def _cut_stop_string(seq: Sequence, delta_len: int) -> bool:
    """Find a stop string that the newest text completes (it ends inside the newest `delta_len`
    characters: one met before min_tokens stays text); cut the text there."""
    text = seq.text
    hits = [(text.find(s, max(0, len(text) - delta_len - len(s) + 1)), s) for s in seq.params.stop]
    hits = [(i, s) for i, s in hits if i != -1]
    if not hits:
        return False
    index, stop = min(hits)
    seq.text = text[: index + len(stop)] if seq.params.include_stop_str_in_output else text[:index]
    seq.stop_reason = stop
    return True


def logprob_entry(samples, row: int) -> dict[int, Logprob]:
    """Row `row`'s token and top tokens, token id -> Logprob (rank 1 = most likely)."""
    entry = {tid: Logprob(lp, rank + 1) for rank, (tid, lp) in enumerate(samples.top_logprobs[row])}
    entry[samples.token_ids[row]] = Logprob(samples.logprobs[row], samples.ranks[row])
    return entry


def _output(request: Request) -> RequestOutput:
    outputs = []
    for seq in request.seqs:
        text = seq.text if seq.is_finished else seq.text[: len(seq.text) - _stop_holdback(seq.text, seq.params.stop)]
        outputs.append(CompletionOutput(
            index=seq.index, text=text, token_ids=seq.output_token_ids,
            logprobs=seq.logprobs, cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs,
                         request.finished, request.metrics, request.seqs[0].num_cached_tokens or 0,
                         request.seqs[0].prompt_logprobs)


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        tail = text[len(text) - min(len(stop) - 1, len(text)):] if len(stop) > 1 else ""
        start = tail.find(stop[0])  # only tails that begin with the stop's first character can grow into it
        while start != -1 and len(tail) - start > best:
            if stop.startswith(tail[start:]):
                best = len(tail) - start
                break
            start = tail.find(stop[0], start + 1)
    return best
