"""Schema-based fuzzing of the server: schemathesis reads /openapi.json and sends generated valid
and invalid requests; no response may be a 5xx and the server must still answer afterwards."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import openai
import pytest

from server_process import ServerProcess

pytestmark = pytest.mark.slow  # about five minutes on two cores


def test_schemathesis_finds_no_server_error(tiny_chat_model, tmp_path):
    # Run by this interpreter, not found on PATH: the venv need not be activated.
    if importlib.util.find_spec("schemathesis") is None:
        pytest.fail("schemathesis is not installed (pip install -e '.[test]')")
    # A tiny model and a short context keep every generated request fast.
    with ServerProcess(["--model", str(tiny_chat_model), "--max-model-len", "256", "--kv-cache-memory", "64MiB",
                        "--api-key", "fuzz"]) as server:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
             "--checks", "not_a_server_error", "--max-examples", "40", "--seed", "1", "--header", "Authorization: Bearer fuzz",
             "--request-timeout", "120", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="fuzz", max_retries=0)
        reply = client.completions.create(model=client.models.list().data[0].id, prompt="Hello", max_tokens=3)
        assert reply.usage.completion_tokens == 3
        assert server.metric("tokenmill_kv_cache_free_blocks") == server.metric("tokenmill_kv_cache_total_blocks")
