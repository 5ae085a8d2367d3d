"""Serving-path capacity: how many streamed tokens per second a server delivers, and what each of
its processes spends per token (run against a server on this machine, ideally with the synthetic
engine, so the engine's compute is out of the picture).

Each of `concurrency` slots keeps one completion stream open (a new one as soon as one ends), with
token-id prompts (no tokenization cost) and vLLM's `continuous_usage_stats`, so every chunk says
how many tokens the stream has delivered. The client is a minimal HTTP/1.1 reader on asyncio
streams: it looks for the usage numbers in each event with a byte regex, because a client that
parses JSON per event would be the bottleneck on a small machine. CPU is read from
/proc/<pid>/stat of every process of the server, grouped by role, over the same window.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

COMPLETION_TOKENS = re.compile(rb'"completion_tokens":(\d+)')
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Server processes by role, from their command lines (Ray names its worker processes).
ROLES = {
    "proxy": ("ray::ProxyActor",),
    "ingress": (":OpenAIIngress",),
    "replica": (":LLMServer",),
    "engine": ("replicas.engine_core",),
    "ray_daemons": ("gcs_server", "raylet", "ServeController", "dashboard", "log_monitor", "ray::"),
}
SERVE_PATH = ("proxy", "ingress", "replica")


def process_roles() -> dict[int, str]:
    roles = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for role, markers in ROLES.items():  # first match wins: ray_daemons is the catch-all
            if any(marker in cmdline for marker in markers):
                roles[int(entry)] = role
                break
    return roles


def cpu_seconds(pids: dict[int, str]) -> dict[str, float]:
    totals: dict[str, float] = dict.fromkeys([*ROLES, "client"], 0.0)
    for pid, role in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        totals[role] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return totals


@dataclass
class Tally:
    """What the streams delivered, counted as it arrives."""

    tokens: int = 0
    completed: int = 0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)
    error_examples: list[str] = field(default_factory=list)


async def one_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    tally: Tally,
) -> bool:
    """Send one request on a kept-alive connection and read its SSE body; False if the
    connection cannot be reused."""
    start = time.perf_counter()
    writer.write(request)
    status = await reader.readline()
    if not status:
        return False
    chunked = keep_alive = True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "transfer-encoding":
            chunked = value == "chunked"
        elif name == "connection":
            keep_alive = value != "close"
    if b" 200 " not in status or not chunked:
        tally.errors += 1
        if len(tally.error_examples) < 5:
            tally.error_examples.append(status.decode(errors="replace").strip())
        return False
    delivered = 0
    pending = b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        pending += data[:-2]
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if b'"error"' in event:
                tally.errors += 1
                if len(tally.error_examples) < 5:
                    tally.error_examples.append(event.decode(errors="replace")[:300])
                continue
            if (match := COMPLETION_TOKENS.search(event)) is not None:
                now_delivered = int(match.group(1))
                if delivered == 0 and now_delivered:
                    tally.ttfts.append(time.perf_counter() - start)
                tally.tokens += now_delivered - delivered
                delivered = now_delivered
    tally.completed += 1
    return keep_alive


async def slot(url: str, body_for: callable, tally: Tally, stop: asyncio.Event) -> None:
    """One concurrent stream, renewed until `stop`."""
    parts = urlsplit(url)
    path = (parts.path.rstrip("/") or "") + "/v1/completions"
    headers = f"Host: {parts.netloc}\r\nContent-Type: application/json\r\n"
    if key := os.environ.get("OPENAI_API_KEY"):
        headers += f"Authorization: Bearer {key}\r\n"
    reader = writer = None
    while not stop.is_set():
        if writer is None:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        body = body_for()
        request = (
            f"POST {path} HTTP/1.1\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        try:
            reusable = await one_stream(reader, writer, request, tally)
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            tally.errors += 1
            if len(tally.error_examples) < 5:
                tally.error_examples.append(repr(exc))
            reusable = False
        if not reusable:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


def engines_generated(ray_address: str | None, app: str) -> int | None:
    """Tokens the app's engines have generated so far (from their routing stats); None without
    the server's Ray address."""
    if ray_address is None:
        return None
    import ray

    from cluster.status import replica_stats

    if not ray.is_initialized():
        ray.init(address=ray_address, namespace="serve", log_to_driver=False)
    return sum(s.get("tokens_generated", 0) for s in replica_stats(app))


@dataclass
class CapacityResult:
    concurrency: int
    seconds: float
    engine_tokens_per_s: float | None  # what the engines generated in the window
    delivered_tokens: int
    delivered_tokens_per_s: float
    delivered_fraction: float | None  # of the engines' tokens, delivered to clients
    requests_completed: int
    errors: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    cpu_s: dict[str, float]
    cpu_ms_per_token: dict[str, float]
    serve_path_ms_per_token: float | None
    error_examples: list[str]


async def measure(
    url: str,
    model: str,
    concurrency: int,
    prompt_tokens: int,
    output_tokens: int,
    warmup_s: float,
    duration_s: float,
    ray_address: str | None = None,
    app: str = "continuum",
    seed: int = 0,
) -> CapacityResult:
    rng = random.Random(seed)

    def body() -> bytes:
        prompt = [rng.randrange(1000, 30000) for _ in range(prompt_tokens)]
        return (
            b'{"model":"%s","prompt":%s,"max_tokens":%d,"ignore_eos":true,"stream":true,'
            b'"stream_options":{"include_usage":true,"continuous_usage_stats":true}}'
            % (model.encode(), str(prompt).replace(" ", "").encode(), output_tokens)
        )

    tally, stop = Tally(), asyncio.Event()
    tasks = [asyncio.ensure_future(slot(url, body, tally, stop)) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    roles = process_roles()
    roles[os.getpid()] = "client"
    engine_before = engines_generated(ray_address, app)
    cpu_before, tokens_before, done_before = cpu_seconds(roles), tally.tokens, tally.completed
    ttfts_before, start = len(tally.ttfts), time.perf_counter()
    await asyncio.sleep(duration_s)
    elapsed = time.perf_counter() - start
    cpu_after, tokens = cpu_seconds(roles), tally.tokens - tokens_before
    engine_after = engines_generated(ray_address, app)
    engine_rate = None
    if engine_before is not None and engine_after is not None:
        engine_rate = round((engine_after - engine_before) / elapsed, 1)
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    cpu = {role: round(cpu_after[role] - cpu_before[role], 2) for role in cpu_after}
    per_token = {role: round(1000 * s / tokens, 4) if tokens else 0.0 for role, s in cpu.items()}
    ttfts = sorted(tally.ttfts[ttfts_before:])

    def percentile(q: float) -> float | None:
        return round(1000 * ttfts[int(q * (len(ttfts) - 1))], 1) if ttfts else None

    return CapacityResult(
        concurrency=concurrency,
        seconds=round(elapsed, 2),
        engine_tokens_per_s=engine_rate,
        delivered_tokens=tokens,
        delivered_tokens_per_s=round(tokens / elapsed, 1),
        delivered_fraction=round(tokens / elapsed / engine_rate, 3) if engine_rate else None,
        requests_completed=tally.completed - done_before,
        errors=tally.errors,
        ttft_p50_ms=percentile(0.5),
        ttft_p99_ms=percentile(0.99),
        cpu_s=cpu,
        cpu_ms_per_token=per_token,
        serve_path_ms_per_token=(
            round(sum(per_token[r] for r in SERVE_PATH), 4) if tokens else None
        ),
        error_examples=tally.error_examples,
    )


def run_capacity(
    url: str,
    model: str,
    concurrencies: list[int],
    prompt_tokens: int,
    output_tokens: int,
    warmup_s: float,
    duration_s: float,
    ray_address: str | None = None,
) -> list[dict]:
    return [
        asdict(
            asyncio.run(
                measure(
                    url, model, c, prompt_tokens, output_tokens, warmup_s, duration_s, ray_address
                )
            )
        )
        for c in concurrencies
    ]
