"""The engine's settings: one pydantic model, validated where they enter (CLI, YAML, `LLM()`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from scheduler.step_time import StepTimeModel

DType = Literal["auto", "float32", "bfloat16", "float16"]
AttentionBackendName = Literal["auto", "cpu", "reference", "varlen"]

# Tokens per KV block when `block_size` is not set: small blocks on CPU (finer prefix sharing),
# 256 on CUDA, the smallest page FlashAttention's paged kernel (behind `varlen_attn`) accepts.
DEFAULT_BLOCK_SIZE = {"cpu": 16, "cuda": 256}
VARLEN_BLOCK_MULTIPLE = 256


def check_varlen_block_size(block_size: int) -> None:
    """The varlen backend reads the cache in place through FlashAttention's paged kernel."""
    if block_size % VARLEN_BLOCK_MULTIPLE:
        raise ValueError(
            f"block_size {block_size} does not suit the varlen attention backend (CUDA): "
            f"FlashAttention's paged kernel needs a multiple of {VARLEN_BLOCK_MULTIPLE}. Leave "
            "block_size unset (256 on CUDA), or choose attention_backend: reference"
        )


def default_cache_dir() -> Path:
    """Where converted GGUF models are kept: $CONTINUUM_CACHE_DIR, else the XDG cache."""
    if env := os.environ.get("CONTINUUM_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "continuum"


class SyntheticConfig(BaseModel):
    """A synthetic model (replicas/synthetic.py): steps take a step-time model's duration and
    sample tokens without a forward pass. Set exactly one of the two time sources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens_per_second: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Steps take (tokens in the step) / tokens_per_second."
    )
    step_time_model: Path | None = Field(
        None, description="A step-time model JSON (from `python -m cluster calibrate`)."
    )
    output: Literal["random", "counting"] = Field(
        "random",
        description="random: ordinary tokens at random; counting: the digits 0-9 in turn, so a "
        "client can check that every token arrives once and in order.",
    )

    @model_validator(mode="after")
    def _one_time_source(self) -> SyntheticConfig:
        if (self.tokens_per_second is None) == (self.step_time_model is None):
            raise ValueError("set exactly one of tokens_per_second and step_time_model")
        return self

    def step_model(self) -> StepTimeModel:
        """How long each synthetic step lasts (also what the router's cost weights derive from)."""
        if self.step_time_model is not None:
            return StepTimeModel.load(self.step_time_model)
        return StepTimeModel.for_throughput(self.tokens_per_second)


class EngineConfig(BaseModel):
    """Everything one replica's engine needs: which model, on what device, with how much cache."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    model: str | None = Field(
        None,
        description="Hub id, local HF directory, or .gguf file. None: the embedded "
        "SmolLM2-135M-Instruct.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer source if not the model's own.")
    revision: str | None = None
    dtype: DType = "auto"
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    block_size: Annotated[int, Field(gt=0, le=4096)] | None = Field(
        None,
        description="Tokens per KV-cache block. Default: 16 on CPU, 256 on CUDA (the varlen "
        "backend needs a multiple of 256).",
    )
    attention_backend: AttentionBackendName = Field(
        "auto",
        description="auto: `cpu` on CPU, `varlen` on CUDA. cpu: native paged decode kernel "
        "(CPU) or a gathered torch decode, SDPA per prefill chunk. varlen: one FlashAttention "
        "call per layer over the paged cache (torch.nn.attention.varlen, CUDA, fp16/bf16). "
        "reference: the pure-torch specification of the varlen contract (slow).",
    )
    enforce_eager: bool = Field(
        False,
        description="CUDA: run decode steps eagerly instead of replaying CUDA graphs "
        "(graphs are captured at start-up, one per batch-size bucket).",
    )
    num_blocks: Annotated[int, Field(gt=0)] | None = Field(
        None, description="KV-cache blocks; overrides kv_cache_memory_gib."
    )
    kv_cache_memory_gib: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="KV-cache size. Default: 2 GiB on CPU; on CUDA, what gpu_memory_utilization "
        "leaves.",
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    max_num_batched_tokens: Annotated[int, Field(gt=0)] = 512
    max_num_seqs: Annotated[int, Field(gt=0)] = 64
    max_model_len: Annotated[int, Field(gt=0)] | None = None
    max_waiting_seqs: Annotated[int, Field(gt=0)] = Field(
        1024, description="Admission bound: new requests beyond it are refused (HTTP 429)."
    )
    max_queued_prompt_tokens: Annotated[int, Field(gt=0)] = Field(
        262_144,
        description="Admission bound on prompt tokens waiting for prefill (HTTP 429 beyond).",
    )
    enable_prefix_caching: bool = True
    report_cache_events: bool = Field(
        False,
        description="Report what enters and leaves the prefix cache, for a prefix-aware router "
        "(the Serve app turns it on).",
    )
    model_cache_dir: Path = Field(default_factory=default_cache_dir)
    num_threads: Annotated[int, Field(gt=0)] | None = Field(
        None, description="torch intra-op threads on CPU (default: torch's choice)."
    )
    native_kernels: bool = Field(
        True,
        description="On CPU: decode with the native paged-attention kernel (built on first use) "
        "and prepack bf16/fp16 linear weights for oneDNN.",
    )
    stream_messages_per_s: Annotated[int, Field(ge=0)] = Field(
        4000,
        description="Streaming: the most stream messages per second this replica sends, shared "
        "by its open streams; a stream's new tokens wait (merged) until its share of time has "
        "passed, so under load a message carries several tokens instead of each token paying "
        "every hop. The first token always goes at once; 0: every step's tokens at once.",
    )
    seed: int = 0
    synthetic: SyntheticConfig | None = Field(
        None,
        description="Run a synthetic model instead of the weights (the serving path at any "
        "token rate, without a forward pass); the tokenizer is still `model`'s.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model (only for sources you trust)."
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Also load .bin/.pt weights (pickle: can run code). Default: only "
        "safetensors or GGUF.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fit_default_max_num_seqs(cls, values: object) -> object:
        """A small token budget without an explicit max_num_seqs lowers it instead of failing."""
        if isinstance(values, dict) and values.get("max_num_seqs") is None:
            budget = values.get("max_num_batched_tokens")
            default = cls.model_fields["max_num_seqs"].default
            if isinstance(budget, int) and budget < default:
                values = {**values, "max_num_seqs": budget}
        return values

    @model_validator(mode="after")
    def _check_limits(self) -> EngineConfig:
        if self.attention_backend == "varlen" and self.block_size is not None:
            check_varlen_block_size(self.block_size)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        return self
