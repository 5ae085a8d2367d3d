"""HTTP benchmark client for any OpenAI-compatible server (ours, vLLM, SGLang, Ray Serve LLM).

Streams chat completions with EOS ignored, at fixed concurrency or with Poisson arrivals, and
reports throughput and latency: TTFT (to the first content chunk), TPOT (per output token after
the first), ITL (between chunks), end-to-end; mean, p50, p90, p99; and goodput under SLOs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
from tqdm.auto import tqdm

from cluster.workloads import BenchRequest


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache, if it says
    repeated_prefix_tokens: int = 0  # from the workload: what a cache could have served
    output_tokens: int = 0
    start: float = 0.0
    ttft: float | None = None
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def chat_body(model: str, request: BenchRequest, temperature: float) -> dict:
    """Every token the request asks for is generated (EOS ignored), so runs compare equal work."""
    return {
        "model": model,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
    }


async def stream_chat(
    client: httpx.AsyncClient, base_url: str, model: str, request: BenchRequest, temperature: float
) -> RequestResult:
    body = chat_body(model, request, temperature) | {
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start)
    last = start
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error in stream")
                    return result
                if usage := chunk.get("usage"):
                    read_usage(result, usage)
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = repr(exc)
        return result
    result.e2e = time.perf_counter() - start
    result.ok = result.ttft is not None
    if not result.ok:
        result.error = "no content received"
    return result


def read_usage(result: RequestResult, usage: dict) -> None:
    result.prompt_tokens = usage["prompt_tokens"]
    result.output_tokens = usage["completion_tokens"]
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def auth_headers() -> dict[str, str]:
    """The server's API key, from $OPENAI_API_KEY as the OpenAI tools read it."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def whole_chat(
    client: httpx.AsyncClient, base_url: str, model: str, request: BenchRequest, temperature: float
) -> RequestResult:
    """A non-streaming chat completion: its first token is its whole answer."""
    body = chat_body(model, request, temperature)
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start)
    try:
        response = await client.post(f"{base_url}/v1/chat/completions", json=body)
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {response.text[:200]!r}"
            return result
        usage = response.json()["usage"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = repr(exc)
        return result
    result.e2e = result.ttft = time.perf_counter() - start
    read_usage(result, usage)
    result.ok = True
    return result


async def run_benchmark(
    base_url: str,
    model: str,
    workload: list[BenchRequest],
    concurrency: int | None,
    request_rate: float | None,
    seed: int,
    temperature: float = 0.0,
    stream: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send the workload; returns per-request results and the wall time."""
    limit = asyncio.Semaphore(concurrency or len(workload))
    rng = random.Random(seed)
    bar = tqdm(total=len(workload), desc=f"bench {base_url}")
    timeout = httpx.Timeout(None, connect=30)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=auth_headers()) as client:

        async def one(request: BenchRequest) -> RequestResult:
            send = stream_chat if stream else whole_chat
            async with limit:
                result = await send(client, base_url, model, request, temperature)
            result.repeated_prefix_tokens = request.repeated_prefix_tokens
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request in workload:
            tasks.append(asyncio.create_task(one(request)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    bar.close()
    return results, wall


def latency_stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ms = np.asarray(values) * 1000
    return {
        "mean_ms": round(float(ms.mean()), 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def summarize(
    results: list[RequestResult], wall: float, goodput: dict[str, float] | None = None
) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(wall, 3),
        "request_throughput": round(len(ok) / wall, 3),
        "output_tokens": output_tokens,
        "output_token_throughput": round(output_tokens / wall, 2),
        "total_token_throughput": round((output_tokens + prompt_tokens) / wall, 2),
        "ttft": latency_stats([r.ttft for r in ok]),
        "tpot": latency_stats([r.tpot for r in ok if r.tpot is not None]),
        "itl": latency_stats([t for r in ok for t in r.itls]),
        "e2e": latency_stats([r.e2e for r in ok]),
    }
    if any(r.repeated_prefix_tokens for r in ok):
        summary["repeats"] = repeat_stats(ok)
    if goodput:
        good = [
            r
            for r in ok
            if r.ttft * 1000 <= goodput.get("ttft", float("inf"))
            and (r.tpot is None or r.tpot * 1000 <= goodput.get("tpot", float("inf")))
            and r.e2e * 1000 <= goodput.get("e2e", float("inf"))
        ]
        summary["goodput"] = {
            "slo_ms": goodput,
            "requests_per_s": round(len(good) / wall, 3),
            "met": len(good),
        }
    return summary


def repeat_stats(ok: list[RequestResult]) -> dict:
    """How the requests that resend an earlier prefix fared: how many found at least 90% of it
    in the cache of the replica they were sent to, and their TTFT against the first sends'."""
    repeats = [r for r in ok if r.repeated_prefix_tokens]
    cached = [r for r in repeats if r.cached_tokens >= 0.9 * r.repeated_prefix_tokens]
    return {
        "requests": len(repeats),
        "served_from_cache": len(cached),
        "served_from_cache_fraction": round(len(cached) / len(repeats), 3),
        "cached_prompt_tokens": sum(r.cached_tokens for r in repeats),
        "ttft_repeats": latency_stats([r.ttft for r in repeats]),
        "ttft_first_sends": latency_stats([r.ttft for r in ok if not r.repeated_prefix_tokens]),
    }


def parse_goodput(items: list[str] | None) -> dict[str, float] | None:
    """`ttft:500 tpot:50` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    if not items:
        return None
    slos = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"goodput SLOs look like ttft:500 tpot:50 e2e:10000, got {item!r}")
        slos[name] = float(value)
    return slos


def per_request(results: list[RequestResult]) -> list[dict]:
    """Raw latencies kept in the result file, for CDF plots."""
    return [
        {k: v for k, v in asdict(r).items() if k not in ("itls", "start")} | {"tpot": r.tpot}
        for r in results
    ]
