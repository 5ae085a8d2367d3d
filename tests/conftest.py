"""Shared fixtures: a tiny seeded Llama (fast tests) and the embedded SmolLM2 (real-model tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Read by the API-key tests' ingress; Ray's workers inherit the environment of `ray.init`.
TEST_API_KEY = os.environ.setdefault("CONTINUUM_TEST_API_KEY", "test-key-0123456789abcdef")


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2 as a local HF directory (converted from GGUF once, then cached)."""
    from replicas.config import EngineConfig
    from replicas.model_loader import resolve_model_source

    return Path(resolve_model_source(EngineConfig()))


def build_tiny_model(
    path: Path, tokenizer_dir: Path, architecture: str = "llama", **overrides
) -> Path:
    """A 2-layer model with seeded random weights and SmolLM2's tokenizer, saved to `path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=1024,
        # Large init keeps logits far apart, so float32 ties cannot flip a greedy choice.
        initializer_range=0.2,
        # No EOS: model.generate then runs to max_new_tokens, like the engine with ignore_eos.
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    config = AutoConfig.for_model(architecture, **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smol_dir)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServeInstance:
    url: str  # Serve's HTTP proxy
    metrics_url: str  # Ray's Prometheus export of this node


@pytest.fixture(scope="session")
def serve_instance():
    """A local Ray with Serve on free loopback ports, shared by the end-to-end tests.

    Metrics are reported every second (Ray's default is ten) so tests can watch them move.
    """
    import ray
    from ray import serve

    port, metrics_port = free_port(), free_port()
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        namespace="serve",
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield ServeInstance(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    serve.shutdown()
    ray.shutdown()


_DEPLOYED: list[str] = []  # applications the current test module started


@pytest.fixture(scope="module", autouse=True)
def _delete_applications_after_each_module():
    """Each module's applications go when it ends: the shared Ray has 8 CPUs, and replicas
    left behind would keep the next module's from being scheduled."""
    yield
    if _DEPLOYED:
        from ray import serve

        for name in _DEPLOYED:
            serve.delete(name)
        _DEPLOYED.clear()


def deploy(serve_instance: ServeInstance, name: str, args: dict) -> str:
    """Run `build_app(args)` as application `name` under /name (deleted when the test module
    ends); return its base URL."""
    import httpx
    from ray import serve

    from cluster.app import build_app

    _DEPLOYED.append(name)
    serve.run(
        build_app(args),
        name=name,
        route_prefix=f"/{name}",
        blocking=False,
        logging_config={"encoding": "JSON"},
    )
    base = f"{serve_instance.url}/{name}"
    wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, timeout=300)
    return base


def wait_for(condition, timeout: float = 60, interval: float = 0.2):
    import time

    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception as exc:  # not ready yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_error!r})")


def scrape(metrics_url: str, name: str, application: str, **labels: str) -> float:
    """Sum of a metric's samples for one Serve application (over replicas), from Ray's export."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            wanted = {"application": application, **labels}
            if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted.items()):
                total += sample.value
    return total
