"""Online serving benchmark: load any OpenAI-compatible server and measure what its users would see.

    config = ServeBenchConfig("http://127.0.0.1:8000", request_rates=[1, 4, math.inf], num_prompts=64)
    result = run_serve_benchmark_sync(config)          # or: await run_serve_benchmark(config)
    print(format_table(result))

Requests arrive at each rate in turn (see workload.py), stream back through `/v1/completions`
or `/v1/chat/completions`, and are timed chunk by chunk (see metrics.py). A multi-tenant
workload (`tenants`) instead runs once: each tenant's requests on its own arrival clock, sent
with its name as `user`, and reported per tenant as well as overall. The result is a
JSON-ready dict: the config, then per rate a summary and every request's record. A caller
holding its own prompts passes them as `requests`; no tokenizer is loaded then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import aiohttp

from tokenmill.bench.metrics import LATENCIES, RequestRecord, summarize
from tokenmill.bench.prompts import parse_length
from tokenmill.bench.report import model_label
from tokenmill.bench.workload import (BenchRequest, TenantSpec, arrival_times, check_arrivals, check_prefix_len,
                                      load_dataset, load_tokenizer, synthetic_requests, tenant_workload)
from tokenmill.errors import InvalidParameterError, TokenmillError

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=6 * 60 * 60)  # one request may wait long behind a full server
ERROR_CHARS = 300  # of a failed request's message kept in its record


@dataclass
class ServeBenchConfig:
    """Everything a serving benchmark run depends on; checked when made, before any work."""

    base_url: str
    model: str | None = None  # the name sent; None asks GET /v1/models
    endpoint: str = "completions"  # or "chat"
    request_rates: Sequence[float] = (math.inf,)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_prompts: int | None = None  # None: 100 synthetic prompts, or the whole dataset
    input_len: int | str = 128
    output_len: int | str = 128
    shared_prefix_len: int = 0
    dataset: str | None = None  # a JSONL file instead of synthetic prompts
    tokenizer: str | None = None  # counts synthetic prompts; None: the default model's
    seed: int | None = 0
    temperature: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in ms, see metrics.parse_slos
    tenants: Sequence[TenantSpec] = ()  # a multi-tenant workload instead of one prompt set at request_rates

    def __post_init__(self):
        if self.tenants and (self.dataset is not None or self.shared_prefix_len):
            raise InvalidParameterError("tenant", "a multi-tenant workload makes its own synthetic prompts; "
                                                  "leave out --dataset and --shared-prefix-len")
        if len({t.name for t in self.tenants}) < len(self.tenants):
            raise InvalidParameterError("tenant", "tenant names must differ")
        if self.endpoint not in ENDPOINTS:
            raise InvalidParameterError("endpoint", f"must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.request_rates:
            raise InvalidParameterError("request_rate", "give at least one rate")
        for rate in self.request_rates:
            check_arrivals(rate, self.burstiness)
        for name in ("max_concurrency", "num_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidParameterError(name, f"must be at least 1, got {getattr(self, name)}")
        parse_length(self.output_len)
        if self.dataset is not None and self.shared_prefix_len:
            raise InvalidParameterError("shared_prefix_len", "applies to synthetic prompts, not to a dataset")
        check_prefix_len(self.shared_prefix_len, self.input_len)

    def to_dict(self) -> dict:
        """The config as reports record it: no API key, and file names rather than local paths."""
        d = {k: v for k, v in vars(self).items() if k != "api_key"}
        d["request_rates"] = [rate_label(r) for r in self.request_rates]
        d["dataset"] = Path(self.dataset).name if self.dataset else None
        d["tokenizer"] = None if self.dataset else model_label(self.tokenizer, "default")
        d["tenants"] = [{**vars(t), "rate": rate_label(t.rate)} for t in self.tenants]
        return d


def rate_label(rate: float) -> float | str:
    """A rate as JSON can hold it: inf becomes the string "inf"."""
    return "inf" if math.isinf(rate) else rate


def build_requests(config: ServeBenchConfig, tokenizer=None) -> list[BenchRequest]:
    """The prompt set: the dataset's, or synthetic ones counted with `tokenizer` (default: config.tokenizer's)."""
    if config.dataset is not None:
        return load_dataset(config.dataset, config.num_prompts, config.output_len, config.seed)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
    return synthetic_requests(tokenizer, config.num_prompts or 100, config.input_len, config.output_len,
                              config.shared_prefix_len, config.seed)


# ---- the client -----------------------------------------------------------------------------


def _api_root(base_url: str) -> str:
    """"http://host:8000", ".../" and ".../v1" all name the same server."""
    return base_url.rstrip("/").removesuffix("/v1")


async def fetch_model_name(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model the server lists, for servers that want a `model` field."""
    url = _api_root(base_url) + "/v1/models"
    try:
        async with session.get(url) as resp:
            status, text = resp.status, await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise TokenmillError(f"could not ask {url} for its models ({type(e).__name__}: {e}); is the server up?") from e
    if status != 200:
        raise TokenmillError(f"GET {url} answered HTTP {status}: {_error_message(text)}; pass --model")
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError, IndexError):
        return str(json.loads(text)["data"][0]["id"])
    raise TokenmillError(f"GET {url} lists no models; pass --model")


def request_body(config: ServeBenchConfig, model: str, request: BenchRequest) -> dict:
    """The JSON body of one streamed request."""
    body = {"model": model, "max_tokens": request.output_len, "temperature": config.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if request.tenant is not None:
        body["user"] = request.tenant
    if request.priority is not None:
        body["priority"] = request.priority
    if config.ignore_eos:  # min_tokens too: servers without ignore_eos (llama.cpp's) still run the full length
        body["ignore_eos"] = True
        body["min_tokens"] = request.output_len
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


def _error_text(error) -> str:
    """The message of an OpenAI-style error object ({"message": ...}), or the object as text."""
    return str(error.get("message", error) if isinstance(error, dict) else error)[:ERROR_CHARS]


def _error_message(body: str) -> str:
    """The message of an OpenAI-style error body, or the start of the body as it is."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return _error_text(json.loads(body)["error"])
    return body.strip()[:ERROR_CHARS]


async def _sse_events(content: aiohttp.StreamReader):
    """The JSON objects of a server-sent event stream, up to `data: [DONE]` or its end."""
    async for raw in content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if not isinstance(event, dict):
            raise ValueError(f"a stream event is not a JSON object: {data[:80]}")
        yield event


def _chunk_text(event: dict, endpoint: str) -> str:
    """The text a streamed chunk carries: choices[0].text, or delta.content for chat."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return ((choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")) or ""


async def _read_stream(resp: aiohttp.ClientResponse, record: RequestRecord, sent: float, endpoint: str) -> None:
    """Time the text chunks of one response into `record`; tokens from the usage chunk, else chunks counted."""
    last = None
    chunks = 0
    usage = None
    async for event in _sse_events(resp.content):
        now = time.perf_counter()
        if event.get("error"):
            record.error = _error_text(event["error"])
            return
        usage = event.get("usage") or usage
        if not _chunk_text(event, endpoint):
            continue
        if last is None:
            record.ttft = now - sent
        else:
            record.itl.append(now - last)
        last = now
        chunks += 1
    record.e2e = time.perf_counter() - sent
    if last is None:
        record.error = "the stream carried no text"
        return
    usage = usage or {}
    record.output_tokens = usage.get("completion_tokens") or chunks
    record.prompt_len = usage.get("prompt_tokens") or record.prompt_len
    record.success = True


async def send_request(session: aiohttp.ClientSession, url: str, body: dict, endpoint: str,
                       record: RequestRecord) -> RequestRecord:
    """POST one streamed request and fill in `record`; a failure is recorded, never raised."""
    sent = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                record.status, record.error = resp.status, _error_message(await resp.text())
                return record
            await _read_stream(resp, record, sent, endpoint)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: a malformed stream
        record.error = f"{type(e).__name__}: {e}"[:ERROR_CHARS]
    return record


# ---- one run per rate -----------------------------------------------------------------------


async def _run(session: aiohttp.ClientSession, config: ServeBenchConfig, model: str,
               requests: Sequence[BenchRequest], times: Sequence[float]) -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time (waiting for a --max-concurrency slot); records and wall time."""
    url = _api_root(config.base_url) + ENDPOINTS[config.endpoint]
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
    start = time.perf_counter()

    async def one(request: BenchRequest, at: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        async with slots:
            record = RequestRecord(request.prompt_len, request.output_len, start=time.perf_counter() - start,
                                   tenant=request.tenant)
            return await send_request(session, url, request_body(config, model, request), config.endpoint, record)

    records = await asyncio.gather(*(one(r, t) for r, t in zip(requests, times)))
    return list(records), time.perf_counter() - start


async def run_serve_benchmark(config: ServeBenchConfig, requests: Sequence[BenchRequest] | None = None,
                              log: Callable[[str], None] | None = None) -> dict:
    """Run the prompt set at each of config.request_rates in turn; return a JSON-ready dict."""
    say = log or (lambda msg: None)
    times = None
    if config.tenants:
        say(f"building the workload of {len(config.tenants)} tenants")
        requests, times = tenant_workload(load_tokenizer(config.tokenizer), list(config.tenants), config.seed)
    elif requests is None:
        say("building the prompt set")
        requests = build_requests(config)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    # No connection cap of aiohttp's own (100 by default): only --max-concurrency limits the load, and
    # before the clock of a request starts, so waiting for a slot does not count as TTFT. A new
    # connection per request: servers that close idle keep-alive connections (llama.cpp's does)
    # would otherwise fail requests sent on a pooled connection they just closed
    # ("Can not write request body"), a failure of the client, not of the server.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT, headers=headers, connector=connector) as session:
        model = config.model or await fetch_model_name(session, config.base_url)
        runs = []
        if times is not None:
            say(f"{len(requests)} requests of {len(config.tenants)} tenants to {model}")
            records, duration = await _run(session, config, model, requests, times)
            tenants = {t.name: summarize([r for r in records if r.tenant == t.name], duration, config.goodput)
                       for t in config.tenants}
            runs.append({"request_rate": "tenants", "summary": summarize(records, duration, config.goodput),
                         "tenants": tenants, "requests": [r.to_dict() for r in records]})
        for rate in config.request_rates if times is None else ():
            say(f"{len(requests)} requests to {model} at request rate {rate_label(rate)}")
            times_at_rate = arrival_times(len(requests), rate, config.burstiness, config.seed)
            records, duration = await _run(session, config, model, requests, times_at_rate)
            runs.append({"request_rate": rate_label(rate), "summary": summarize(records, duration, config.goodput),
                         "requests": [r.to_dict() for r in records]})
    return {"model": model, "num_prompts": len(requests), "config": config.to_dict(), "runs": runs}


def run_serve_benchmark_sync(config: ServeBenchConfig, requests: Sequence[BenchRequest] | None = None,
                             log: Callable[[str], None] | None = None) -> dict:
    """run_serve_benchmark for callers without an event loop."""
    return asyncio.run(run_serve_benchmark(config, requests, log))


# ---- reporting ------------------------------------------------------------------------------


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """A markdown table, one column per request rate, as the CLI prints it."""
    runs = result["runs"]
    summaries = [run["summary"] for run in runs]
    rows = [("completed requests", "completed", 0), ("failed requests", "failed", 0), ("duration (s)", "duration_s", 2),
            ("requests/s", "request_throughput", 2), ("output tok/s", "output_throughput", 1),
            ("total tok/s", "total_token_throughput", 1)]
    if "goodput" in summaries[0]:
        rows.append(("goodput (requests/s)", "goodput", 2))
    lines = [f"model {result['model']}, {result['num_prompts']} requests per rate",
             "| metric | " + " | ".join(f"rate {run['request_rate']}" for run in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    lines += [f"| {label} | " + " | ".join(_cell(s[key], digits) for s in summaries) + " |" for label, key, digits in rows]
    for name in LATENCIES:
        for stat in ("mean", "median", "p90", "p99"):
            cells = " | ".join(_cell(s[name][f"{stat}_ms"], 1) for s in summaries)
            lines.append(f"| {name.upper()} {stat} (ms) | {cells} |")
    for run in runs:
        for message, count in run["summary"]["errors"].items():
            lines.append(f"rate {run['request_rate']}: {count} failed with {message}")
        if "tenants" in run:
            lines += ["", format_tenant_table(run)]
    return "\n".join(lines)


def format_tenant_table(run: dict) -> str:
    """One row per tenant and one for all: completions, output tok/s, TTFT and E2E median and p99."""
    lines = ["| tenant | completed | output tok/s | TTFT median (ms) | TTFT p99 (ms) | E2E median (ms) | E2E p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in [*run["tenants"].items(), ("all", run["summary"])]:
        lines.append(f"| {name} | {s['completed']} | {_cell(s['output_throughput'], 1)} | "
                     f"{_cell(s['ttft']['median_ms'], 0)} | {_cell(s['ttft']['p99_ms'], 0)} | "
                     f"{_cell(s['e2e']['median_ms'], 0)} | {_cell(s['e2e']['p99_ms'], 0)} |")
    return "\n".join(lines)


def plot_latencies(result: dict, path: str | Path) -> Path:
    """Median and p99 of TTFT, TPOT and E2E against request rate, one panel each, as a PNG.

    Rates sit at even steps labelled with their values, so inf has a place on the axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [str(run["request_rate"]) for run in result["runs"]]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name in zip(fig.subplots(1, 3), ("ttft", "tpot", "e2e")):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            values = [run["summary"][name][f"{stat}_ms"] for run in result["runs"]]
            ax.plot(range(len(labels)), [math.nan if v is None else v for v in values], style, label=stat)
        ax.set(title=name.upper(), xlabel="request rate (requests/s)", ylabel="ms",
               xticks=range(len(labels)), xticklabels=labels)
        ax.legend()
    fig.suptitle(f"{result['model']}: latency against request rate")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
