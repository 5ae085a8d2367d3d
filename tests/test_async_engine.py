"""The engine behind asyncio: its own process, streams per request, aborts that free blocks."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import wait_for
from torch import nn

from replicas.async_engine import AsyncLLMEngine
from replicas.config import EngineConfig
from replicas.outputs import CompletionOutput, RequestOutput, merge_deltas
from replicas.packed_linear import PackedLinear, can_pack
from replicas.sampling_params import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def engine_config(tiny_dir, **overrides) -> EngineConfig:
    settings = dict(
        model=str(tiny_dir), dtype="float32", device="cpu", num_threads=1, num_blocks=64
    )
    return EngineConfig(**{**settings, "block_size": 4, **overrides})


async def collect(engine: AsyncLLMEngine, request_id: str, prompt, params) -> RequestOutput:
    merged = None
    async for output in engine.generate(request_id, prompt, params):
        merged = output if merged is None else merge_deltas(merged, output)
    return merged


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = AsyncLLMEngine(engine_config(tiny_dir, stream_messages_per_s=0))
    yield engine
    engine.shutdown()


def blocks_all_free(engine: AsyncLLMEngine) -> bool:
    stats = engine.stats()
    return stats.free_blocks == stats.total_blocks and stats.num_running == 0


class RecordedMetrics:
    """A metrics sink that keeps what the engine process reported."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, dict | None]] = []

    def record(self, name: str, value: float, labels: dict | None = None) -> None:
        self.records.append((name, value, labels))

    def refresh_gauges(self) -> None:
        pass

    def finished(self, reason: str) -> int:
        return sum(
            1
            for name, _, labels in self.records
            if name == "continuum_requests_finished" and labels == {"finish_reason": reason}
        )


def test_concurrent_streams_equal_one_at_a_time(engine):
    prompts = [[5 + i, 17, 300 + 7 * i] * (i + 1) for i in range(6)]
    params = [SamplingParams(max_tokens=4 + 3 * i, **GREEDY) for i in range(6)]

    async def run(concurrently: bool) -> list[RequestOutput]:
        calls = [
            collect(engine, f"{concurrently}-{i}", p, s)
            for i, (p, s) in enumerate(zip(prompts, params, strict=True))
        ]
        if concurrently:
            return await asyncio.gather(*calls)
        return [await call for call in calls]

    alone, together = asyncio.run(run(False)), asyncio.run(run(True))
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, f"request {i} changed in a batch"
        assert len(a.outputs[0].token_ids) == params[i].max_tokens
        assert a.finished and a.finish_reason == "length"
    wait_for(lambda: blocks_all_free(engine), timeout=10)


def test_a_message_budget_merges_deltas_without_losing_tokens(tiny_dir, engine):
    params = SamplingParams(max_tokens=40, **GREEDY)
    expected = asyncio.run(collect(engine, "plain", [7, 8, 9], params))
    coalescing = AsyncLLMEngine(engine_config(tiny_dir, stream_messages_per_s=20))
    try:

        async def chunks() -> list[RequestOutput]:
            return [o async for o in coalescing.generate("coalesced", [7, 8, 9], params)]

        outputs = asyncio.run(chunks())
    finally:
        coalescing.shutdown()
    tokens = [t for o in outputs for t in o.outputs[0].token_ids]
    assert tokens == expected.outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in outputs) == expected.outputs[0].text
    assert len(outputs) < 40, "no deltas were merged"


def test_a_caller_that_leaves_aborts_its_request_and_frees_blocks(tiny_dir):
    """The engine ends the request as aborted (not by running it to its length)."""
    metrics = RecordedMetrics()
    engine = AsyncLLMEngine(engine_config(tiny_dir), metrics)

    async def leave_early() -> None:
        params = SamplingParams(max_tokens=200, **GREEDY)
        stream = engine.generate("leaver", list(range(10, 50)), params)
        async for _ in stream:
            break
        await stream.aclose()

    try:
        asyncio.run(leave_early())
        wait_for(lambda: metrics.finished("abort") == 1, timeout=10)
        wait_for(lambda: blocks_all_free(engine), timeout=10)
        assert metrics.finished("length") == 0, "the request ran to its end instead"
    finally:
        engine.shutdown()


def test_a_duplicate_request_id_is_refused_and_the_first_request_goes_on(engine):
    params = SamplingParams(max_tokens=60, **GREEDY)
    expected = asyncio.run(collect(engine, "solo", [4, 5, 6], params)).outputs[0].token_ids

    async def both() -> tuple[list[int], BaseException | None]:
        first = engine.generate("same-id", [4, 5, 6], params)
        tokens = list((await anext(first)).outputs[0].token_ids)  # the first is running now
        try:
            await collect(engine, "same-id", [7, 8, 9], params)
            error = None
        except ValueError as exc:
            error = exc
        async for output in first:
            tokens += output.outputs[0].token_ids
        return tokens, error

    tokens, error = asyncio.run(both())
    assert error is not None and "already in use" in str(error)
    assert tokens == expected, "the second request disturbed the first"
    wait_for(lambda: blocks_all_free(engine), timeout=10)


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="no oneDNN")
def test_packed_linear_equals_nn_linear_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    packed = PackedLinear(linear)
    for rows in (1, 7, 64, 200):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(packed(x), linear(x)), f"packed result differs for {rows} rows"


def test_merge_deltas_concatenates_text_tokens_and_logprobs():
    def delta(text, ids, finished=False):
        out = CompletionOutput(
            index=0,
            text=text,
            token_ids=ids,
            finish_reason="length" if finished else None,
            logprobs=[{i: None} for i in ids],
        )
        return RequestOutput("r", None, [1], [out], finished=finished)

    merged = merge_deltas(delta("a", [1]), delta("bc", [2, 3], finished=True))
    assert merged.outputs[0].text == "abc"
    assert merged.outputs[0].token_ids == [1, 2, 3]
    assert len(merged.outputs[0].logprobs) == 3
    assert merged.finished and merged.finish_reason == "length"
