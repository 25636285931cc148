"""Request fields on a tiny model served for real: echo's prompt logprobs against transformers
(with the prompt chunked over steps), truncate_prompt_tokens, and generation_config.json defaults."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import torch

from server_process import ServerProcess

GENERATION_CONFIG = {"max_new_tokens": 7, "top_k": 1, "temperature": 0.9, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module")
def model_path(tiny_chat_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("with-generation-config") / "model"
    shutil.copytree(tiny_chat_model, path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return path


@pytest.fixture(scope="module")
def client(model_path):
    # 8 tokens a step: every prompt below is prefilled over several steps
    with ServerProcess(["--model", str(model_path), "--max-model-len", "256", "--kv-cache-memory", "16MiB",
                        "--max-num-batched-tokens", "8", "--dtype", "float32", "--served-model-name", "m"]) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    def greedy(ids: list[int], steps: int) -> list[int]:
        for _ in range(steps):
            ids = ids + [int(logprobs(ids)[-1].argmax())]
        return ids[-steps:]

    return tokenizer, logprobs, greedy


def test_echo_logprobs_equal_transformers_with_chunked_prefill(client, reference):
    tokenizer, logprobs, _ = reference
    text = "A fairly long prompt, so that eight tokens a step split it over several steps of the engine."
    ids = tokenizer.encode(text)
    want = logprobs(ids)
    got = client.completions.create(model="m", prompt=text, echo=True, logprobs=1, max_tokens=0)
    lp = got.choices[0].logprobs
    assert got.choices[0].text == text and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([want[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-5)


def test_fields_left_out_take_the_generation_config_values(client, reference):
    tokenizer, _, greedy = reference
    ids = tokenizer.encode("Hello there")
    want = tokenizer.decode(greedy(ids, 7))
    # top_k 1 from generation_config: any seed gives the greedy answer, of max_new_tokens tokens
    for seed in (1, 2):
        got = client.completions.create(model="m", prompt=ids, seed=seed)
        assert got.usage.completion_tokens == 7 and got.choices[0].text == want
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], seed=3)
    assert chat.usage.completion_tokens == 7
    # what the body sets wins: top_k 0 samples the whole (near uniform) distribution
    sampled = [client.completions.create(model="m", prompt=ids, seed=s, max_tokens=7,
                                         extra_body={"top_k": 0}).choices[0].text
               for s in (1, 2)]
    assert want not in sampled and sampled[0] != sampled[1]
    assert client.completions.create(model="m", prompt=ids, max_tokens=3).usage.completion_tokens == 3


def test_truncate_prompt_tokens_keeps_the_last_tokens_on_both_endpoints(client, reference):
    tokenizer, _, greedy = reference
    ids = tokenizer.encode("one two three four five six seven eight nine ten")
    got = client.completions.create(model="m", prompt=ids, echo=True, max_tokens=3,
                                    extra_body={"truncate_prompt_tokens": 4})
    assert got.usage.prompt_tokens == 4
    assert got.choices[0].text == tokenizer.decode(ids[-4:]) + tokenizer.decode(greedy(ids[-4:], 3))
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b c d e f g h"}],
                                          max_tokens=2, extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=ids, extra_body={"truncate_prompt_tokens": 0})
    assert e.value.body["param"] == "truncate_prompt_tokens"
