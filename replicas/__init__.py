"""One replica's engine: model, paged KV cache, attention, sampler, step loop, and wrappers."""

from replicas.config import EngineConfig
from replicas.engine import LLMEngine
from replicas.llm import LLM
from replicas.outputs import CompletionOutput, Logprob, RequestOutput
from replicas.sampling_params import OutputKind, SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "Logprob",
    "OutputKind",
    "RequestOutput",
    "SamplingParams",
]
