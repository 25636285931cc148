"""The benchmarks' reports: the offline throughput result as plain text (as the CLI prints it) or a
markdown table, any result as a JSON file, and the model's name as reports record it.

Energy rows come from the accountant's report in the result (J/token, $/1M tokens, roofline
fractions); the meter's name says when the Joules are an estimate.
"""

from __future__ import annotations

import json
from pathlib import Path


def model_label(model: str | None, engine_name: str) -> str:
    """A name for reports that never records a local path: the folder or file name for paths."""
    if model is None:
        return engine_name
    path = Path(str(model)).expanduser()
    return path.name if path.exists() else str(model)


def format_text(result: dict) -> str:
    """Plain-text summary, as the CLI prints it."""
    lines = [f"model {result['model']} ({result['dtype']}, {result['device']}), {result['num_prompts']} prompts, "
             f"{result['total_input_tokens']} input + {result['total_output_tokens']} output tokens, "
             f"median of {result['repeats']}"]
    for key in ("tokenmill", "hf"):
        r = result.get(key)
        if r is None:
            continue
        lines.append(f"{key:>9}: {r['elapsed_s']:.2f} s  {r['requests_per_s']:.2f} requests/s  "
                     f"{r['input_tokens_per_s']:.1f} input tok/s  {r['output_tokens_per_s']:.1f} output tok/s  "
                     f"{r['total_tokens_per_s']:.1f} total tok/s")
    if "ratio" in result:
        lines.append(f"    ratio: tokenmill / hf = {result['ratio']['total_tokens_per_s']:.2f}x")
    lines.extend(energy_lines(result["tokenmill"]["extra"].get("energy")))
    b1 = result.get("batch1")
    if b1:
        for key in ("tokenmill", "hf"):
            if key in b1:
                lines.append(f"batch-1 decode {key}: {b1[key]['decode_tokens_per_s']:.1f} tok/s "
                             f"({b1['new_tokens']} new tokens, {b1['prompt_tokens']}-token prompt)")
        if "ratio" in b1:
            lines.append(f"batch-1 decode ratio: tokenmill / hf = {b1['ratio']:.2f}x")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """A markdown table: one row per metric, tokenmill vs transformers and the ratio."""
    has_hf = "hf" in result
    head = "| metric | tokenmill | HF transformers | ratio |" if has_hf else "| metric | tokenmill |"
    sep = "|---|---:|---:|---:|" if has_hf else "|---|---:|"
    rows = [head, sep]
    metrics = [("requests/s", "requests_per_s", 2), ("input tok/s", "input_tokens_per_s", 1),
               ("output tok/s", "output_tokens_per_s", 1), ("total tok/s", "total_tokens_per_s", 1),
               ("wall time (s)", "elapsed_s", 2)]
    for label, key, digits in metrics:
        tm = result["tokenmill"][key]
        if has_hf:
            hf = result["hf"][key]
            ratio = hf / tm if key == "elapsed_s" else tm / hf
            rows.append(f"| {label} | {tm:.{digits}f} | {hf:.{digits}f} | {ratio:.2f}x |")
        else:
            rows.append(f"| {label} | {tm:.{digits}f} |")
    rows.extend(f"| {label} | {value} |" + (" | |" if has_hf else "")
                for label, value in energy_rows(result["tokenmill"]["extra"].get("energy")))
    b1 = result.get("batch1")
    if b1:
        tm = b1["tokenmill"]["decode_tokens_per_s"]
        label = f"batch-1 decode tok/s ({b1['new_tokens']} tokens)"
        if "hf" in b1:
            rows.append(f"| {label} | {tm:.1f} | {b1['hf']['decode_tokens_per_s']:.1f} | {b1['ratio']:.2f}x |")
        else:
            rows.append(f"| {label} | {tm:.1f} |")
    return "\n".join(rows)


def energy_rows(energy: dict | None) -> list[tuple[str, str]]:
    """(label, value) pairs of an accountant report; the meter's name says when it is an estimate."""
    if not energy:
        return []
    rows = []
    if energy["energy_joules"] is not None:
        meter = energy["energy_meter"]  # an estimator's name starts with "estimated"
        rows.append((f"J / output token, {meter}", f"{energy['joules_per_output_token']:.3f}"))
        rows.append((f"J / token (input + output), {meter}", f"{energy['joules_per_token']:.3f}"))
    for phase, tokens in (("prefill", "input"), ("decode", "output")):
        p = energy[phase]
        if p["usd_per_1m_tokens"] is not None:
            rows.append((f"$ / 1M {tokens} tokens ({phase} steps)", f"{p['usd_per_1m_tokens']:.4f}"))
        if p["roofline_fraction"] is not None:
            rows.append((f"{phase} roofline fraction", f"{p['roofline_fraction']:.3f}"))
        elif p.get("roofline_error"):
            rows.append((f"{phase} roofline fraction", p["roofline_error"]))
    return rows


def energy_lines(energy: dict | None) -> list[str]:
    return [f"{label}: {value}" for label, value in energy_rows(energy)]


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
