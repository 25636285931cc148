"""lm-evaluation-harness against `tokenmill serve`, and the same task scored offline: the two must agree.

    pip install "lm-eval[api]"                # only this script needs it, not tokenmill
    python benchmarks/lm_eval_local.py        # default model; --model PATH for another

Starts `tokenmill serve` on 127.0.0.1 and runs lm-eval's `local-completions` model on the
multiple-choice task in benchmarks/lm_eval_task/ (50 questions written for it). Its loglikelihood
requests are what OpenAI-style evaluation sends: the context and a choice as token ids, `echo`,
`logprobs=1`, `max_tokens=1`; lm-eval sums the choice's prompt logprobs. It tokenizes with the
model's own tokenizer, saved to a temporary folder (offline, no hub). Then the offline engine
scores the same questions: each choice split into tokens as lm-eval splits it, its tokens'
`prompt_logprobs` summed, the best choice taken. Prints both accuracies, whether they and every
prediction agree, and the largest difference of a choice's loglikelihood; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from tokenmill import LLM, SamplingParams
from tokenmill.bench.launch import LaunchedServer, free_port
from tokenmill.loader import load_checkpoint

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"
TASK = "tokenmill_mc"
ENGINE_FLAGS = {"max_model_len": 1024, "kv_cache_memory": "256MiB"}


def questions() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "questions.jsonl").read_text().splitlines() if line]


def context_of(doc: dict) -> str:
    """The task's doc_to_text (tokenmill_mc.yaml)."""
    return f"Question: {doc['question']}\nAnswer:"


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair for a causal model: trailing spaces of the
    context move to the continuation, the whole is encoded, and the context's tokens are cut off."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


def run_lm_eval(checkpoint, model: str | None, work: Path) -> dict:
    """Serve the model and run lm-eval on it; its accuracy and every choice's loglikelihood by doc."""
    tokenizer_dir = work / "tokenizer"
    checkpoint.tokenizer.save_pretrained(tokenizer_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--max-model-len", str(ENGINE_FLAGS["max_model_len"]), "--kv-cache-memory", ENGINE_FLAGS["kv_cache_memory"]]
    if model:
        cmd += ["--model", model]
    with LaunchedServer(cmd, url, log_path=str(work / "server.log")):
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            served = json.loads(r.read())["data"][0]["id"]
        model_args = (f"base_url={url}/v1/completions,model={served},tokenizer_backend=huggingface,"
                      f"tokenizer={tokenizer_dir},tokenized_requests=True,max_retries=1")
        lm_eval = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
                   "--tasks", TASK, "--include_path", str(TASK_DIR), "--batch_size", "8",
                   "--output_path", str(work / "lm_eval"), "--log_samples"]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "none"}
        # data_files in the task file are relative to the working directory: the task's folder
        subprocess.run(lm_eval, check=True, cwd=TASK_DIR, env=env)
    results = json.loads(next((work / "lm_eval").rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next((work / "lm_eval").rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    return {"command": " ".join(lm_eval[1:]), "accuracy": results["results"][TASK]["acc,none"],
            "loglikelihoods": {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}}  # logged as text


def score_offline(checkpoint) -> dict:
    """Each choice's loglikelihood from the offline engine's prompt logprobs; the accuracy of the argmax."""
    llm = LLM(checkpoint, **ENGINE_FLAGS)
    tokenizer = llm.get_tokenizer()
    docs = questions()
    prompts, context_lengths = [], []
    for doc in docs:
        for choice in doc["choices"]:
            context, continuation = encode_pair(tokenizer, context_of(doc), " " + choice)
            prompts.append(context + continuation)
            context_lengths.append(len(context))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    sums = [sum(entry[token].logprob for entry, token in zip(out.prompt_logprobs[n:], out.prompt_token_ids[n:]))
            for out, n in zip(outputs, context_lengths)]
    loglikelihoods, at = {}, 0
    for i, doc in enumerate(docs):
        loglikelihoods[i] = sums[at:at + len(doc["choices"])]
        at += len(doc["choices"])
    correct = [max(range(len(ll)), key=ll.__getitem__) == doc["answer"] for ll, doc in zip(loglikelihoods.values(), docs)]
    return {"accuracy": sum(correct) / len(docs), "loglikelihoods": loglikelihoods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model tokenmill loads (default: the embedded SmolLM2-135M)")
    parser.add_argument("--output", default="lm_eval_local.json")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.model)
    with tempfile.TemporaryDirectory() as work:
        served = run_lm_eval(checkpoint, args.model, Path(work))
    offline = score_offline(checkpoint)

    def prediction(ll: list[float]) -> int:
        return max(range(len(ll)), key=ll.__getitem__)

    docs = range(len(questions()))
    differing = [d for d in docs if prediction(served["loglikelihoods"][d]) != prediction(offline["loglikelihoods"][d])]
    largest = max(abs(a - b) for d in docs
                  for a, b in zip(served["loglikelihoods"][d], offline["loglikelihoods"][d]))
    report = {"model": checkpoint.name, "task": TASK, "questions": len(docs),
              "lm_eval_command": served["command"], "lm_eval_accuracy": served["accuracy"],
              "offline_accuracy": offline["accuracy"], "equal": served["accuracy"] == offline["accuracy"],
              "predictions_differing": differing, "max_abs_loglikelihood_difference": largest}
    print(f"{checkpoint.name} on {TASK} ({len(docs)} questions): lm-eval through the server acc {served['accuracy']:.4f}, "
          f"offline engine acc {offline['accuracy']:.4f}, equal: {report['equal']}; predictions differing: "
          f"{len(differing)}; largest loglikelihood difference {largest:.2e}")
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
