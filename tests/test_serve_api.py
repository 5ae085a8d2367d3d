"""End to end through Ray Serve: two replicas of the tiny model behind the OpenAI API."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import ray
from conftest import deploy, scrape, wait_for
from openai import AsyncOpenAI, BadRequestError, OpenAI
from transformers import AutoTokenizer

from cluster.status import replica_stats
from replicas import LLM, SamplingParams

APP = "tiny"
ENGINE = {
    "dtype": "float32",
    "device": "cpu",
    "num_threads": 1,
    "num_blocks": 256,
    "block_size": 8,
    "max_num_batched_tokens": 64,
    "max_model_len": 1024,
}
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def base_url(serve_instance, tiny_dir):
    args = {
        "served_model_name": "tiny",
        "engine": {"model": str(tiny_dir), **ENGINE},
        "replicas": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}},
        "router": {"stats_period_s": 0.2},
    }
    return deploy(serve_instance, APP, args)


@pytest.fixture(scope="module")
def client(base_url):
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def all_blocks_free() -> bool:
    stats = replica_stats(APP)
    return len(stats) == 2 and all(
        s.get("free_blocks") == s.get("total_blocks") and s.get("num_running") == 0 for s in stats
    )


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}


def test_chat_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


def test_completions_streaming_equals_non_streaming(client):
    full = client.completions.create(model="tiny", prompt="The sea is", max_tokens=10, **GREEDY)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="The sea is", max_tokens=10, stream=True, **GREEDY
        )
    )
    assert streamed == full.choices[0].text and full.usage.completion_tokens == 10


def test_http_greedy_equals_offline_engine(client, tiny_dir):
    prompts = ["Once upon a time", "The weather today", "In a galaxy far away", "Hello"]
    lengths = [5, 17, 9, 30]
    llm = LLM(str(tiny_dir), **{k: v for k, v in ENGINE.items() if k != "num_threads"})
    offline = llm.generate(
        prompts,
        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths],
        use_tqdm=False,
    )
    for prompt, n, expected in zip(prompts, lengths, offline, strict=True):
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, **GREEDY)
        assert got.choices[0].text == expected.text, f"HTTP differs from offline for {prompt!r}"


def test_concurrent_requests_complete_with_correct_usage(base_url, tokenizer):
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

    async def chat(i: int):
        messages = [{"role": "user", "content": f"Question number {i}: " + "why? " * i}]
        expected_prompt = len(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        max_tokens = 4 + i
        if i % 2:
            stream = await client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
            usage = [c async for c in stream][-1].usage
        else:
            usage = (
                await client.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=max_tokens, **GREEDY
                )
            ).usage
        return usage, expected_prompt, max_tokens

    async def completion(i: int):
        prompt = f"Story {i}: " + "and then " * i
        response = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=3 + i, **GREEDY
        )
        return response.usage, len(tokenizer.encode(prompt)), 3 + i

    async def run_all():
        return await asyncio.gather(
            *[chat(i) for i in range(12)], *[completion(i) for i in range(12)]
        )

    for usage, prompt_tokens, completion_tokens in asyncio.run(run_all()):
        assert usage.prompt_tokens == prompt_tokens
        assert usage.completion_tokens == completion_tokens
        assert usage.total_tokens == prompt_tokens + completion_tokens
    wait_for(all_blocks_free, timeout=30)


def test_n_choices_and_batched_prompts(client):
    response = client.completions.create(
        model="tiny",
        prompt=["a b c", "d e f"],
        n=2,
        max_tokens=5,
        temperature=1.0,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 20
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=4, **GREEDY
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 1, "greedy choices must agree"
    assert chat.usage.completion_tokens == 12


def test_client_disconnect_mid_stream_frees_blocks(base_url, serve_instance):
    """Disconnects abort the requests (counted as finished by "abort"), and blocks come back."""
    body = {
        "model": "tiny",
        "prompt": "word " * 200,
        "max_tokens": 800,
        "ignore_eos": True,
        "stream": True,
    }

    def aborted() -> float:
        return scrape(
            serve_instance.metrics_url,
            "ray_continuum_requests_finished_total",
            APP,
            finish_reason="abort",
        )

    before = aborted()
    for _ in range(3):
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(5):
                next(lines)
        # the connection is closed here, mid-stream
    wait_for(all_blocks_free, timeout=30)
    wait_for(lambda: aborted() == before + 3, timeout=30)


def test_metrics_exported_through_ray_match_responses(client, serve_instance):
    metrics_url = serve_instance.metrics_url

    def read() -> dict[str, float]:
        names = {
            "tokens": "ray_continuum_generation_tokens_total",
            "length": "ray_continuum_requests_finished_total",
            "ttft": "ray_continuum_time_to_first_token_seconds_count",
            "routed": "ray_continuum_router_decisions_total",
        }
        values = {k: scrape(metrics_url, n, APP) for k, n in names.items()}
        values["length"] = scrape(metrics_url, names["length"], APP, finish_reason="length")
        return values

    wait_for(lambda: read()["tokens"] > 0, timeout=30)
    before = read()
    returned = 0
    for i in range(5):
        response = client.completions.create(
            model="tiny", prompt=f"count {i}", max_tokens=4 + i, **GREEDY
        )
        returned += response.usage.completion_tokens
    expected = {"tokens": returned, "length": 5, "ttft": 5, "routed": 5}
    wait_for(lambda: {k: read()[k] - before[k] for k in expected} == expected, timeout=30)
    wait_for(lambda: scrape(metrics_url, "ray_continuum_kv_blocks_used", APP) == 0, timeout=30)
    assert scrape(metrics_url, "ray_continuum_kv_blocks_total", APP) == 2 * ENGINE["num_blocks"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("chat/completions", {"model": "tiny"}, "messages"),
        ("chat/completions", {"model": "tiny", "messages": []}, "messages"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            "max_tokens",
        ),
        ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "unknown_field": 1},
            "unknown_field",
        ),
        (
            "chat/completions",
            {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
            "model",
        ),
        ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("completions", {"prompt": []}, "prompt"),
        ("completions", {"prompt": "x", "best_of": 3}, None),
        ("completions", {"prompt": [999999999]}, None),
    ],
)
def test_invalid_requests_get_openai_errors(base_url, path, body, param):
    response = httpx.post(f"{base_url}/v1/{path}", json=body, timeout=30)
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param:
        assert param in (error["param"] or "") or param in error["message"]


def test_prompt_longer_than_context_is_400_and_server_keeps_serving(client):
    with pytest.raises(BadRequestError, match=r"prompt has \d+ tokens.*at most 1023") as error:
        client.completions.create(model="tiny", prompt="word " * 1100, max_tokens=5)
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(BadRequestError, match="messages"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x " * 2000}], max_tokens=5
        )
    with pytest.raises(BadRequestError, match=r"maximum context length is 1024.*at most \d+"):
        client.completions.create(model="tiny", prompt="word " * 500, max_tokens=800)
    ok = client.completions.create(model="tiny", prompt="still there?", max_tokens=3, **GREEDY)
    assert ok.usage.completion_tokens == 3
    wait_for(all_blocks_free, timeout=30)


def test_malformed_json_is_400_saying_where(base_url):
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_fields_common_clients_send_are_accepted(client):
    """`user`, `store`, `metadata`, `service_tier` change nothing here and are accepted;
    `name` and `reasoning_effort` reach the chat template."""
    response = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi", "name": "ada"}],
        max_tokens=2,
        user="u-1",
        store=False,
        metadata={"team": "a"},
        service_tier="auto",
        reasoning_effort="low",
        **GREEDY,
    )
    assert response.usage.completion_tokens == 2


def test_images_are_refused_saying_what_to_change(base_url):
    parts = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {}}]
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2},
    )
    assert response.status_code == 400
    assert "image_url" in response.json()["error"]["message"]


def test_duplicate_request_ids_neither_hang_nor_disturb_each_other(base_url):
    """X-Request-ID names responses and logs only: two requests sending the same one both run
    to their end at once (not until a deadline), with their own tokens."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"prompt": "same id", "max_tokens": 20, "ignore_eos": True, "temperature": 0}
            headers = {"X-Request-ID": "dup-1"}
            return await asyncio.gather(
                *(
                    http.post(f"{base_url}/v1/completions", json=body, headers=headers)
                    for _ in range(3)
                )
            )

    responses = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == 20 for r in responses)
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1
    assert all(r.json()["id"] == "cmpl-dup-1" for r in responses)


def test_request_id_header_and_structured_logs(base_url):
    """The client's X-Request-ID comes back, names the response, and tags the replica's JSON log
    line for the request, which holds sizes and timings but never the prompt."""
    import glob
    import json

    secret = "a prompt that must not reach the logs"
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": secret}],
            "max_tokens": 3,
            "ignore_eos": True,
        },
        headers={"X-Request-ID": "req-logs-1"},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-logs-1"
    assert response.json()["id"] == "chatcmpl-req-logs-1"
    generated = httpx.post(f"{base_url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert generated.headers["x-request-id"], "Serve generates a request id when none is sent"

    def log_records() -> list[dict]:
        records = []
        for path in glob.glob(f"/tmp/ray/session_latest/logs/serve/replica_{APP}_LLMServer_*.log"):
            with open(path) as log:
                records += [json.loads(line) for line in log if "req-logs-1" in line]
        return records

    wait_for(lambda: any("completion_tokens=3" in r["message"] for r in log_records()), timeout=30)
    for record in log_records():
        assert record["request_id"] == "req-logs-1" and record["replica"]
        assert secret not in json.dumps(record)


def test_never_routes_to_a_dead_replica(client):
    """Kill one replica: every request after the kill is served by the live one, and Serve
    brings the replica count back."""
    victim = replica_stats(APP)[0]["replica"]
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#LLMServer#{victim}", namespace="serve")
    ray.kill(actor, no_restart=True)
    for i in range(20):
        response = client.completions.create(
            model="tiny", prompt=f"after the kill {i}", max_tokens=3, **GREEDY
        )
        assert response.usage.completion_tokens == 3
    wait_for(lambda: len([s for s in replica_stats(APP) if "error" not in s]) == 2, timeout=120)
    assert victim not in {s["replica"] for s in replica_stats(APP)}


def test_bench_client_against_the_server(base_url, tokenizer):
    from cluster.bench_client import run_benchmark, summarize
    from cluster.workloads import make_workload

    workload = make_workload(tokenizer, "random", 8, (40, 120), (4, 12), seed=0)
    results, wall = asyncio.run(run_benchmark(base_url, "tiny", workload, 4, None, seed=0))
    summary = summarize(results, wall)
    assert summary["errors"] == 0, summary["error_examples"]
    assert summary["output_tokens"] == sum(r.max_tokens for r in workload)
    assert summary["ttft"]["p50_ms"] > 0 and summary["itl"]["p50_ms"] > 0
