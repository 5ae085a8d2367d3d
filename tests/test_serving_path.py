"""The serving path under load, with the synthetic engine behind Serve (2 replicas): every token
arrives once and in order, usage is right, and cancelled or failed streams free every block."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
import ray
from conftest import deploy, wait_for

from cluster.status import replica_stats

APP = "synth"


@pytest.fixture(scope="module")
def synth(serve_instance) -> str:
    args = {
        "served_model_name": "synth",
        "engine": {
            "device": "cpu",
            "synthetic": {"tokens_per_second": 50_000, "output": "counting"},
            "num_blocks": 16384,
            "block_size": 16,
            "max_num_batched_tokens": 4096,
            "max_num_seqs": 512,
            "max_model_len": 2048,
        },
        "replicas": {
            "num_replicas": 2,
            "max_ongoing_requests": 1024,
            "ray_actor_options": {"num_cpus": 1},
            "health_check_period_s": 1,
        },
        "router": {"stats_period_s": 0.2},
    }
    return deploy(serve_instance, APP, args)


def counting(n: int) -> str:
    """What the synthetic engine's counting output says in `n` tokens."""
    return "".join(str(i % 10) for i in range(n))


def idle(count: int = 2) -> bool:
    stats = replica_stats(APP)
    return len(stats) == count and all(
        s.get("free_blocks") == s.get("total_blocks")
        and s.get("num_running") == 0
        and s.get("num_waiting") == 0
        for s in stats
    )


async def stream(
    client: httpx.AsyncClient, base: str, max_tokens: int, leave_after: int | None = None
) -> str:
    """One streamed completion; checks its text and usage unless it leaves early."""
    body = {
        "model": "synth",
        "prompt": [random.randrange(1000, 30000) for _ in range(random.randint(1, 64))],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, usage, chunks = [], None, 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return f"http {response.status_code}"
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                return "error event"
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                text.append(choice["text"])
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return "left"
    got = "".join(text)
    assert got == counting(max_tokens), f"tokens lost, repeated or reordered: {got!r}"
    assert usage and usage["completion_tokens"] == max_tokens, usage
    return "completed"


def test_256_concurrent_streams_deliver_every_token_once_in_order(synth):
    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *(stream(client, synth, random.randint(20, 200)) for _ in range(256))
            )

    outcomes = asyncio.run(run())
    assert outcomes.count("completed") == 256, outcomes
    wait_for(idle, timeout=30)


def test_soak_with_cancellations_and_a_replica_killed_midway_leaks_nothing(synth):
    """Streams, ~20% left at a random point, one engine replica killed midway: every stream
    ends (completed, or an error event / failed status for those on the killed replica), and
    afterwards every replica (the replacement included) holds all its blocks free."""
    total, concurrency = 3000, 256
    rng = random.Random(0)
    plans = [(rng.random() < 0.2, rng.randint(4, 48)) for _ in range(total)]

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency)
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def one(i: int) -> str:
                leave, max_tokens = plans[i]
                async with gate:
                    if i == total // 2:
                        victim = replica_stats(APP)[0]["replica"]
                        name = f"SERVE_REPLICA::{APP}#LLMServer#{victim}"
                        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                    try:
                        leave_after = rng.randint(1, 4) if leave else None
                        return await stream(client, synth, max_tokens, leave_after)
                    except httpx.HTTPError as exc:
                        return f"transport error {type(exc).__name__}"

            return await asyncio.gather(*(one(i) for i in range(total)))

    start = time.monotonic()
    outcomes = asyncio.run(run())
    print(f"soak: {total} synthetic streams in {time.monotonic() - start:.1f}s")
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    assert counts.get("completed", 0) + counts.get("left", 0) >= 0.9 * total, counts
    assert set(counts) <= {"completed", "left", "error event", "http 503"}, counts
    wait_for(lambda: idle(2), timeout=180)
