"""The `tokenmill` command line: generate, chat, serve, bench throughput, bench serve, calibrate, simulate, plan.

    tokenmill generate "Once upon a time" --max-tokens 64 --temperature 0
    tokenmill chat --system "You are terse."
    tokenmill serve --port 8000 --api-key secret
    tokenmill bench throughput --num-prompts 64 --input-len 32:512 --output-len 128 --compare hf --batch1
    tokenmill bench serve --base-url http://127.0.0.1:8000 --request-rate 1 4 inf --num-prompts 64
    tokenmill calibrate --steps
    tokenmill simulate --request-rate 4 --num-prompts 500 --input-len 64:512 --output-len 16:256
    tokenmill plan --model llama-3.1-8b --chip h200 --rate 500 --slo ttft:500,tpot:50

Every subcommand but `bench serve` (a client of a server elsewhere) takes the engine flags
(--model, --dtype, --quantization, --kv-cache-dtype, --max-num-seqs, ...); with no --model the
embedded default model is used. Errors tokenmill raises for bad input print one line to stderr
and exit with status 2.

Adding a subcommand: write `_add_<name>(subparsers)` that builds its parser (usually with
`parents=[engine_parent()]`) and sets `func=<handler(args) -> int>`, and list it in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from tokenmill import config
from tokenmill.config import parse_memory
from tokenmill.engine.router import ROUTING_POLICIES
from tokenmill.errors import InvalidParameterError, TokenmillError
from tokenmill.entrypoints.openai.reasoning import REASONING_PARSERS
from tokenmill.entrypoints.openai.tool_parsers import TOOL_PARSERS
from tokenmill.entrypoints.sim_commands import add_plan, add_simulate

# ---- shared flags ---------------------------------------------------------------------------


def _flag_type(parse: Callable) -> Callable:
    """An option's parser as an argparse type: its InvalidParameterError is a usage error, not a traceback
    at start-up."""
    def flag_type(text: str):
        try:
            return parse(text)
        except InvalidParameterError as e:
            raise argparse.ArgumentTypeError(e.message) from None

    flag_type.__name__ = getattr(parse, "__name__", "value")  # argparse names it in "invalid <name> value"
    return flag_type


memory_size = _flag_type(config.memory_size)


class ListFlag(argparse.Action):
    """A list flag as vLLM's server takes it: values, or a JSON list of strings, given once or repeated."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        for value in values:
            if not value.lstrip().startswith("["):
                items.append(value)
                continue
            try:
                parsed = json.loads(value)
            except ValueError as e:
                parser.error(f"{option_string}: {value!r} is not a JSON list: {e}")
            if not all(isinstance(item, str) for item in parsed):
                parser.error(f"{option_string}: {value!r} must be a list of strings")
            items.extend(parsed)
        setattr(namespace, self.dest, items)


def engine_parent() -> argparse.ArgumentParser:
    """A parent parser holding the LLMEngine flags every subcommand shares: one per EngineConfig option
    (tokenmill/config.py declares each with its default and help), grouped as the options are."""
    p = argparse.ArgumentParser(add_help=False)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in config.engine_options():
        group = groups.get(option.group) or groups.setdefault(option.group, p.add_argument_group(option.group))
        cli = dict(option.field.metadata["cli"])
        if isinstance(option.default, bool):
            cli["action"] = argparse.BooleanOptionalAction
        elif "type" in cli:
            cli["type"] = _flag_type(cli["type"])
        elif isinstance(option.default, (int, float)):
            cli["type"] = type(option.default)
        # None: a flag left out is left out of engine_kwargs, so the engine's default applies
        group.add_argument("--" + option.name.replace("_", "-"), default=None, help=option.help, **cli)
    return p


ENGINE_OPTIONS = tuple(option.name for option in config.engine_options() if option.name != "model")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLMEngine keyword arguments from the flags the user gave (besides --model, LLMEngine's first
    argument); flags left out keep the engine's defaults."""
    return {name: getattr(args, name) for name in ENGINE_OPTIONS if getattr(args, name, None) is not None}


def make_engine(args: argparse.Namespace):
    from tokenmill.engine.engine import LLMEngine

    return LLMEngine(args.model, **engine_kwargs(args))


def _sampling_flags(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"most tokens to generate (default: {max_tokens if max_tokens else 'up to the context length'})")
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: 0.7)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (default: 0, off)")


def _sampling_params(args: argparse.Namespace):
    from tokenmill.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed)


def _stream(engine, request_id: str, prompt, params, prompt_text: str | None = None, out=None) -> str:
    """Add one request and write its text to `out` as it grows; return the final text."""
    out = out or sys.stdout
    engine.add_request(request_id, prompt, params, prompt_text=prompt_text)
    text = ""
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                new = output.outputs[0].text
                if len(new) > len(text) and new.startswith(text):
                    out.write(new[len(text):])
                    out.flush()
                text = new
    finally:
        engine.abort_request(request_id)  # a no-op once finished; frees the KV cache on Ctrl-C
    return text


# ---- generate -------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", parents=[engine_parent()], help="generate a continuation of one prompt, streamed",
                       description="Generate from one prompt and stream the text to stdout as it is produced.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message through the chat template")
    _sampling_flags(p, max_tokens=128)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    engine = make_engine(args)
    prompt, prompt_text = args.prompt, None
    if args.chat:
        tokenizer = _chat_tokenizer(engine)
        messages = [{"role": "user", "content": args.prompt}]
        prompt_text = tokenizer.render_chat(messages)
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    _stream(engine, "cli-generate", prompt, params, prompt_text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _chat_tokenizer(engine):

    tokenizer = engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise InvalidParameterError("model", f"{engine.model_name} has no chat template; use `tokenmill generate` without --chat")
    return tokenizer


# ---- chat -----------------------------------------------------------------------------------


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", parents=[engine_parent()], help="interactive chat in the terminal",
                       description="Chat with the model: type a message and press Enter. /reset clears the "
                                   "conversation, /exit (or EOF, Ctrl-D) quits. Reads stdin, so a pipe works too.")
    p.add_argument("--system", default=None, help="a system prompt opening the conversation")
    _sampling_flags(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    engine = make_engine(args)
    tokenizer = _chat_tokenizer(engine)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
        print(f"tokenmill chat with {engine.model_name}; /reset clears the conversation, /exit quits", file=sys.stderr)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    turn = 0
    while True:
        try:
            line = input("> ") if interactive else _read_line()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            return 0
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages = history + [{"role": "user", "content": line}]
        text = tokenizer.render_chat(messages)
        turn += 1
        try:
            reply = _stream(engine, f"cli-chat-{turn}", tokenizer.encode(text, add_special_tokens=False), params, text)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            continue
        except TokenmillError as e:  # e.g. the conversation outgrew the context: say so and keep the REPL
            print(f"\ntokenmill: error: {e}" + (" (try /reset)" if "max_model_len" in str(e) else ""), file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history = messages + [{"role": "assistant", "content": reply}]


def _read_line() -> str | None:
    line = sys.stdin.readline()
    return None if line == "" else line


# ---- serve ----------------------------------------------------------------------------------


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", parents=[engine_parent()], help="OpenAI-compatible HTTP server",
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models, /tokenize, "
                                   "/detokenize, /health, /ready and /metrics (Prometheus) over HTTP.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $TOKENMILL_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="most requests waiting to start; more are answered 429 (default: no limit)")
    p.add_argument("--max-request-bytes", type=memory_size, default="16MiB",
                   help="largest request body; larger ones are answered 413 (default: 16MiB)")
    p.add_argument("--max-request-tokens", type=int, default=None,
                   help="most tokens one request may make the engine compute: its prompts once plus n x max_tokens "
                        "(the rest of the context when max_tokens is left out); more is a 400 "
                        "(default: 64 x max_model_len)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds the requests in flight get to finish on SIGTERM before they end with an error "
                        "(default: 30)")
    p.add_argument("--metrics-tenant-labels", action="store_true",
                   help="show the fair policy's per-tenant series (tenant names) on /metrics to everyone; "
                        "without it only requests with the API key see them")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                   help="the format of the model's tool calls (default: the chat template's; hermes when the "
                        "template knows no tools, which then get written into the system message)")
    p.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                   help="return a reasoning model's <think> text as reasoning_content (default: none, it stays "
                        "in the content)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model name(s) clients send (default: the model's name)")
    g = p.add_argument_group("CORS (browsers calling the server from web pages of other origins)")
    g.add_argument("--allowed-origins", action=ListFlag, nargs="+", default=None, metavar="ORIGIN",
                   help='origins allowed, e.g. https://app.example.com, or "*" for any; values or a JSON list, '
                        "repeatable (default: none, and no CORS headers at all)")
    g.add_argument("--allowed-methods", action=ListFlag, nargs="+", default=None, metavar="METHOD",
                   help="with --allowed-origins: methods allowed (default: *)")
    g.add_argument("--allowed-headers", action=ListFlag, nargs="+", default=None, metavar="HEADER",
                   help="with --allowed-origins: request headers allowed (default: *)")
    g.add_argument("--allow-credentials", action="store_true",
                   help="with --allowed-origins: allow cookies and Authorization on cross-origin requests")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default: info)")
    g = p.add_argument_group("data-parallel replicas (on Ray: pip install 'tokenmill[ray]')")
    g.add_argument("--data-parallel-size", type=int, default=1,
                   help="engine replicas, each a Ray actor with its own KV cache, behind this server (default: 1, "
                        "no Ray)")
    g.add_argument("--threads-per-replica", type=int, default=None,
                   help="CPU threads of each replica (default: the machine's cores over the replicas)")
    g.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster, e.g. 'auto' or 'ray://head:10001' (default: start a local Ray "
                        "instance)")
    g.add_argument("--routing-policy", choices=ROUTING_POLICIES, default="prefix",
                   help="which replica takes a request: prefix (the one caching the longest prefix of its prompt, "
                        "unless loads drift apart), round_robin or least_loaded (default: prefix)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from tokenmill.entrypoints.openai.api_server import ServerOptions, serve

    for name in ("max_queue", "max_request_tokens", "shutdown_timeout"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise InvalidParameterError(name, f"must be non-negative, got {value}")
    for name in ("data_parallel_size", "threads_per_replica"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidParameterError(name, f"must be at least 1, got {value}")
    if args.threads_per_replica is not None and args.data_parallel_size == 1 and args.ray_address is None:
        raise InvalidParameterError("threads_per_replica", "applies to replicas: give --data-parallel-size too "
                                                           "(one engine uses every core)")
    cors_only = next((name for name in ("allowed_methods", "allowed_headers", "allow_credentials")
                      if getattr(args, name)), None)
    if cors_only is not None and args.allowed_origins is None:
        raise InvalidParameterError(cors_only, "applies to cross-origin requests; give --allowed-origins too")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServerOptions(args.api_key, args.max_queue, parse_memory(args.max_request_bytes, "max_request_bytes"),
                            args.max_request_tokens, args.shutdown_timeout, args.metrics_tenant_labels,
                            args.tool_call_parser, args.reasoning_parser,
                            args.allowed_origins, args.allowed_methods, args.allowed_headers, args.allow_credentials)
    serve(_front(args), args.host, args.port, options, args.served_model_name, args.log_level)
    return 0


def _front(args: argparse.Namespace):
    """What the server hands requests to: one engine in a thread of its own, or replicas on Ray."""
    if args.data_parallel_size == 1 and args.ray_address is None:
        from tokenmill.engine.async_engine import AsyncLLMEngine

        # built in the engine thread: one OpenMP team, not two (see AsyncLLMEngine)
        return lambda max_queue, observer: AsyncLLMEngine(lambda: make_engine(args), max_queue, observer)
    from tokenmill.engine.replicas import ReplicatedEngine

    return lambda max_queue, observer: ReplicatedEngine(
        args.model, engine_kwargs(args), args.data_parallel_size, args.threads_per_replica, args.ray_address,
        args.routing_policy, max_queue, observer)


# ---- bench ----------------------------------------------------------------------------------


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks",
                       description="Benchmarks: the engine offline (throughput), or any OpenAI-compatible server (serve).")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    t = bench_sub.add_parser(
        "throughput", parents=[engine_parent()], help="offline throughput, optionally against HF transformers",
        description="Offline throughput: run a prompt set to completion (greedy, EOS ignored, exactly "
                    "--output-len tokens each) and report requests/s and tokens/s, medians of --repeats runs.")
    g = t.add_argument_group("prompts")
    g.add_argument("--num-prompts", type=int, default=None, help="number of prompts (default: 64, or all of --prompts-file)")
    g.add_argument("--input-len", default="32:512",
                   help='prompt length in tokens, or a range "LOW:HIGH" spread evenly over the prompts (default: 32:512)')
    g.add_argument("--output-len", default="128", help='tokens to generate per prompt, or a range "LOW:HIGH" (default: 128)')
    g.add_argument("--prompts-file", default=None,
                   help='JSONL with a "prompt" field per line, or plain text with one prompt per line '
                        "(instead of synthetic random-token prompts)")
    g = t.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=3, help="runs of each measurement; medians are reported (default: 3)")
    g.add_argument("--compare", choices=["hf"], default=None, help="also run Hugging Face transformers generate")
    g.add_argument("--hf-batch-size", type=int, default=None, help="transformers batch size (default: all prompts)")
    g.add_argument("--batch1", action="store_true", help="also measure batch-1 decode tokens/s")
    g.add_argument("--batch1-tokens", type=int, default=128, help="new tokens of the batch-1 run (default: 128)")
    g.add_argument("--batch1-input-len", type=int, default=32, help="prompt tokens of the batch-1 run (default: 32)")
    g.add_argument("--output-json", default=None, help="write the results as JSON to this file")
    g.add_argument("--markdown", action="store_true", help="print a markdown table instead of plain text")
    t.set_defaults(func=cmd_bench_throughput)
    _add_bench_serve(bench_sub)


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from tokenmill.bench import throughput as tp

    seed = 0 if args.seed is None else args.seed
    kwargs = engine_kwargs(args)
    kwargs["seed"] = seed
    result = tp.run_throughput_benchmark(
        args.model, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
        prompts_file=args.prompts_file, seed=seed, repeats=args.repeats, compare_hf=args.compare == "hf",
        hf_batch_size=args.hf_batch_size, batch1=args.batch1, batch1_tokens=args.batch1_tokens,
        batch1_input_len=args.batch1_input_len, engine_args=kwargs,
        log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    print(tp.format_markdown(result) if args.markdown else tp.format_text(result))
    if args.output_json:
        tp.write_json(result, args.output_json)
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0


def _add_bench_serve(bench_sub) -> None:
    # No engine flags: this drives a server elsewhere; only synthetic prompts load a tokenizer.
    p = bench_sub.add_parser(
        "serve", help="load an OpenAI-compatible server and measure TTFT, TPOT, ITL, E2E and throughput",
        description="Send streamed requests to an OpenAI-compatible server at one or more request rates "
                    "(Poisson arrivals, or gamma with --burstiness) and report latency percentiles, "
                    "throughput and goodput per rate, as vLLM's benchmark_serving defines them.")
    g = p.add_argument_group("server")
    g.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="/v1/completions or /v1/chat/completions (default: completions)")
    g.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--api-key", default=None, help="sent as a Bearer token")
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, nargs="+", default=None, metavar="RATE",
                   help="requests per second, or inf for all at once; several rates run in turn (default: inf)")
    g.add_argument("--tenant", action="append", default=[], metavar="SPEC",
                   help='a tenant of a multi-tenant workload, repeatable: "name=chat,num=100,rate=2,input=64:256,'
                        'output=16:64[,burstiness=0.5][,priority=0]"; each tenant arrives on its own clock, is sent '
                        'as `user`, and is reported on its own (replaces --request-rate and --num-prompts)')
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival times: 1 is Poisson, lower is burstier (default: 1)")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    g.add_argument("--num-prompts", type=int, default=None, help="requests per rate (default: 100, or all of --dataset)")
    g = p.add_argument_group("prompts")
    g.add_argument("--input-len", default="128",
                   help='prompt tokens (shared prefix included, specials the server adds not counted), or a range '
                        '"LOW:HIGH" sampled uniformly (default: 128)')
    g.add_argument("--output-len", default="128", help='tokens to generate, or a range "LOW:HIGH" (default: 128)')
    g.add_argument("--shared-prefix-len", type=int, default=0, help="tokens of one prefix every prompt starts with")
    g.add_argument("--dataset", default=None,
                   help='JSONL with {"prompt": str, "output_len": int (optional)} per line, instead of synthetic prompts')
    g.add_argument("--tokenizer", default=None,
                   help="HF folder, hub id or .gguf whose tokenizer counts synthetic prompts; use the server's "
                        "(default: the embedded default model's)")
    g.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals (default: 0)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="leave ignore_eos and min_tokens out of the requests, so outputs may end early at EOS")
    g = p.add_argument_group("report")
    g.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. ttft:200 tpot:50 e2e:5000")
    g.add_argument("--output-json", default=None, help="write config, summaries and per-request records to this file")
    g.add_argument("--plot", default=None, help="draw median/p99 TTFT, TPOT and E2E against request rate to this PNG")
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from tokenmill.bench import serve
    from tokenmill.bench.metrics import parse_slos
    from tokenmill.bench.throughput import write_json
    from tokenmill.bench.workload import TenantSpec

    tenants = [TenantSpec.parse(spec) for spec in args.tenant]
    if tenants and (args.request_rate or args.num_prompts):
        raise InvalidParameterError("tenant", "each tenant sets its own rate and num; leave out --request-rate "
                                              "and --num-prompts")
    config = serve.ServeBenchConfig(
        args.base_url, model=args.model, endpoint=args.endpoint, request_rates=args.request_rate or [float("inf")],
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, num_prompts=args.num_prompts,
        input_len=args.input_len, output_len=args.output_len, shared_prefix_len=args.shared_prefix_len,
        dataset=args.dataset, tokenizer=args.tokenizer, seed=args.seed, temperature=args.temperature,
        ignore_eos=args.ignore_eos, api_key=args.api_key, goodput=parse_slos(args.goodput), tenants=tenants)
    result = serve.run_serve_benchmark_sync(config, log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    print(serve.format_table(result))
    if args.output_json:
        write_json(result, args.output_json)
        print(f"wrote {args.output_json}", file=sys.stderr)
    if args.plot:
        serve.plot_latencies(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# ---- calibrate ------------------------------------------------------------------------------


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", parents=[engine_parent()],
                       help="measure memory bandwidth and peak matmul FLOP/s for the roofline; --steps: step costs",
                       description="Measure this machine's memory bandwidth and peak matmul throughput per dtype, "
                                   "and cache them ($TOKENMILL_CACHE, default ~/.cache/tokenmill) so every engine "
                                   "reports its roofline fraction. Takes seconds; run it on a quiet machine. With "
                                   "--steps, also time engine steps of the model the engine flags describe over a "
                                   "grid of batch sizes and context lengths, and store the fitted step-cost model "
                                   "`tokenmill simulate` and `tokenmill plan` use (a minute or two).")
    p.add_argument("--steps", action="store_true", help="also fit and store the step-cost model of this engine")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from tokenmill.metering import calibrate

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    entry = calibrate.measure(device)
    print(f"{entry['key']}\nmemory bandwidth {entry['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    for dtype, flops in entry["peak_flops"].items():
        print(f"matmul {dtype} {flops / 1e9:.1f} GFLOP/s")
    status = 0
    if not calibrate.trustworthy(entry):
        print(f"not saved: other processes used {entry['others_busy_percent']:.0f}% of the CPUs while it ran, so "
              "these ceilings are too low; rerun on a quiet machine", file=sys.stderr)
        status = 1
    else:
        path = calibrate.save(entry)
        print(f"saved to {path}" if path else "not saved: the cache is disabled (TOKENMILL_CACHE is empty)",
              file=sys.stderr)
    return _calibrate_steps(args) or status if args.steps else status


def _calibrate_steps(args: argparse.Namespace) -> int:
    from tokenmill.sim import calibrate_steps

    engine = make_engine(args)
    model, fit = calibrate_steps.measure(engine, say=lambda msg: print(f"[steps] {msg}", file=sys.stderr, flush=True))
    terms = ", ".join(f"{name} {value * 1e3:.4g} ms" for name, value in model.coefficients.items())
    print(f"step cost of {model.label}: {terms}; busy {model.busy_watts:.1f} W")
    print(f"fit over {fit['steps']} timed steps: median error {fit['median_error']:.1%}, p90 {fit['p90_error']:.1%}")
    path = calibrate_steps.save(engine, model, fit)
    print(f"saved to {path}" if path else "not saved: the cache is disabled (TOKENMILL_CACHE is empty)",
          file=sys.stderr)
    return 0


# ---- main -----------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable] = [_add_generate, _add_chat, _add_serve, _add_bench, _add_calibrate, add_simulate, add_plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill: an LLM inference engine.")
    from tokenmill import __version__

    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TokenmillError as e:
        sys.stdout.flush()
        message = " ".join(str(e).splitlines())
        print(f"tokenmill: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tokenmill generate ... | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 1


if __name__ == "__main__":
    sys.exit(main())
