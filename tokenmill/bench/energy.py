"""Decode energy and roofline fraction against batch size (benchmarks/energy_batch.py).

A batch of B equal prompts is prefilled first; then only decode steps run, and the engine's
accountant reports their Joules per token and the achieved fraction of the roofline. Larger
batches read the weights once for more tokens, so J/token should fall until compute binds.
"""

from __future__ import annotations

from pathlib import Path

from tokenmill.bench.prompts import synthetic_prompts
from tokenmill.engine.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams


def measure_decode_energy(engine: LLMEngine, batch_size: int, prompt_len: int = 32, new_tokens: int = 32,
                          seed: int = 0) -> dict:
    """One batch of `batch_size` requests: the decode steps' J/token, roofline fraction and tokens/s.
    The accountant's per-phase totals are read directly: engine.stats() carries no per-phase wall time."""
    prompts = synthetic_prompts(engine.tokenizer, engine.model_config.vocab_size, [prompt_len] * batch_size, seed)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ids = [f"energy-{batch_size}-{i}" for i in range(batch_size)]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    try:
        started: set[str] = set()
        while len(started) < batch_size:  # prefill (and its first token) is not measured
            started.update(out.request_id for out in engine.step())
        since = engine.accountant.snapshot()
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
    decode_tokens = batch_size * (new_tokens - 1)
    report = engine.accountant.report(since, 0, decode_tokens)
    decode = report["decode"]
    return {"batch_size": batch_size, "decode_tokens": decode_tokens, "decode_steps": decode["steps"],
            "wall_s": decode["wall_s"], "tokens_per_s": decode_tokens / decode["wall_s"],
            "joules_per_token": report["joules_per_output_token"], "roofline_fraction": decode["roofline_fraction"],
            "usd_per_1m_tokens": decode["usd_per_1m_tokens"], "energy_meter": report["energy_meter"],
            "energy_estimated": report["energy_estimated"]}


def format_table(rows: list[dict]) -> str:
    meter = rows[0]["energy_meter"]  # an estimator's name starts with "estimated"
    lines = [f"| batch | decode tok/s | J / token ({meter}) | roofline fraction | $ / 1M tokens |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r['tokens_per_s']:.1f}", _num(r["joules_per_token"], 3), _num(r["roofline_fraction"], 3),
                 _num(r["usd_per_1m_tokens"], 4)]
        lines.append(f"| {r['batch_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def plot_joules_per_token(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """A PNG of decode J/token against batch size (log-log); matplotlib is imported only here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meter = rows[0]["energy_meter"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["batch_size"] for r in rows], [r["joules_per_token"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences decoding together)")
    ax.set_ylabel(f"J / decode token ({meter})")
    ax.set_title(title or "decode energy per token")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
