"""One replica's engine: model, paged KV cache, attention, sampler, step loop, and wrappers.

Exports resolve on first use, so that light modules (`replicas.config`, `replicas.outputs`) can be
imported without loading torch and transformers (Serve's app builder, the CLI's validation).
"""

import importlib

_EXPORTS = {
    "LLM": "replicas.llm",
    "LLMEngine": "replicas.engine",
    "EngineConfig": "replicas.config",
    "CompletionOutput": "replicas.outputs",
    "Logprob": "replicas.outputs",
    "RequestOutput": "replicas.outputs",
    "OutputKind": "replicas.sampling_params",
    "SamplingParams": "replicas.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'replicas' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
