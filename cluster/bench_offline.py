"""Offline benchmark: the engine against HF `model.generate` static batches, in the same run.

Both sides get the same seeded chat workload, the same weights, dtype and threads, EOS ignored so
every request produces exactly its requested tokens. Static batching is the baseline a user gets
without a serving engine: left-padded batches of 8 that run until their longest request is done.

`--structured` instead measures what structured outputs cost: the same workload unconstrained and
with every request under one JSON schema, side by side on one engine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from cluster.workloads import BenchRequest
from replicas import LLM, SamplingParams
from replicas.sampling_params import StructuredOutputsParams


@dataclass
class RunResult:
    name: str
    seconds: float
    prompt_tokens: int
    generated_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds

    def as_dict(self) -> dict:
        return {**asdict(self), "generated_tokens_per_s": round(self.tokens_per_second, 2)}


# The structured-output benchmark's schema: records as applications ask for them, with a list
# too long to finish within any benchmark's max_tokens, so that constrained requests run exactly
# as many steps as unconstrained ones and the two runs differ only by the grammar's work.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 1000,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer", "minimum": 0, "maximum": 150},
                    "email": {"type": "string"},
                    "role": {"enum": ["admin", "user", "guest"]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["name", "age", "email", "role", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}


@contextmanager
def timed_steps(llm: LLM, on_step: Callable[[float], None] | None) -> Iterator[None]:
    """Report the wall time of each of `llm`'s steps to `on_step` while in the block."""
    if on_step is None:
        yield
        return
    step = llm.step

    def timed():
        start = time.perf_counter()
        outputs = step()
        on_step(time.perf_counter() - start)
        return outputs

    llm.step = timed
    try:
        yield
    finally:
        del llm.step


def run_engine(
    llm: LLM,
    workload: list[BenchRequest],
    structured: StructuredOutputsParams | None = None,
    name: str = "continuum",
    on_step: Callable[[float], None] | None = None,
) -> RunResult:
    """The whole offline path (engine steps and the output processor's text), all requests
    queued at once; greedy, EOS ignored; with `structured`, every request is constrained;
    `on_step` gets each step's wall time in seconds."""
    start = time.perf_counter()
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=request.max_tokens,
            ignore_eos=True,
            structured_outputs=structured,
        )
        for request in workload
    ]
    with timed_steps(llm, on_step):
        outputs = llm.generate([r.prompt_token_ids for r in workload], params, use_tqdm=False)
    return RunResult(
        name,
        time.perf_counter() - start,
        sum(len(r.prompt_token_ids) for r in workload),
        sum(len(output.token_ids) for output in outputs),
    )


def structured_overhead(
    llm: LLM, workload: list[BenchRequest], repeats: int = 2, profile: bool = False
) -> dict:
    """Tokens/s of `workload` unconstrained and under `BENCH_SCHEMA`, in `repeats` adjacent
    pairs on one engine; overhead = 1 - constrained / unconstrained, for the best run of each
    and as the median over pairs (steadier on a shared machine). `profile`: where each run's
    time goes, from the engine's profiler ranges."""
    spec = StructuredOutputsParams(json=BENCH_SCHEMA)
    start = time.perf_counter()
    llm.engine.grammars.compile(spec)  # wraps the vocabulary once (an engine's first grammar)
    first_compile_s = time.perf_counter() - start
    plain: list[RunResult] = []
    constrained: list[RunResult] = []
    for _ in range(repeats):
        plain.append(run_engine(llm, workload, None, "unconstrained"))
        constrained.append(run_engine(llm, workload, spec, "json_schema"))
    best_plain = max(plain, key=lambda r: r.tokens_per_second)
    best_constrained = max(constrained, key=lambda r: r.tokens_per_second)
    ratio = best_constrained.tokens_per_second / best_plain.tokens_per_second
    pair_ratios = [
        c.tokens_per_second / p.tokens_per_second for p, c in zip(plain, constrained, strict=True)
    ]
    report = {
        "results": [r.as_dict() for r in plain + constrained],
        "unconstrained_tokens_per_s": round(best_plain.tokens_per_second, 2),
        "json_schema_tokens_per_s": round(best_constrained.tokens_per_second, 2),
        "overhead_percent": round(100 * (1 - ratio), 2),
        "overhead_percent_median_of_pairs": round(100 * (1 - statistics.median(pair_ratios)), 2),
        "first_grammar_compile_s": round(first_compile_s, 3),
    }
    if profile:
        report["profile_seconds"] = {
            "unconstrained": profile_ranges(llm, workload, None),
            "json_schema": profile_ranges(llm, workload, spec),
        }
    return report


def profile_ranges(
    llm: LLM, workload: list[BenchRequest], structured: StructuredOutputsParams | None
) -> dict[str, float]:
    """Seconds in each of the engine's `continuum.*` profiler ranges over one run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_engine(llm, workload, structured, "profiled")
        wall = time.perf_counter() - start
    ranges = {
        event.key.removeprefix("continuum."): round(event.cpu_time_total / 1e6, 3)
        for event in prof.key_averages()
        if event.key.startswith("continuum.")
    }
    return {"wall": round(wall, 3), **ranges}


@torch.inference_mode()
def run_hf_static(
    model, pad_token_id: int, workload: list[BenchRequest], batch_size: int = 8
) -> RunResult:
    """HF generate over left-padded static batches; counts only the tokens each request wants."""
    start = time.perf_counter()
    generated = 0
    batches = [workload[i : i + batch_size] for i in range(0, len(workload), batch_size)]
    for batch in tqdm(batches, desc=f"hf static x{batch_size}"):
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            n = len(request.prompt_token_ids)
            ids[row, width - n :] = torch.tensor(request.prompt_token_ids)
            mask[row, width - n :] = 1
        longest = max(r.max_tokens for r in batch)
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
        produced = out.shape[1] - width
        generated += sum(min(r.max_tokens, produced) for r in batch)
    return RunResult(
        f"hf_static_batch_{batch_size}",
        time.perf_counter() - start,
        sum(len(r.prompt_token_ids) for r in workload),
        generated,
    )


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise")


def profile_engine(llm: LLM, workload: list[BenchRequest]) -> dict[str, float]:
    """Where a step's time goes, as shares of the wall time of one run of `workload`.

    Uses the engine's `continuum.*` profiler ranges; "forward, other" is everything in the model
    but matmuls and attention (norms, rotary, activations, and transformers' Python overhead).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_engine(llm, workload)
        wall = time.perf_counter() - start
    totals: dict[str, float] = {}
    matmul = 0.0
    for event in prof.key_averages():
        if event.key.startswith("continuum."):
            totals[event.key.removeprefix("continuum.")] = event.cpu_time_total / 1e6
        elif event.key in MATMUL_OPS:
            matmul += event.self_cpu_time_total / 1e6
    forward = totals.get("forward", 0.0)
    attention = totals.get("attention", 0.0)
    shares = {
        "forward: matmuls": matmul,
        "forward: attention": attention,
        "forward: other": forward - matmul - attention,
        "prepare step inputs": totals.get("prepare", 0.0),
        "schedule": totals.get("schedule", 0.0),
        "sample": totals.get("sample", 0.0),
        "engine outputs": totals.get("outputs", 0.0),
        "detokenize (output processor)": totals.get("detokenize", 0.0),
    }
    shares["python loop, other"] = wall - sum(shares.values())
    return {name: round(100 * seconds / wall, 1) for name, seconds in shares.items()}
