"""Start-up, side by side: from process start to /health and to the first token, `tokenmill serve`
against llama.cpp's `llama-server`, on the default model's GGUF file.

    python benchmarks/startup.py --llama-server PATH/TO/llama-server --repeats 5

Each repeat starts each server in turn (a cold start of the process; the files are in the page
cache and tokenmill's GGUF index is cached after the first run, as on any machine that served
the model before), polls /health every 10 ms, then sends one completion of one token. Medians
over the repeats; the JSON goes to --output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

from tokenmill.bench.launch import free_port
from tokenmill.loader.checkpoint import default_model_path


def commands(args) -> dict[str, tuple[list[str], str, dict]]:
    """name -> (command without the port, completion path, body)."""
    found = {"tokenmill": ([sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--log-level", "warning"],
                           "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 1})}
    llama_server = args.llama_server or shutil.which("llama-server")
    if llama_server:
        found["llama-server"] = ([llama_server, "-m", str(default_model_path()), "-t", str(args.threads),
                                  "--host", "127.0.0.1"], "/completion",
                                 {"prompt": "The capital of France is", "n_predict": 1})
    return found


def start_once(cmd: list[str], path: str, body: dict) -> dict:
    """Seconds from spawning the server to /health 200 and to a one-token answer."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.01)
        health = time.perf_counter() - started
        request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            r.read()
        return {"health_s": health, "first_token_s": time.perf_counter() - started}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server (default: on PATH)")
    p.add_argument("--threads", type=int, default=2, help="llama-server threads (default: 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default="startup.json")
    args = p.parse_args()
    cmds = commands(args)
    start_once(*cmds["tokenmill"])  # a first run fills tokenmill's caches (GGUF index, kernels)
    runs: dict[str, list[dict]] = {name: [] for name in cmds}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():  # taking turns: a change in the machine's speed hits both
            runs[name].append(start_once(*cmd))
    result = {"model": default_model_path().name, "repeats": args.repeats, "servers": {}}
    print(f"{'server':<14}{'to /health s':>14}{'to first token s':>18}")
    for name, rs in runs.items():
        med = {key: statistics.median(r[key] for r in rs) for key in ("health_s", "first_token_s")}
        result["servers"][name] = {"median": med, "runs": rs}
        print(f"{name:<14}{med['health_s']:>14.2f}{med['first_token_s']:>18.2f}")
    if "llama-server" in runs:
        ratio = result["servers"]["tokenmill"]["median"]["first_token_s"] / \
            result["servers"]["llama-server"]["median"]["first_token_s"]
        result["first_token_ratio"] = ratio
        print(f"tokenmill / llama-server, first token: {ratio:.2f}x")
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
