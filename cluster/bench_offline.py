"""Offline benchmark: the engine against HF `model.generate` static batches, in the same run.

Both sides get the same seeded chat workload, the same weights, dtype and threads, EOS ignored so
every request produces exactly its requested tokens. Static batching is the baseline a user gets
without a serving engine: left-padded batches of 8 that run until their longest request is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from cluster.workloads import BenchRequest
from replicas import LLMEngine, SamplingParams
from replicas.sampling_params import OutputKind


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


def run_engine(
    engine: LLMEngine,
    workload: list[BenchRequest],
    on_step: Callable[[float], None] | None = None,
) -> RunResult:
    """Run `workload` to completion; `on_step` gets each step's wall time in seconds."""
    start = time.perf_counter()
    for i, request in enumerate(workload):
        params = SamplingParams(
            temperature=0,
            max_tokens=request.max_tokens,
            ignore_eos=True,
            output_kind=OutputKind.FINAL_ONLY,
        )
        engine.add_request(f"bench-{i}", request.prompt_token_ids, params)
    generated = 0
    with tqdm(total=len(workload), desc="continuum") as bar:
        while engine.has_unfinished_requests():
            step_start = time.perf_counter()
            outputs = engine.step()
            if on_step is not None:
                on_step(time.perf_counter() - step_start)
            for output in outputs:
                generated += len(output.outputs[0].token_ids)
                bar.update(1)
    return RunResult(
        "continuum",
        time.perf_counter() - start,
        sum(len(r.prompt_token_ids) for r in workload),
        generated,
    )


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


def profile_engine(engine: LLMEngine, workload: list[BenchRequest]) -> dict[str, float]:
    """Where a step's time goes, as shares of the wall time of one run of `workload`.

    Uses the engine's `continuum.*` profiler ranges; "forward, other" is everything in the model
    but matmuls and attention (norms, rotary, activations, and transformers' Python overhead).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_engine(engine, workload)
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
        "detokenize and outputs": totals.get("outputs", 0.0),
    }
    shares["python loop, other"] = wall - sum(shares.values())
    return {name: round(100 * seconds / wall, 1) for name, seconds in shares.items()}
