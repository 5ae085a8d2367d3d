"""Load, faults and bad input through Ray Serve: every request gets an answer, no block is lost.

Two applications of the tiny model: `guarded` (one replica, an API key and small limits) and
`soak` (two replicas, default limits).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import httpx
import pytest
import ray
from conftest import TEST_API_KEY, deploy, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.status import replica_stats

ENGINE = {
    "dtype": "float32",
    "device": "cpu",
    "num_threads": 1,
    "num_blocks": 128,
    "block_size": 8,
    "max_num_batched_tokens": 64,
    "max_model_len": 512,
}
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
LIMITS = {"max_prompt_tokens": 200, "max_tokens": 64, "max_body_bytes": 65536}


@pytest.fixture(scope="module")
def guarded(serve_instance, tiny_dir) -> str:
    args = {
        "served_model_name": "tiny",
        "engine": {
            "model": str(tiny_dir),
            **ENGINE,
            "max_num_seqs": 4,
            "max_waiting_seqs": 2,
            "max_queued_prompt_tokens": 400,
        },
        "replicas": {
            "num_replicas": 1,
            "max_ongoing_requests": 8,
            "max_queued_requests": 8,
            "ray_actor_options": {"num_cpus": 1},
        },
        "limits": LIMITS,
        "api_key_env": "CONTINUUM_TEST_API_KEY",
    }
    return deploy(serve_instance, "guarded", args)


@pytest.fixture(scope="module")
def soak(serve_instance, tiny_dir) -> str:
    args = {
        "served_model_name": "tiny",
        "engine": {"model": str(tiny_dir), **ENGINE},
        "replicas": {
            "num_replicas": 2,
            "ray_actor_options": {"num_cpus": 1},
            "health_check_period_s": 1,
        },
        "router": {"stats_period_s": 0.2},
    }
    return deploy(serve_instance, "soak", args)


def idle_replicas(app: str, count: int) -> bool:
    """Every replica of `app` is up, with all its blocks free and no sequence left."""
    stats = replica_stats(app)
    return len(stats) == count and all(
        s.get("free_blocks") == s.get("total_blocks")
        and s.get("num_running") == 0
        and s.get("num_waiting") == 0
        for s in stats
    )


def assert_openai_error(response: httpx.Response, status: int | tuple[int, ...]) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, f"{response.status_code}: {response.text[:300]}"
    error = response.json()["error"]
    assert error["message"] and error["type"], f"not an OpenAI error body: {response.text}"
    return error


def assert_serves(base: str, count: int = 10) -> None:
    """`count` requests in a row all succeed."""
    for i in range(count):
        response = httpx.post(
            f"{base}/v1/completions",
            json={"model": "tiny", "prompt": f"request {i}", "max_tokens": 3},
            timeout=60,
        )
        assert response.status_code == 200, response.text


def chat(content: str = "hi", **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}


# --- authentication -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": TEST_API_KEY}],
    ids=["missing", "wrong", "no-scheme"],
)
def test_requests_without_the_right_key_are_401(guarded, headers):
    for method, path, body in [
        ("POST", "/v1/chat/completions", chat(max_tokens=2)),
        ("GET", "/v1/models", None),
        ("GET", "/docs", None),
    ]:
        response = httpx.request(method, f"{guarded}{path}", json=body, headers=headers)
        error = assert_openai_error(response, 401)
        assert error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_right_key_is_200_and_health_needs_none(guarded):
    response = httpx.post(
        f"{guarded}/v1/chat/completions", json=chat(max_tokens=2), headers=AUTH, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{guarded}/health").status_code == 200


# --- input limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param",
    [
        (chat("word " * 300, max_tokens=2), 400, "messages"),  # over max_prompt_tokens
        (chat(max_tokens=65), 400, "max_tokens"),  # over the cap
        (chat(stop=["x"] * 17), 400, "stop"),
        (chat(stop=["x" * 513]), 400, "stop"),
        (chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
        (chat(seed=2**70), 400, "seed"),
        (chat("\ud800"), 400, None),  # a lone surrogate: not valid Unicode
        (chat(max_tokens="three"), 400, "max_tokens"),
        (chat("x" * 70_000), 413, None),  # over max_body_bytes
        ({"model": "tiny", "prompt": ["a"] * 65}, 400, "prompt"),
    ],
    ids=[
        "prompt",
        "max-tokens",
        "stop-count",
        "stop-length",
        "logprobs",
        "seed",
        "surrogate",
        "wrong-type",
        "body-size",
        "prompts",
    ],
)
def test_input_limits_are_4xx_with_an_openai_error(guarded, body, status, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    headers = {**AUTH, "content-type": "application/json"}
    response = httpx.post(f"{guarded}{path}", content=json.dumps(body), headers=headers, timeout=30)
    error = assert_openai_error(response, status)
    if param:
        assert param in (error["param"] or error["message"]), error


@pytest.mark.parametrize(
    "raw",
    [b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', b"\x80", b"[1]"],
    ids=["invalid-utf8-string", "invalid-utf8", "not-an-object"],
)
def test_unparsable_bodies_are_400(guarded, raw):
    response = httpx.post(
        f"{guarded}/v1/chat/completions",
        content=raw,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_openai_error(response, 400)


def test_the_cap_is_the_default_max_tokens(guarded):
    body = chat(ignore_eos=True, temperature=0)
    response = httpx.post(f"{guarded}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.json()["usage"]["completion_tokens"] == LIMITS["max_tokens"]


# --- deadlines ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_an_expired_request_is_aborted_and_gets_408(guarded, stream):
    body = {"model": "tiny", "prompt": "word " * 100, "max_tokens": 64, "ignore_eos": True}
    headers = {**AUTH, "X-Request-Timeout": "0.05"}
    response = httpx.post(
        f"{guarded}/v1/completions", json={**body, "stream": stream}, headers=headers, timeout=60
    )
    if not stream or response.status_code == 408:  # expired before or after the first token
        assert_openai_error(response, 408)
    else:
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
    wait_for(lambda: idle_replicas("guarded", 1), timeout=30)
    bad = httpx.post(
        f"{guarded}/v1/completions", json=body, headers={**AUTH, "X-Request-Timeout": "soon"}
    )
    assert_openai_error(bad, 400)


# --- overload -------------------------------------------------------------------------------


def test_overload_answers_429_or_503_and_loses_nothing(guarded):
    """64 requests at once against 8 in flight, 2 waiting in the engine and 8 queued at the
    ingress: the excess is refused at once with Retry-After, the rest complete."""

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body = chat(f"overload {i}", max_tokens=24, ignore_eos=True)
        return await client.post(f"{guarded}/v1/chat/completions", json=body)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(headers=AUTH, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert len(responses) == 64 and set(statuses) <= {200, 429, 503}, statuses
    done = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(done) >= 4, f"only {len(done)} requests completed: {statuses}"
    assert refused, "nothing was refused: the limits did not apply"
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in done)
    for r in refused:
        assert_openai_error(r, (429, 503))
        assert r.headers["retry-after"] == "1"
    wait_for(lambda: idle_replicas("guarded", 1), timeout=30)


# --- fuzz -----------------------------------------------------------------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | junk},
        optional={"content": st.text(max_size=40) | junk, "name": junk},
    ),
    max_size=3,
)
shared_fields = {
    "model": st.just("tiny") | junk,
    "max_tokens": st.integers(-2, 12) | junk,
    "temperature": st.floats(-1, 3) | junk,
    "top_p": st.floats(-0.5, 1.5) | junk,
    "top_k": st.integers(-2, 60_000) | junk,
    "min_p": st.floats(-1, 2) | junk,
    "seed": st.integers(-(2**65), 2**65) | junk,
    "stop": st.lists(st.text(max_size=4), max_size=3) | junk,
    "n": st.integers(0, 3) | junk,
    "stream": st.booleans() | junk,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | junk,
    "presence_penalty": st.floats(-3, 3) | junk,
    "repetition_penalty": st.floats(-1, 11) | junk,
    "logit_bias": st.dictionaries(st.integers(-5, 60_000).map(str), st.floats(-200, 200)) | junk,
    "stop_token_ids": st.lists(st.integers(-5, 60_000), max_size=3) | junk,
    "ignore_eos": st.booleans() | junk,
    "min_tokens": st.integers(-1, 20) | junk,
    "unknown_field": junk,
}
chat_bodies = st.fixed_dictionaries(
    {"messages": messages | junk},
    optional={**shared_fields, "logprobs": st.booleans() | junk, "top_logprobs": junk},
)
completion_bodies = st.fixed_dictionaries(
    {
        "prompt": st.text(max_size=40)
        | st.lists(st.integers(-5, 60_000), max_size=8)
        | st.lists(st.text(max_size=10), max_size=3)
        | junk
    },
    optional={**shared_fields, "logprobs": st.integers(-1, 25) | junk, "echo": junk},
)


def check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        assert_openai_error(response, response.status_code)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        assert '"error"' not in response.text, response.text[-500:]
    else:
        assert response.json()["choices"], response.text


def test_fuzzed_bodies_get_2xx_or_4xx_never_5xx_nor_hang_nor_leave_anything(guarded):
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        path_and_body=st.one_of(
            st.tuples(st.just("/v1/chat/completions"), chat_bodies),
            st.tuples(st.just("/v1/completions"), completion_bodies),
        )
    )
    def fuzz(path_and_body):
        path, body = path_and_body
        content = json.dumps(body, allow_nan=True)  # NaN and Infinity too: Python's JSON reads them
        response = httpx.post(
            f"{guarded}{path}",
            content=content,
            headers={**AUTH, "content-type": "application/json"},
            timeout=60,
        )
        check_answer(response)

    fuzz()
    wait_for(lambda: idle_replicas("guarded", 1), timeout=30)


# --- soak and replica death -----------------------------------------------------------------


def test_soak_with_cancellations_leaves_every_block_free(soak):
    """1,000 short requests, 64 at a time; ~20% are cancelled at a random point (before the
    answer, or mid-stream). Every other one completes with the tokens it asked for."""
    rng = random.Random(0)
    plans = [(rng.random() < 0.2, rng.randint(1, 8), rng.random()) for _ in range(1000)]

    async def one(client: httpx.AsyncClient, i: int) -> str:
        cancel, max_tokens, when = plans[i]
        body = {
            "model": "tiny",
            "prompt": f"soak {i} " + "word " * rng.randint(0, 40),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if cancel and when < 0.5:  # give up before or while the request is routed
            try:
                async with asyncio.timeout(when * 0.05):
                    await client.post(f"{soak}/v1/completions", json=body)
                return "completed before the cancel"
            except TimeoutError:
                return "cancelled"
        chunks = 0
        async with client.stream("POST", f"{soak}/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            last = None
            async for line in response.aiter_lines():
                if not line:
                    continue
                if cancel and chunks >= (when - 0.5) * 2 * max_tokens:
                    return "cancelled"  # leaving the block closes the connection mid-stream
                chunks += 1
                last = line
                if line.startswith("data: {"):
                    event = json.loads(line.removeprefix("data: "))
                    assert "error" not in event, event
                    if event.get("usage"):
                        assert event["usage"]["completion_tokens"] == max_tokens, event
            assert last == "data: [DONE]", last
        return "completed"

    async def run() -> list[str]:
        limit = asyncio.Semaphore(64)
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def bounded(i: int) -> str:
                async with limit:
                    return await one(client, i)

            return await asyncio.gather(*(bounded(i) for i in range(len(plans))))

    start = time.monotonic()
    outcomes = asyncio.run(run())
    print(f"soak: 1000 requests in {time.monotonic() - start:.1f}s")
    assert outcomes.count("cancelled") >= 100, f"only {outcomes.count('cancelled')} cancelled"
    assert len(outcomes) == 1000
    wait_for(lambda: idle_replicas("soak", 2), timeout=60)


def engine_processes(app: str) -> dict[int, int]:
    """Engine process id -> its replica actor's process id, for the replicas of `app`."""

    def cmdline(pid: int | str) -> str:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")

    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if "replicas.engine_core" not in cmdline(pid):
                continue
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if f"ServeReplica:{app}:LLMServer" in cmdline(parent):
                found[int(pid)] = parent
        except OSError:  # the process ended while we looked
            continue
    return found


def health(base: str) -> int:
    return httpx.get(f"{base}/health", timeout=10).status_code


def test_a_dead_engine_loses_no_request_and_serve_replaces_its_replica(soak):
    """Right after one engine process dies, every request still succeeds (the router drops
    that replica at the first failure, or at its next report, not at Serve's health check);
    then Serve replaces the replica."""
    engines = engine_processes("soak")
    assert len(engines) == 2, engines
    before = {s["replica"] for s in replica_stats("soak")}
    os.kill(next(iter(engines)), signal.SIGKILL)
    assert_serves(soak, 20)
    assert health(soak) == 200
    # check_health fails from now on; Serve stops the replica and starts another.
    wait_for(lambda: len({s["replica"] for s in replica_stats("soak")} - before) == 1, 120)
    wait_for(lambda: idle_replicas("soak", 2), timeout=120)
    assert_serves(soak)


def test_health_is_503_while_no_engine_can_serve(soak):
    """With every engine dead, /health answers 503 within a report period or two (not after
    Serve's health checks), and 200 again once Serve has replaced the replicas."""
    wait_for(lambda: idle_replicas("soak", 2), timeout=120)
    assert health(soak) == 200
    for pid in engine_processes("soak"):
        os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    wait_for(lambda: health(soak) == 503, timeout=10, interval=0.1)
    print(f"/health said 503 {time.monotonic() - start:.2f}s after the engines died")
    wait_for(lambda: idle_replicas("soak", 2), timeout=180)
    wait_for(lambda: health(soak) == 200, timeout=30)
    assert_serves(soak)


def test_killing_a_replica_under_load_fails_its_requests_then_serves_again(soak):
    """Requests in flight on a killed replica end with a 503 error event; the others finish;
    once Serve has replaced the replica every request succeeds."""
    body = {
        "model": "tiny",
        "prompt": "word " * 50,
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }

    async def stream(client: httpx.AsyncClient, started: asyncio.Event) -> str:
        async with client.stream("POST", f"{soak}/v1/completions", json=body) as response:
            assert response.status_code == 200
            last = None
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    started.set()
                    last = line
            event = json.loads(last.removeprefix("data: "))
            if "error" in event:
                assert event["error"]["type"] == "service_unavailable", event
                return "failed"
            assert event["choices"][0]["finish_reason"] == "length", event
            return "finished"

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            events = [asyncio.Event() for _ in range(8)]
            tasks = [asyncio.create_task(stream(client, e)) for e in events]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout=60)
            # A replica still starting (replaced by an earlier test) answers with an error.
            stats = [s for s in replica_stats("soak") if "error" not in s]
            victim = max(stats, key=lambda s: s["num_running"])["replica"]
            actor = ray.get_actor(f"SERVE_REPLICA::soak#LLMServer#{victim}", namespace="serve")
            ray.kill(actor, no_restart=True)
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(run())
    assert "failed" in outcomes, f"no in-flight request saw the replica die: {outcomes}"
    wait_for(lambda: idle_replicas("soak", 2), timeout=180)
    assert_serves(soak)
