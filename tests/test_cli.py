"""The `tokenmill` command line, run for real: generate, chat (stdin piped), bench throughput, errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.bench import prompts as bench_prompts
from tokenmill.entrypoints import cli

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


# ---- generate -------------------------------------------------------------------------------


def test_generate_greedy_matches_llm_generate(stories_path):
    from tokenmill import LLM, SamplingParams

    prompt = "Once upon a time"
    proc = run_cli("generate", prompt, "--model", str(stories_path), "--temperature", "0", "--max-tokens", "40")
    assert proc.returncode == 0, proc.stderr
    expected = LLM(str(stories_path)).generate(prompt, SamplingParams(temperature=0, max_tokens=40),
                                               use_tqdm=False)[0].outputs[0].text
    assert expected.strip()
    assert proc.stdout == expected + "\n"


class _RecordingStdout(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_generate_streams_piece_by_piece(stories_path, monkeypatch):
    out = _RecordingStdout()
    monkeypatch.setattr(sys, "stdout", out)
    code = cli.main(["generate", "Once upon a time", "--model", str(stories_path), "--temperature", "0",
                     "--max-tokens", "20", "--kv-cache-memory", "4MiB"])
    assert code == 0
    pieces = [w for w in out.writes if w and w != "\n"]
    assert len(pieces) >= 5, pieces  # one write per decoded piece, not the whole text at the end
    assert "".join(pieces) + "\n" == out.getvalue()


def test_sampling_flags_and_seed_are_reproducible(stories_path, capsys):
    args = ["generate", "Once upon a time", "--model", str(stories_path), "--temperature", "1.0",
            "--top-p", "0.9", "--top-k", "50", "--seed", "7", "--max-tokens", "16", "--kv-cache-memory", "4MiB"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first


# ---- errors ---------------------------------------------------------------------------------


def test_bad_model_path_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = run_cli("generate", "hello", "--model", str(missing))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not found" in proc.stderr and "no-such-model" in proc.stderr
    assert proc.stderr.strip().startswith("tokenmill: error:")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_parameter_and_missing_template_exit_2(stories_path, capsys):
    assert cli.main(["generate", "hi", "--model", str(stories_path), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--chat", "--model", str(stories_path), "--kv-cache-memory", "4MiB"]) == 2
    err = capsys.readouterr().err
    assert "chat template" in err and "Traceback" not in err


TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"


def test_chat_template_flag_replaces_the_checkpoints(stories_path, tmp_path):
    """stories260k has no template of its own; given one (inline or in a file), --chat and LLM.chat use it."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(str(stories_path), chat_template=TEMPLATE, kv_cache_memory="4MiB")
    messages = [{"role": "user", "content": "Once upon a time"}]
    assert llm.get_tokenizer().render_chat(messages) == "[user] Once upon a time\n[assistant]"
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    for template in (TEMPLATE, str(path)):
        proc = run_cli("generate", "Once upon a time", "--chat", "--chat-template", template, "--model",
                       str(stories_path), "--temperature", "0", "--max-tokens", "12", "--kv-cache-memory", "4MiB")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == want + "\n"


@pytest.mark.parametrize("template, says", [("{% for m in messages %}", "does not parse"),
                                            ("{{ messages | no_such_filter }}", "no_such_filter"),
                                            ("no-such-file.jinja", "no-such-file.jinja")])
def test_a_chat_template_that_does_not_parse_stops_the_start(stories_path, capsys, template, says):
    assert cli.main(["generate", "hi", "--chat", "--chat-template", template, "--model", str(stories_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenmill: error: chat_template:") and says in err and len(err.splitlines()) == 1, err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "throughput", "--compare", "vllm"])
    assert e.value.code == 2


# ---- chat -----------------------------------------------------------------------------------


def test_chat_over_a_pipe_answers_paris(default_model_available):
    proc = run_cli("chat", "--temperature", "0", "--max-tokens", "24", "--kv-cache-memory", "64MiB",
                   stdin="What is the capital of France?\n/exit\nWhat is the capital of Germany?\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "Berlin" not in proc.stdout  # /exit stopped the REPL
    assert "Traceback" not in proc.stderr


# ---- bench throughput -----------------------------------------------------------------------

THROUGHPUT_KEYS = {"requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s", "elapsed_s"}


def test_bench_throughput_writes_json(stories_path, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "throughput", "--model", str(stories_path), "--num-prompts", "4", "--input-len", "8:24",
                   "--output-len", "8", "--repeats", "1", "--compare", "hf", "--batch1", "--batch1-tokens", "8",
                   "--kv-cache-memory", "8MiB", "--output-json", str(out))
    assert proc.returncode == 0, proc.stderr
    for word in ("requests/s", "input tok/s", "output tok/s", "total tok/s", "ratio"):
        assert word in proc.stdout
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 4
    assert result["total_input_tokens"] == 8 + 13 + 19 + 24  # 8..24 spread evenly over 4 prompts
    assert result["total_output_tokens"] == 4 * 8
    assert result["model"] == "stories260k"  # a name, never a local path
    for backend in ("tokenmill", "hf"):
        assert THROUGHPUT_KEYS <= set(result[backend])
        assert all(result[backend][k] > 0 for k in THROUGHPUT_KEYS)
    assert all(v > 0 for v in result["ratio"].values())
    for backend in ("tokenmill", "hf"):
        assert result["batch1"][backend]["decode_tokens_per_s"] > 0
    assert result["batch1"]["ratio"] > 0


def test_bench_throughput_prompts_file(stories_path, tmp_path, capsys):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Once upon a time", "The cat sat", "Lily"]) + "\n")
    out = tmp_path / "file.json"
    assert cli.main(["bench", "throughput", "--model", str(stories_path), "--prompts-file", str(jsonl),
                     "--output-len", "4", "--repeats", "2", "--kv-cache-memory", "4MiB", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 3 and result["total_output_tokens"] == 12
    assert len(result["tokenmill"]["runs_s"]) == 2
    assert "hf" not in result


def test_bench_prompt_sets_are_deterministic(stories_path):
    from tokenmill import LLM

    tokenizer = LLM(str(stories_path), kv_cache_memory="4MiB").get_tokenizer()
    lengths = bench_prompts.spread_lengths("32:512", 64, seed=3)
    assert sorted(lengths)[0] == 32 and sorted(lengths)[-1] == 512 and len(lengths) == 64
    assert lengths == bench_prompts.spread_lengths("32:512", 64, seed=3)
    assert bench_prompts.spread_lengths("128", 5) == [128] * 5
    a = bench_prompts.synthetic_prompts(tokenizer, 512, [50, 60], seed=1)
    assert a == bench_prompts.synthetic_prompts(tokenizer, 512, [50, 60], seed=1)
    assert [len(p) for p in a] == [50, 60]
    special = bench_prompts.special_token_ids(tokenizer)
    assert {0, 1, 2} <= special
    assert not special & {t for p in a for t in p}
    with pytest.raises(Exception, match="range"):
        bench_prompts.parse_length("a:b")


def test_plain_text_prompts_file(stories_path, tmp_path):
    from tokenmill import LLM

    tokenizer = LLM(str(stories_path), kv_cache_memory="4MiB").get_tokenizer()
    f = tmp_path / "prompts.txt"
    f.write_text("Once upon a time\n\nThe dog ran\n")
    prompts = bench_prompts.load_prompts_file(f, tokenizer)
    assert prompts == [tokenizer.encode("Once upon a time"), tokenizer.encode("The dog ran")]
    assert bench_prompts.load_prompts_file(f, tokenizer, num_prompts=1) == prompts[:1]
