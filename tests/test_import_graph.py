"""Imports point down: each tokenmill package imports only packages below it (docs/architecture.md).

Read from the source (every import statement, those inside functions too), so a lazy import
that goes the wrong way fails as well."""

from __future__ import annotations

import ast
from pathlib import Path

import tokenmill

ROOT = Path(tokenmill.__file__).parent

# Highest first. A module may import the packages of its own line and of any later line.
LAYERS = [
    ["entrypoints"],
    ["sim"],  # the simulator drives the scheduler and reads bench workloads
    ["bench"],
    ["engine"],
    ["spec"],
    ["metering"],
    ["executor"],
    ["kv"],
    ["loader"],
    ["grammar"],
    ["tokenizer"],
    ["config", "errors", "outputs", "sampling_params", "sequence", "step_plan", "weight_formats", "cache"],  # basic types
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """tokenmill.engine.scheduler -> engine; tokenmill.sequence -> sequence."""
    return module.split(".")[1]


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("tokenmill."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("tokenmill.")]
    return found


def test_every_package_has_a_layer():
    units = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"} | {p.name for p in ROOT.iterdir()
                                                                             if (p / "__init__.py").is_file()}
    assert units == set(RANK), f"add these to LAYERS: {sorted(units - set(RANK))}; gone: {sorted(set(RANK) - units)}"


def test_imports_point_down():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.parent == ROOT and path.stem == "__init__":
            continue  # the package's facade (LLM, SamplingParams) sits above everything
        source = unit_of("tokenmill." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for target in imports(path):
            dest = unit_of(target)
            if RANK[dest] < RANK[source]:
                upward.append(f"{path.relative_to(ROOT.parent)} imports {target}")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)
