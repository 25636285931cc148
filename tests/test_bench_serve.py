"""`tokenmill bench serve` without a model server: statistics on hand-made records, arrivals,
prompt synthesis, datasets, argument errors, and the client's streaming protocol against a
small stand-in server that sends canned OpenAI-format chunks."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import numpy as np
import pytest
from aiohttp import web

from tokenmill.bench import serve
from tokenmill.bench.metrics import RequestRecord, latency_stats, parse_slos, summarize
from tokenmill.bench.workload import (BenchRequest, TenantSpec, arrival_times, load_dataset, load_tokenizer,
                                      synthetic_requests, tenant_workload)
from tokenmill.entrypoints import cli
from tokenmill.errors import InvalidParameterError

# ---- statistics -----------------------------------------------------------------------------


def test_latency_stats_interpolate_like_numpy():
    stats = latency_stats([0.001, 0.002, 0.003, 0.004])
    assert stats == pytest.approx({"mean_ms": 2.5, "median_ms": 2.5, "p90_ms": 3.7, "p99_ms": 3.97})
    assert latency_stats([]) == {"mean_ms": None, "median_ms": None, "p90_ms": None, "p99_ms": None}


def hand_made_records() -> list[RequestRecord]:
    return [
        RequestRecord(10, 5, success=True, ttft=0.1, itl=[0.1] * 4, e2e=0.5, output_tokens=5),  # TPOT 0.1
        RequestRecord(20, 4, success=True, ttft=0.2, itl=[0.3] * 3, e2e=1.1, output_tokens=4),  # TPOT 0.3
        RequestRecord(None, 8, status=500, error="boom"),
        RequestRecord(5, 1, success=True, ttft=0.05, e2e=0.05, output_tokens=1),  # no TPOT
    ]


def test_tpot_follows_vllm_definition():
    a, b, failed, one_token = hand_made_records()
    assert a.tpot == pytest.approx(0.1)
    assert b.tpot == pytest.approx(0.3)
    assert failed.tpot is None and one_token.tpot is None
    assert a.to_dict()["tpot"] == pytest.approx(0.1)


def test_summary_of_hand_made_records():
    s = summarize(hand_made_records(), duration_s=2.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (35, 10)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(5.0)
    assert s["total_token_throughput"] == pytest.approx(22.5)
    # TTFT over [50, 100, 200] ms; TPOT over [100, 300]; ITL over 4 x 100 and 3 x 300; E2E over [50, 500, 1100].
    assert s["ttft"] == pytest.approx({"mean_ms": 350 / 3, "median_ms": 100, "p90_ms": 180, "p99_ms": 198})
    assert s["tpot"] == pytest.approx({"mean_ms": 200, "median_ms": 200, "p90_ms": 280, "p99_ms": 298})
    assert s["itl"] == pytest.approx({"mean_ms": 1300 / 7, "median_ms": 100, "p90_ms": 300, "p99_ms": 300})
    assert s["e2e"]["median_ms"] == pytest.approx(500)
    assert s["errors"] == {"HTTP 500: boom": 1}
    assert "goodput" not in s


@pytest.mark.parametrize("slos, good", [
    ({"ttft": 150}, 2),  # 100 and 50 ms meet it, 200 does not
    ({"tpot": 200}, 2),  # 100 ms meets it, 300 does not, the one-token request has no TPOT and counts
    ({"ttft": 150, "e2e": 400}, 1),  # only the one-token request meets both
    ({"ttft": 200, "tpot": 301, "e2e": 1101}, 3),  # a TTFT of exactly 200 ms meets 200; failures never count
])
def test_goodput_counts_requests_meeting_every_slo(slos, good):
    assert summarize(hand_made_records(), 2.0, slos)["goodput"] == pytest.approx(good / 2.0)


def test_parse_slos():
    assert parse_slos(["ttft:200", "tpot:50.5", "e2e:5000"]) == {"ttft": 200.0, "tpot": 50.5, "e2e": 5000.0}
    for bad, says in [("speed:5", "one of"), ("ttft", "METRIC:MILLISECONDS"), ("ttft:fast", "METRIC:MILLISECONDS"),
                      ("tpot:0", "positive")]:
        with pytest.raises(InvalidParameterError, match=says):
            parse_slos([bad])


# ---- arrivals -------------------------------------------------------------------------------


def test_poisson_arrivals_have_mean_gap_one_over_rate():
    times = arrival_times(200_001, rate=4.0, seed=0)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.02)
    assert gaps.var() == pytest.approx(0.25 ** 2, rel=0.05)  # exponential: variance = mean^2
    assert arrival_times(100, 4.0, seed=0) == times[:100]
    assert arrival_times(100, 4.0, seed=1) != times[:100]


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_sets_the_gamma_variance(burstiness):
    gaps = np.diff(arrival_times(200_001, rate=4.0, burstiness=burstiness, seed=0))
    assert gaps.mean() == pytest.approx(0.25, rel=0.02)
    assert gaps.var() == pytest.approx(1 / (4.0 ** 2 * burstiness), rel=0.05)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(5, math.inf) == [0.0] * 5
    for rate, burstiness in [(0, 1), (-1, 1), (math.nan, 1), (1, 0)]:
        with pytest.raises(InvalidParameterError):
            arrival_times(5, rate, burstiness)


# ---- prompts --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["stories260k", "default"])
def tokenizer(request):
    """A sentencepiece tokenizer (stories260k) and a byte-level BPE one (the default model)."""
    if request.param == "default":
        request.getfixturevalue("default_model_available")
        return load_tokenizer(None)
    return load_tokenizer(str(request.getfixturevalue("stories_path")))


def count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_synthetic_prompts_have_exactly_the_asked_token_counts(tokenizer):
    requests = synthetic_requests(tokenizer, 40, "1:200", "3:9", seed=5)
    assert [count(tokenizer, r.prompt) for r in requests] == [r.prompt_len for r in requests]
    assert all(1 <= r.prompt_len <= 200 for r in requests) and all(3 <= r.output_len <= 9 for r in requests)
    assert len({r.prompt_len for r in requests}) > 20  # lengths are drawn from the range, not fixed
    assert synthetic_requests(tokenizer, 40, "1:200", "3:9", seed=5) == requests
    assert synthetic_requests(tokenizer, 40, "1:200", "3:9", seed=6) != requests


def test_shared_prefix_is_shared_as_text_and_tokens(tokenizer):
    requests = synthetic_requests(tokenizer, 12, "40:80", 4, shared_prefix_len=32, seed=0)
    ids = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in requests]
    assert [len(i) for i in ids] == [r.prompt_len for r in requests]
    assert len({tuple(i[:32]) for i in ids}) == 1
    assert len({tuple(i[32:]) for i in ids}) == 12
    prefix = tokenizer.decode(ids[0][:32])
    assert all(r.prompt.startswith(prefix) for r in requests)


def test_shared_prefix_must_fit_the_shortest_prompt(tokenizer):
    with pytest.raises(InvalidParameterError, match="shared_prefix_len"):
        synthetic_requests(tokenizer, 2, "16:64", 4, shared_prefix_len=17)


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dataset_lines(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "Hello", "output_len": 7}), "",
                                           json.dumps({"prompt": "World", "extra": 1}), json.dumps({"prompt": "Third"})])
    requests = load_dataset(f, output_len="20:30")
    assert [r.prompt for r in requests] == ["Hello", "World", "Third"]
    assert requests[0].output_len == 7 and all(20 <= r.output_len <= 30 for r in requests[1:])
    assert all(r.prompt_len is None for r in requests)
    assert load_dataset(f, num_prompts=2, output_len="20:30") == requests[:2]
    with pytest.raises(InvalidParameterError, match="holds 3 prompts, fewer than --num-prompts 4"):
        load_dataset(f, num_prompts=4)


@pytest.mark.parametrize("bad, says", [
    ('{"prompt": "a", ', "line 2: bad JSON"),
    ('["a list"]', 'line 2: need an object with a string "prompt"'),
    ('{"text": "no prompt"}', 'line 2: need an object with a string "prompt"'),
    ('{"prompt": "a", "output_len": 0}', 'line 2: "output_len" must be a positive integer'),
    ('{"prompt": "a", "output_len": "9"}', 'line 2: "output_len" must be a positive integer'),
])
def test_malformed_dataset_line_is_named(tmp_path, bad, says):
    f = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "fine"}), bad])
    with pytest.raises(InvalidParameterError, match=f"bad.jsonl {says}"):
        load_dataset(f)


# ---- argument errors ------------------------------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["--input-len", "5:2"], "need 1 <= low <= high"),
    (["--output-len", "x"], "not a length"),
    (["--request-rate", "1", "0"], "request_rate: must be a positive number or inf"),
    (["--burstiness", "0"], "burstiness: must be positive"),
    (["--max-concurrency", "0"], "max_concurrency: must be at least 1"),
    (["--num-prompts", "0"], "num_prompts: must be at least 1"),
    (["--input-len", "16", "--shared-prefix-len", "17"], "shortest input length 16"),
    (["--goodput", "ttft:abc"], "goodput"),
])
def test_bad_arguments_exit_2_before_any_work(args, says, capsys):
    # Port 9 (discard) has no server: a check that let the run start would fail differently.
    assert cli.main(["bench", "serve", "--base-url", "http://127.0.0.1:9", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenmill: error:") and says in err and "Traceback" not in err


def test_missing_base_url_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "serve"])
    assert e.value.code == 2
    assert "--base-url" in capsys.readouterr().err


# ---- the client against a stand-in server ---------------------------------------------------


class FakeServer:
    """An OpenAI-compatible stand-in: lists one model and streams canned chunks for `max_tokens`.

    Each stream opens with a chunk without text (as chat servers send the role), joins the
    last two tokens into one chunk (as a detokenizer holding a partial character does), and
    splits one SSE line across two writes. The prompt "reject" gets a 400, "die" an error
    event mid-stream, "garble" a line that is not JSON. It records what it was sent and the most requests it had in flight.
    """

    def __init__(self):
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.usage = True
        self.models_status = 200
        self.in_flight = self.max_in_flight = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        return app

    async def models(self, request: web.Request) -> web.Response:
        if self.models_status != 200:
            return web.json_response({"error": {"message": "no key"}}, status=self.models_status)
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        chat = "messages" in body
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        if prompt == "reject":
            return web.json_response({"error": {"message": "bad prompt", "type": "invalid_request_error"}}, status=400)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._stream(request, body, chat, prompt)
        finally:
            self.in_flight -= 1

    async def _stream(self, request, body, chat, prompt) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if prompt == "garble":
            await resp.write(b"data: {oops\n\n")
        n = body["max_tokens"]
        pieces = [f"t{i} " for i in range(n - 2)] + [f"t{n - 2} t{n - 1} "]
        events = [self._chunk(chat, "", role=True)] + [self._chunk(chat, p) for p in pieces]
        if prompt == "die":
            events.insert(2, {"error": {"message": "engine died"}})
        if self.usage and body.get("stream_options", {}).get("include_usage"):
            events.append({"choices": [], "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": n}})
        for i, event in enumerate(events):
            line = f"data: {json.dumps(event)}\n\n".encode()
            if i == 1:
                await resp.write(line[:9])
                await asyncio.sleep(0.001)
                line = line[9:]
            await resp.write(line)
            await asyncio.sleep(0.001)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    @staticmethod
    def _chunk(chat: bool, text: str, role: bool = False) -> dict:
        if chat:
            return {"object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"role": "assistant"} if role else {"content": text}}]}
        return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}


@pytest.fixture
def fake_server():
    """The stand-in, on its own event loop in a thread, so the sync API and the CLI can call it."""
    server = FakeServer()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def records(result: dict, run: int = 0) -> list[dict]:
    return result["runs"][run]["requests"]


def test_completions_stream_is_timed_chunk_by_chunk(fake_server):
    config = serve.ServeBenchConfig(fake_server.url + "/v1/", api_key="sk-test")
    requests = [BenchRequest("one two three", 6), BenchRequest("reject", 6), BenchRequest("four", 3)]
    result = serve.run_serve_benchmark_sync(config, requests)
    assert result["model"] == "fake-model"
    ok, rejected, short = records(result)
    assert rejected["success"] is False and rejected["status"] == 400 and rejected["error"] == "bad prompt"
    for rec, n, prompt_tokens in [(ok, 6, 3), (short, 3, 1)]:
        assert rec["success"] is True and rec["error"] is None
        assert rec["output_tokens"] == n  # the usage chunk, though the text came in n - 1 chunks
        assert len(rec["itl"]) == n - 2  # gaps between the n - 1 text chunks; the empty first chunk is no token
        assert rec["prompt_len"] == prompt_tokens
        assert 0 < rec["ttft"] <= rec["e2e"]
        assert rec["tpot"] == pytest.approx((rec["e2e"] - rec["ttft"]) / (n - 1))
    summary = result["runs"][0]["summary"]
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (2, 1, 9)
    assert summary["errors"] == {"HTTP 400: bad prompt": 1}
    sent = fake_server.bodies[0]
    assert sent == {"model": "fake-model", "prompt": "one two three", "max_tokens": 6, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
                    "min_tokens": 6}
    assert all(h["Authorization"] == "Bearer sk-test" for h in fake_server.headers)
    assert "api_key" not in result["config"]


def test_chat_stream_without_usage_counts_chunks(fake_server):
    fake_server.usage = False
    config = serve.ServeBenchConfig(fake_server.url, model="named", endpoint="chat", ignore_eos=False,
                                    temperature=0.5)
    result = serve.run_serve_benchmark_sync(config, [BenchRequest("hi there", 5, prompt_len=2)])
    (rec,) = records(result)
    assert rec["success"] is True
    assert rec["output_tokens"] == 4  # no usage chunk: the 4 chunks with text
    assert len(rec["itl"]) == 3 and rec["prompt_len"] == 2
    sent = fake_server.bodies[0]
    assert sent["messages"] == [{"role": "user", "content": "hi there"}] and sent["model"] == "named"
    assert "ignore_eos" not in sent and "min_tokens" not in sent and sent["temperature"] == 0.5
    assert "Authorization" not in fake_server.headers[0]


def test_stream_error_and_dead_server_are_recorded_not_raised(fake_server):
    result = serve.run_serve_benchmark_sync(serve.ServeBenchConfig(fake_server.url, model="m"),
                                            [BenchRequest("die", 4), BenchRequest("garble", 4), BenchRequest("fine", 4)])
    died, garbled, fine = records(result)
    assert died["success"] is False and died["error"] == "engine died" and died["status"] is None
    assert garbled["success"] is False and garbled["error"].startswith("JSONDecodeError")
    assert fine["success"] is True
    gone = serve.run_serve_benchmark_sync(serve.ServeBenchConfig("http://127.0.0.1:9", model="m"),
                                          [BenchRequest("x", 2)])
    (rec,) = records(gone)
    assert rec["success"] is False and "ClientConnectorError" in rec["error"]


def test_cli_runs_each_rate_and_writes_json_and_plot(fake_server, tmp_path, capsys):
    dataset = write_lines(tmp_path / "prompts.jsonl",
                          [json.dumps({"prompt": f"prompt {i}", "output_len": 3 + i % 3}) for i in range(6)])
    out, png = tmp_path / "serve.json", tmp_path / "latency.png"
    code = cli.main(["bench", "serve", "--base-url", fake_server.url, "--dataset", str(dataset),
                     "--request-rate", "50", "inf", "--max-concurrency", "2", "--goodput", "ttft:60000", "e2e:60000",
                     "--output-json", str(out), "--plot", str(png)])
    assert code == 0
    table = capsys.readouterr().out
    for text in ("rate 50.0", "rate inf", "TTFT p99 (ms)", "TPOT median (ms)", "ITL mean (ms)", "E2E p90 (ms)",
                 "goodput (requests/s)", "output tok/s"):
        assert text in table
    result = json.loads(out.read_text())
    assert [run["request_rate"] for run in result["runs"]] == [50.0, "inf"]
    for run in result["runs"]:
        assert len(run["requests"]) == 6 and run["summary"]["completed"] == 6
        assert run["summary"]["total_output_tokens"] == 3 + 4 + 5 + 3 + 4 + 5
        assert run["summary"]["goodput"] == pytest.approx(run["summary"]["request_throughput"])
    assert result["config"]["dataset"] == "prompts.jsonl"  # a file name, never a local path
    assert fake_server.max_in_flight <= 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreachable_server_without_model_exits_2(tmp_path, capsys):
    dataset = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "x"})])
    assert cli.main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--dataset", str(dataset)]) == 2
    err = capsys.readouterr().err
    assert "/v1/models" in err and "is the server up?" in err


def test_model_listing_refused_exits_2_asking_for_model(fake_server, tmp_path, capsys):
    fake_server.models_status = 401
    dataset = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "x"})])
    assert cli.main(["bench", "serve", "--base-url", fake_server.url, "--dataset", str(dataset)]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401: no key; pass --model" in err
    assert not fake_server.bodies  # nothing was sent without a model name


def test_against_a_real_tokenmill_server(tiny_chat_model, tmp_path, capsys):
    """The whole loop: `tokenmill bench serve` driving a real `tokenmill serve`, both endpoints."""
    from server_process import ServerProcess

    with ServerProcess(["--model", str(tiny_chat_model), "--kv-cache-memory", "64MiB", "--api-key", "k"]) as server:
        out = tmp_path / "serve.json"
        for endpoint in ("completions", "chat"):
            code = cli.main(["bench", "serve", "--base-url", server.url, "--api-key", "k", "--endpoint", endpoint,
                         "--tokenizer", str(tiny_chat_model), "--num-prompts", "12", "--input-len", "8:24",
                         "--output-len", "6", "--shared-prefix-len", "4", "--request-rate", "50", "inf",
                         "--max-concurrency", "4", "--goodput", "ttft:60000", "--output-json", str(out)])
            assert code == 0
            result = json.loads(out.read_text())
            assert [run["request_rate"] for run in result["runs"]] == [50.0, "inf"]
            for run in result["runs"]:
                summary = run["summary"]
                assert (summary["completed"], summary["failed"]) == (12, 0)
                assert summary["total_output_tokens"] == 12 * 6  # ignore_eos + min_tokens: the full length
                assert summary["goodput"] == pytest.approx(summary["request_throughput"])
                for rec in run["requests"]:
                    assert 0 < rec["ttft"] <= rec["e2e"] and len(rec["itl"]) >= 1
                    if endpoint == "completions":
                        assert 8 <= rec["prompt_len"] <= 24  # as the server counted it
        assert "TTFT median" in capsys.readouterr().out
        assert server.metric("tokenmill_requests_total", 'status="length"') == 4 * 12
        assert server.metric("tokenmill_num_requests_running") == 0


# ---- multi-tenant workloads -----------------------------------------------------------------


def test_tenant_specs_parse_and_bad_ones_are_named():
    t = TenantSpec.parse("name=chat,num=40,rate=2.5,input=16:64,output=8,burstiness=0.5,priority=1")
    assert (t.name, t.num_prompts, t.rate, t.input_len, t.output_len, t.burstiness, t.priority) == \
        ("chat", 40, 2.5, "16:64", "8", 0.5, 1)
    assert TenantSpec.parse("name=batch,rate=inf").rate == math.inf
    for bad, says in [("num=3", "name="), ("name=a,speed=3", "'speed=3' is not one of"), ("name=a,num=x", "invalid"),
                      ("name=a,rate=0", "request_rate"), ("name=a,num=0", "num must be"), ("name=a,output=9:2", "low")]:
        with pytest.raises(InvalidParameterError, match=says):
            TenantSpec.parse(bad)


def test_tenant_workload_merges_each_tenants_own_arrivals(tokenizer):
    tenants = [TenantSpec("fast", num_prompts=30, rate=20.0, input_len="4:8", output_len=2),
               TenantSpec("slow", num_prompts=5, rate=1.0, input_len=12, output_len="3:4", priority=2)]
    requests, times = tenant_workload(tokenizer, tenants, seed=3)
    assert len(requests) == 35 and times == sorted(times)
    fast = [t for r, t in zip(requests, times) if r.tenant == "fast"]
    slow = [t for r, t in zip(requests, times) if r.tenant == "slow"]
    assert fast[-1] < slow[-1]  # 30 requests at 20/s end long before 5 at 1/s
    assert all(r.priority == 2 and count(tokenizer, r.prompt) == 12 for r in requests if r.tenant == "slow")
    assert all(r.priority is None and 4 <= r.prompt_len <= 8 for r in requests if r.tenant == "fast")


def test_cli_reports_each_tenant_and_sends_user_and_priority(fake_server, tmp_path, capsys, default_model_available):
    out = tmp_path / "tenants.json"
    code = cli.main(["bench", "serve", "--base-url", fake_server.url, "--output-json", str(out),
                     "--tenant", "name=a,num=4,rate=inf,input=4,output=3",
                     "--tenant", "name=b,num=2,rate=inf,input=4,output=5,priority=0"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| a | 4 |" in table and "| b | 2 |" in table and "| all | 6 |" in table
    run = json.loads(out.read_text())["runs"][0]
    assert run["request_rate"] == "tenants"
    assert run["tenants"]["a"]["total_output_tokens"] == 4 * 3 and run["tenants"]["b"]["total_output_tokens"] == 2 * 5
    assert sorted((b["user"], b.get("priority")) for b in fake_server.bodies) == [("a", None)] * 4 + [("b", 0)] * 2
    assert cli.main(["bench", "serve", "--base-url", fake_server.url, "--tenant", "name=a", "--request-rate", "3"]) == 2
    assert "leave out --request-rate" in capsys.readouterr().err
