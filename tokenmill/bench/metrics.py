"""Per-request timings of `tokenmill bench serve` and their summary, as vLLM's benchmark_serving defines them.

TTFT is the time to the first streamed chunk carrying text, ITL the gaps between successive
text chunks, E2E the time to the end of the stream, and TPOT = (E2E - TTFT) / (output tokens - 1).
Goodput counts the completed requests that meet every given SLO, per second of the run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from tokenmill.errors import InvalidParameterError

LATENCIES = ("ttft", "tpot", "itl", "e2e")
SLO_METRICS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds."""

    prompt_len: int | None  # tokens of the prompt: the server's count when it reports usage
    output_len: int  # tokens asked for (max_tokens)
    start: float = 0.0  # when it was sent, from the start of the run
    success: bool = False
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    status: int | None = None  # the HTTP status of a failed request, if it got one
    error: str | None = None
    tenant: str | None = None  # of a multi-tenant workload

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; undefined below two tokens."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "tpot": self.tpot}


def latency_stats(seconds: Sequence[float]) -> dict:
    """Mean, median, p90 and p99 in milliseconds (percentiles interpolated linearly, as numpy
    and vLLM do); None when there are no values, e.g. TPOT when every output is one token."""
    keys = ("mean_ms", "median_ms", "p90_ms", "p99_ms")
    if len(seconds) == 0:
        return dict.fromkeys(keys)
    ms = np.asarray(seconds, dtype=float) * 1000.0
    values = [ms.mean(), *np.percentile(ms, [50, 90, 99])]
    return {k: float(v) for k, v in zip(keys, values)}


def parse_slos(specs: Iterable[str]) -> dict[str, float]:
    """{"ttft": 200.0, ...} from "ttft:200"-style specs in milliseconds."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, _, value = str(spec).partition(":")
        if name not in SLO_METRICS:
            raise InvalidParameterError("goodput", f"{spec!r}: the metric must be one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise InvalidParameterError("goodput", f"{spec!r}: need METRIC:MILLISECONDS, e.g. ttft:200") from None
        if not ms > 0:
            raise InvalidParameterError("goodput", f"{spec!r}: the SLO must be a positive number of milliseconds")
        slos[name] = ms
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """A completed request meets an SLO when its value is at most the SLO; like vLLM, a
    one-token output (no TPOT) meets any TPOT SLO."""
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}
    return all(values[name] is None or values[name] * 1000.0 <= ms for name, ms in slos.items())


def summarize(records: Sequence[RequestRecord], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    """The run's counts, throughputs, goodput (when SLOs are given) and latency statistics."""
    done = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
    }
    if slos:
        summary["goodput"] = sum(meets_slos(r, slos) for r in done) / duration_s
    series = {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.tpot is not None],
              "itl": [gap for r in done for gap in r.itl], "e2e": [r.e2e for r in done]}
    summary.update({name: latency_stats(series[name]) for name in LATENCIES})
    summary["errors"] = dict(Counter(_error_label(r) for r in records if not r.success))
    return summary


def _error_label(record: RequestRecord) -> str:
    return f"HTTP {record.status}: {record.error}" if record.status is not None else str(record.error)
