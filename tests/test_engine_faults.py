"""A failing step ends only the requests in it; the engine, its blocks and other requests go on."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from replicas import SamplingParams
from replicas.async_engine import AsyncLLMEngine
from replicas.config import EngineConfig
from replicas.engine import LLMEngine
from replicas.errors import EngineStepError
from scheduler import QueueFullError

POISON = 4242
GREEDY = dict(temperature=0, ignore_eos=True)
FAULTS = Path(__file__).parent / "fault_injection"


@dataclass
class Outcome:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


def run_to_end(engine: LLMEngine) -> dict[str, Outcome]:
    """Each request's tokens and how it ended, from the engine's step outputs."""
    outcomes: dict[str, Outcome] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outcome = outcomes.setdefault(output.request_id, Outcome())
            outcome.token_ids += output.token_ids
            outcome.finish_reason = output.finish_reason
            outcome.error = output.error
    return outcomes


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny_dir, monkeypatch):
    engine = LLMEngine(
        model=str(tiny_dir), dtype="float32", num_blocks=64, block_size=4, max_num_seqs=2
    )
    params = SamplingParams(max_tokens=12, **GREEDY)
    engine.add_request("alone", [11, 12, 13, 14], params)
    expected = run_to_end(engine)["alone"].token_ids

    execute = engine.runner.execute

    def failing_execute(batch, *args):
        if any(POISON in seq.token_ids for seq in batch.seqs):
            raise RuntimeError("injected fault")
        return execute(batch, *args)

    monkeypatch.setattr(engine.runner, "execute", failing_execute)
    engine.add_request("running", [21, 22, 23], params)
    engine.step()
    engine.add_request("poisoned", [POISON, 5, 6], params)
    engine.add_request("waiting", [11, 12, 13, 14], params)  # max_num_seqs=2: not in that step
    finals = run_to_end(engine)
    for failed in ("running", "poisoned"):
        assert finals[failed].error == "RuntimeError: injected fault", f"{failed} did not fail"
        assert finals[failed].finish_reason == "error"
    assert finals["waiting"].error is None
    assert finals["waiting"].token_ids == expected, "a request outside the failed step changed"
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "the failed requests leaked blocks"
    assert not engine.scheduler.has_unfinished()


def test_a_failing_step_in_the_engine_process_raises_only_for_its_request(tiny_dir, monkeypatch):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("CONTINUUM_FAULT_TOKEN", str(POISON))
    config = EngineConfig(model=str(tiny_dir), dtype="float32", num_blocks=64, block_size=4)
    engine = AsyncLLMEngine(config)
    params = SamplingParams(max_tokens=8, **GREEDY)

    async def generate(request_id: str, prompt: list[int]) -> list[int]:
        return [t async for o in engine.generate(request_id, prompt, params) for t in o.token_ids]

    try:
        with pytest.raises(EngineStepError, match="injected fault"):
            asyncio.run(generate("poisoned", [POISON, 1, 2]))
        assert len(asyncio.run(generate("healthy", [3, 4, 5]))) == 8
        engine.check_health()
        stats = engine.stats()
        assert stats.free_blocks == stats.total_blocks
    finally:
        engine.shutdown()


def test_refused_requests_leave_nothing_behind(tiny_dir):
    """Requests refused at admission (queue full, too long, bad token ids) hold no entry, no
    sequence and no block afterwards."""
    engine = LLMEngine(
        model=str(tiny_dir), dtype="float32", num_blocks=64, block_size=4, max_waiting_seqs=2
    )
    params = SamplingParams(max_tokens=4, **GREEDY)
    engine.add_request("a", [1, 2, 3], params)
    engine.add_request("b", [1, 2, 3], params)
    refused = 0
    for i in range(100):
        with pytest.raises(QueueFullError):
            engine.add_request(f"refused-{i}", [1, 2, 3], params)
        refused += 1
    with pytest.raises(ValueError, match="exceeds"):
        engine.add_request("too-long", [1] * 10, SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad-ids", [10**9], params)
    assert refused == 100
    assert set(engine.requests) == {"a", "b"}, "refused requests stayed registered"
    assert len(engine._generation_of) == 2
    run_to_end(engine)
    assert not engine.requests and not engine._generation_of
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
