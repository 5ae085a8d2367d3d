"""Fit the simulator's step-time model to the real engine on this machine, and check it.

`python -m cluster calibrate` runs the engine offline over waves of requests of different sizes
and concurrency (so steps of every shape occur: long prefills, mixed steps, decodes of 1 to 48
sequences), records each step's shape and wall time (`LLMEngine.step_samples`), fits a
`StepTimeModel` and writes it as JSON. It then replays a held-out Poisson workload through the
engine in real time and through the simulator (one replica, the same limits, the fitted model)
and reports how far apart their median TTFT and end-to-end latency are.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from cluster.sim_workloads import SimRequest, Trace
from cluster.simulator import ReplicaSpec, SimConfig, simulate
from replicas.sampling_params import OutputKind, SamplingParams
from scheduler.step_time import StepSample, StepTimeModel, fit, relative_errors

# (requests added at once, prompt tokens, output tokens): from one long request to many short.
WAVES = (
    (1, (50, 600), (20, 60)),
    (4, (20, 900), (30, 120)),
    (16, (20, 400), (30, 150)),
    (48, (20, 300), (16, 150)),
    (8, (600, 1200), (10, 60)),
)


def _params(max_tokens: int, kind: OutputKind = OutputKind.FINAL_ONLY) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind)


def _prompt(rng: random.Random, vocab_size: int, length: int) -> list[int]:
    return [rng.randrange(100, vocab_size) for _ in range(length)]


def record_steps(engine, waves=WAVES, scale: float = 1.0, seed: int = 0) -> list[StepSample]:
    """Run the waves to completion, one after another, recording every step. `scale` shrinks
    the prompt and output lengths (for small models and quick runs)."""
    rng = random.Random(seed)
    engine.step_samples = samples = []
    try:
        for k, (count, prompt_len, output_len) in enumerate(waves):
            for i in range(count):
                max_tokens = max(1, int(rng.randint(*output_len) * scale))
                length = max(1, int(rng.randint(*prompt_len) * scale))
                length = min(length, engine.max_model_len - max_tokens)
                engine.add_request(
                    f"calibrate-{k}-{i}",
                    _prompt(rng, engine.vocab_size, length),
                    _params(max_tokens),
                )
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        engine.step_samples = None
    return samples


def calibrate(
    engine, name: str, traces: list[Trace] = (), scale: float = 1.0, seed: int = 0
) -> tuple[StepTimeModel, dict]:
    """Warm up, record steps (the waves, then `traces` replayed in real time: steps shaped like
    the traffic to be simulated), fit. Returns the model and its fit quality."""
    record_steps(engine, WAVES[:1], scale, seed + 1)  # first steps build kernels, fill caches
    samples = record_steps(engine, WAVES, scale, seed)
    for trace in traces:
        engine.step_samples = samples
        try:
            replay(engine, trace)
        finally:
            engine.step_samples = None
    model = fit(samples, name=name, note=f"fitted to {len(samples)} steps of the real engine")
    errors = sorted(relative_errors(model, samples))
    quality = {
        "steps": len(samples),
        "median_relative_error": round(errors[len(errors) // 2], 4),
        "p90_relative_error": round(errors[int(0.9 * len(errors))], 4),
        "predicted_over_measured_total": round(
            sum(model.seconds(*s.shape) for s in samples) / sum(s.seconds for s in samples), 4
        ),
    }
    return model, quality


def poisson_trace(
    vocab_size: int,
    num_requests: int,
    rate: float,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    block_size: int,
    seed: int = 0,
) -> Trace:
    rng = random.Random(seed)
    now = 0.0
    requests = []
    for i in range(num_requests):
        now += rng.expovariate(rate)
        tokens = _prompt(rng, vocab_size, rng.randint(*prompt_len))
        requests.append(SimRequest(i + 1, now, tokens, rng.randint(*output_len), []))
    return Trace(requests=requests, block_size=block_size)


@dataclass(frozen=True)
class Latencies:
    ttft: list[float]
    e2e: list[float]

    def medians(self) -> dict[str, float]:
        return {"ttft": statistics.median(self.ttft), "e2e": statistics.median(self.e2e)}


def replay(engine, trace: Trace) -> Latencies:
    """Send the trace's requests to the engine at their arrival times (real time, offline) and
    measure each one's TTFT and end-to-end latency as a client would."""
    pending = sorted(trace.requests, key=lambda r: r.arrival)
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    start = time.monotonic()
    while pending or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while pending and pending[0].arrival <= now:
            request = pending.pop(0)
            request_id = f"replay-{request.request_id}"
            params = _params(request.max_tokens, OutputKind.DELTA)
            engine.add_request(request_id, list(request.token_ids), params)
            arrival[request_id] = start + request.arrival
        if not engine.has_unfinished_requests():
            continue  # spin: a sleep would add its wake-up delay to the next TTFT
        outputs = engine.step()
        now = time.monotonic()
        for output in outputs:  # engine outputs: one generation each (n = 1 here)
            first.setdefault(output.request_id, now)
            if output.finish_reason is not None:
                done[output.request_id] = now
    ids = sorted(arrival)
    return Latencies([first[i] - arrival[i] for i in ids], [done[i] - arrival[i] for i in ids])


def simulate_trace(engine, trace: Trace, model: StepTimeModel) -> Latencies:
    """The same trace through the simulator: one replica with the engine's limits."""
    config = engine.scheduler.config
    spec = ReplicaSpec(
        num_blocks=engine.block_manager.num_blocks,
        block_size=engine.block_manager.block_size,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len,
    )
    result = simulate(
        SimConfig(1, "round_robin", model, spec, stats_period_s=0.0, warmup_fraction=0.0),
        trace,
        len(trace.requests),
    )
    return Latencies(
        [r["ttft"] for r in result.per_request], [r["e2e"] for r in result.per_request]
    )


def fidelity(engine, model: StepTimeModel, trace: Trace) -> dict:
    """Median TTFT and E2E of the real engine and of the simulator on the same trace."""
    real = replay(engine, trace).medians()
    simulated = simulate_trace(engine, trace, model).medians()
    return {
        "real_median_s": real,
        "simulated_median_s": simulated,
        "relative_error": {k: (simulated[k] - real[k]) / real[k] for k in real},
    }
