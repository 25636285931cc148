"""tokenmill: an LLM inference engine that tells you what every token cost."""

from tokenmill.engine.engine import LLMEngine
from tokenmill.entrypoints.llm import LLM
from tokenmill.errors import InvalidParameterError, ModelLoadError, RequestFailedError, TokenmillError
from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = [
    "LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics",
    "TokenmillError", "InvalidParameterError", "ModelLoadError", "RequestFailedError",
]
__version__ = "0.1.0"
