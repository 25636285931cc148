"""vLLM's server surface beyond the OpenAI endpoints, on a real `tokenmill serve`: /tokenize and
/detokenize, --chat-template, CORS (--allowed-origins ...) and the vllm:* metric names."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_process import ServerProcess
from tokenmill.entrypoints import cli

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
ORIGIN = "https://app.example"


def flags(model) -> list[str]:
    return ["--model", str(model), "--served-model-name", NAME, "--max-model-len", "256", "--kv-cache-memory", "16MiB",
            "--api-key", KEY]


@pytest.fixture(scope="module")
def plain(tiny_chat_model):
    """The checkpoint's chat template, no CORS flags."""
    with ServerProcess(flags(tiny_chat_model)) as s:
        yield s


@pytest.fixture(scope="module")
def custom(tiny_chat_model):
    """A chat template of its own; CORS for ORIGIN (a JSON list) and one more origin (a value)."""
    with ServerProcess([*flags(tiny_chat_model), "--chat-template", TEMPLATE,
                        "--allowed-origins", json.dumps([ORIGIN]), "--allowed-origins", "https://two.example"]) as s:
        yield s


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def call(server, path: str, body: dict) -> dict:
    status, answer = server.post(path, json.dumps(body).encode(), AUTH)
    assert status == 200, answer
    return answer


# ---- /tokenize and /detokenize --------------------------------------------------------------


def test_tokenize_then_detokenize_round_trips(plain):
    text = "The capital of France is Paris. Ünïcödé, too: 東京."
    got = call(plain, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert got["count"] == len(got["tokens"]) == len(got["token_strs"]) > 5 and got["max_model_len"] == 256
    assert call(plain, "/detokenize", {"model": NAME, "tokens": got["tokens"]}) == {"prompt": text}
    assert call(plain, "/tokenize", {"prompt": text})["token_strs"] is None
    completion = client(plain).completions.create(model=NAME, prompt=text, max_tokens=1)
    assert completion.usage.prompt_tokens == got["count"]


def test_chat_form_counts_the_prompt_tokens_the_chat_endpoint_reports(plain):
    got = call(plain, "/tokenize", {"model": NAME, "messages": CHAT})
    chat = client(plain).chat.completions.create(model=NAME, messages=CHAT, max_tokens=1)
    assert got["count"] == chat.usage.prompt_tokens
    rendered = call(plain, "/detokenize", {"tokens": got["tokens"]})["prompt"]
    assert rendered.endswith("<|im_start|>assistant\n") and CHAT[1]["content"] in rendered  # the checkpoint's template
    without = call(plain, "/tokenize", {"messages": CHAT, "add_generation_prompt": False, "add_special_tokens": False})
    assert without["tokens"] == got["tokens"][:without["count"]] and without["count"] < got["count"]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    with_tools = call(plain, "/tokenize", {"messages": CHAT, "tools": tools})
    chat = client(plain).chat.completions.create(model=NAME, messages=CHAT, tools=tools, max_tokens=1)
    assert with_tools["count"] == chat.usage.prompt_tokens > got["count"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, 400, "messages"),
    ("/tokenize", {"prompt": "hi", "model": "no-such-model"}, 404, "model"),
    ("/tokenize", {"prompt": "hi", "tools": []}, 400, "tools"),  # unknown fields are named, not ignored
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": ""}, 400, "prompt"),
    ("/tokenize", {"prompt": "a\ud800b"}, 400, "prompt"),
    ("/tokenize", {"prompt": "hi", "add_generation_prompt": True}, 400, "add_generation_prompt"),
    ("/tokenize", {"prompt": "hi", "return_token_strs": "yes"}, 400, "return_token_strs"),
    ("/tokenize", {"messages": CHAT, "add_special_tokens": True}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "<|im_start|>system"}]}, 400, "messages"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),  # outside the vocabulary
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, True]}, 400, "tokens"),
    ("/detokenize", {"tokens": "hello"}, 400, "tokens"),
    ("/detokenize", {"tokens": [[1, 2]]}, 400, "tokens"),
    ("/detokenize", {"tokens": list(range(257))}, 400, "tokens"),  # more than the context
    ("/detokenize", {"tokens": [1] * 400_000}, 400, "tokens"),  # the same, parsed in the child process (> 1 MiB)
    ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "model": "no-such-model"}, 404, "model"),
    ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, 400, "skip_special_tokens"),
])
def test_bad_bodies_are_4xx_naming_the_field(plain, path, body, status, param):
    got, answer = plain.post(path, json.dumps(body).encode(), AUTH)
    assert (got, answer["error"]["param"]) == (status, param), answer
    assert answer["error"]["message"]


def test_tokenize_needs_the_key_and_every_answer_is_counted(plain):
    counted = {code: f'code="{code}",endpoint="/tokenize"' for code in ("200", "400", "401")}
    before = {code: plain.metric("tokenmill_http_responses_total", labels, default=0.0)
              for code, labels in counted.items()}
    assert plain.post("/tokenize", b'{"prompt": "hi"}')[0] == 401
    assert plain.post("/tokenize", b'{"prompt": "hi"}', AUTH)[0] == 200
    assert plain.post("/tokenize", b'{"prompt": "hi", ', AUTH)[0] == 400  # not JSON
    for code, labels in counted.items():
        assert plain.metric("tokenmill_http_responses_total", labels) == before[code] + 1, code


# ---- --chat-template ------------------------------------------------------------------------


def test_a_custom_chat_template_renders_the_chat_prompt(custom):
    got = call(custom, "/tokenize", {"messages": CHAT})
    rendered = call(custom, "/detokenize", {"tokens": got["tokens"]})["prompt"]
    assert rendered == "[system] Be brief.\n[user] What is the capital of France?\n[assistant]"
    chat = client(custom).chat.completions.create(model=NAME, messages=CHAT, max_tokens=1)
    assert chat.usage.prompt_tokens == got["count"]


# ---- CORS -----------------------------------------------------------------------------------


def preflight(server, origin: str) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + "/v1/chat/completions", method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_cors_answers_allowed_origins_only(custom, plain):
    for origin in (ORIGIN, "https://two.example"):
        status, headers = preflight(custom, origin)
        assert status == 200 and headers["access-control-allow-origin"] == origin, headers
        assert "POST" in headers["access-control-allow-methods"]
    status, headers = preflight(custom, "https://evil.example")
    assert "access-control-allow-origin" not in headers, headers
    # an actual cross-origin request gets the header too, its error answers included
    status, answer = custom.post("/tokenize", b'{"prompt": "hi"}', {"Origin": ORIGIN})
    assert status == 401  # the key is still required
    request = urllib.request.Request(custom.url + "/tokenize", data=b'{"prompt": "hi"}', method="POST",
                                     headers={"Origin": ORIGIN, "Content-Type": "application/json", **AUTH})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.headers["access-control-allow-origin"] == ORIGIN
    # without --allowed-origins: no CORS headers at all, as before
    status, headers = preflight(plain, ORIGIN)
    assert not any(name.startswith("access-control-") for name in headers), headers


def test_cors_flags_are_checked_before_the_start(capsys):
    assert cli.main(["serve", "--allowed-methods", "GET"]) == 2  # nothing to apply them to
    assert "allowed_methods" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--allowed-origins", '["https://a.example", 5]'])
    assert e.value.code == 2 and "list of strings" in capsys.readouterr().err


# ---- vllm:* metrics -------------------------------------------------------------------------

# vLLM's sample (model_name and engine labels aside) -> tokenmill's own
VLLM_SAMPLES = {
    ("vllm:num_requests_running", ()): ("tokenmill_num_requests_running", ()),
    ("vllm:num_requests_waiting", ()): ("tokenmill_num_requests_waiting", ()),
    ("vllm:kv_cache_usage_perc", ()): ("tokenmill_kv_cache_usage_ratio", ()),
    ("vllm:gpu_cache_usage_perc", ()): ("tokenmill_kv_cache_usage_ratio", ()),
    ("vllm:prompt_tokens_total", ()): ("tokenmill_prompt_tokens_total", ()),
    ("vllm:generation_tokens_total", ()): ("tokenmill_generation_tokens_total", ()),
    ("vllm:request_success_total", (("finished_reason", "length"),)): ("tokenmill_requests_total",
                                                                        (("status", "length"),)),
    ("vllm:prefix_cache_queries_total", ()): ("tokenmill_prefix_cache_queries_tokens_total", ()),
    ("vllm:prefix_cache_hits_total", ()): ("tokenmill_prefix_cache_hits_tokens_total", ()),
    ("vllm:num_preemptions_total", ()): ("tokenmill_num_preemptions_total", ()),
    **{(f"vllm:{vllm}_{part}", ()): (f"tokenmill_{own}_{part}", ())
       for vllm, own in (("time_to_first_token_seconds", "time_to_first_token_seconds"),
                         ("time_per_output_token_seconds", "time_per_output_token_seconds"),
                         ("request_time_per_output_token_seconds", "time_per_output_token_seconds"),
                         ("e2e_request_latency_seconds", "e2e_request_latency_seconds"))
       for part in ("count", "sum")},
    ("vllm:e2e_request_latency_seconds_bucket", (("le", "+Inf"),)): ("tokenmill_e2e_request_latency_seconds_bucket",
                                                                      (("le", "+Inf"),)),
}


def scrape(server) -> dict:
    """(sample name, labels) -> value; a vLLM sample's labels without model_name and engine (checked here)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            if s.name.startswith("vllm:"):
                assert (labels.pop("model_name"), labels.pop("engine")) == (NAME, "0"), s
            samples[s.name, tuple(sorted(labels.items()))] = s.value
    return samples


def test_vllm_metric_names_show_tokenmills_own_readings(plain):
    prompt = "Here is a shared prompt. " * 6
    for _ in range(2):  # the second finds the first's prompt blocks in the prefix cache
        client(plain).completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    samples = scrape(plain)
    for vllm, own in VLLM_SAMPLES.items():
        assert samples[vllm] == samples[own], (vllm, own)
    value = {name: samples[name, labels] for name, labels in VLLM_SAMPLES}
    assert value["vllm:generation_tokens_total"] >= 10 and value["vllm:prompt_tokens_total"] >= 2 * 30
    assert samples["vllm:request_success_total", (("finished_reason", "length"),)] >= 2
    assert 0 <= value["vllm:kv_cache_usage_perc"] <= 1
    assert value["vllm:num_requests_running"] == value["vllm:num_requests_waiting"] == 0
    assert 0 < value["vllm:prefix_cache_hits_total"] <= value["vllm:prefix_cache_queries_total"]
    assert value["vllm:e2e_request_latency_seconds_count"] >= 2
    assert 0 < value["vllm:time_to_first_token_seconds_sum"] <= value["vllm:e2e_request_latency_seconds_sum"]
