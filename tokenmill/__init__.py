"""tokenmill: an LLM inference engine that tells you what every token cost.

The names below load on first use, so that a process that needs only the request models (the
server's body parser) or the errors does not import torch.
"""

from importlib import import_module

_HOMES = {
    "LLM": "tokenmill.entrypoints.llm",
    "LLMEngine": "tokenmill.engine.engine", "EngineConfig": "tokenmill.config",
    "SamplingParams": "tokenmill.sampling_params", "StructuredOutputsParams": "tokenmill.sampling_params",
    "RequestOutput": "tokenmill.outputs", "CompletionOutput": "tokenmill.outputs",
    "Logprob": "tokenmill.outputs", "RequestMetrics": "tokenmill.outputs",
    "TokenmillError": "tokenmill.errors", "InvalidParameterError": "tokenmill.errors",
    "ModelLoadError": "tokenmill.errors", "RequestFailedError": "tokenmill.errors",
    "UnknownOptionError": "tokenmill.errors",
}
__all__ = list(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
