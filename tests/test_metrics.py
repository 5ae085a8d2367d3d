"""Engine metrics outside Ray: one definition, recorded into a prometheus_client registry."""

from __future__ import annotations

import re

import pytest

from cluster.k8s import DASHBOARD
from replicas import LLM, SamplingParams
from replicas.metrics import METRIC_SPECS, METRICS, MetricSpec, PrometheusSink, index_by_name


@pytest.fixture(scope="module")
def engine_run(tiny_dir):
    llm = LLM(
        str(tiny_dir), dtype="float32", block_size=4, num_blocks=40, max_num_batched_tokens=16
    )
    prompts = [[5 + i] * (10 + 7 * i) for i in range(6)]
    outputs = llm.generate(
        prompts,
        [SamplingParams(temperature=0, max_tokens=8 + i, ignore_eos=True) for i in range(6)],
        use_tqdm=False,
    )
    llm.engine.add_request("aborted", [9] * 12, SamplingParams(max_tokens=50, ignore_eos=True))
    llm.engine.step()
    llm.engine.abort_request("aborted")
    return llm.engine, prompts, outputs


def test_counters_match_what_the_engine_returned(engine_run):
    engine, prompts, outputs = engine_run
    sink: PrometheusSink = engine.metrics.sink
    generated = sum(len(o.token_ids) for o in outputs)
    # The aborted request sampled its first token in the one step it ran.
    assert sink.value("continuum_generation_tokens") == generated + 1
    assert sink.value("continuum_prompt_tokens") == sum(map(len, prompts)) + 12
    assert sink.value("continuum_requests_finished", {"finish_reason": "length"}) == 6
    assert sink.value("continuum_requests_finished", {"finish_reason": "abort"}) == 1
    assert sink.value("continuum_time_to_first_token_seconds_count") == 7
    assert sink.value("continuum_e2e_request_latency_seconds_count") == 7
    assert sink.value("continuum_queue_wait_seconds_count") == 7
    # One inter-token latency per token after each request's first.
    assert sink.value("continuum_inter_token_latency_seconds_count") == generated - 6
    assert sink.value("continuum_preemptions") == engine.scheduler.num_preemptions > 0
    assert sink.value("continuum_prefix_cache_queries") == engine.block_manager.prefix_cache_queries


def test_gauges_settle_when_idle(engine_run):
    engine, _, _ = engine_run
    sink: PrometheusSink = engine.metrics.sink
    assert sink.value("continuum_running_sequences") == 0
    assert sink.value("continuum_waiting_sequences") == 0
    assert sink.value("continuum_kv_blocks_used") == 0
    assert sink.value("continuum_kv_blocks_total") == 40
    assert 0 < sink.value("continuum_step_tokens") <= 16


def test_metric_names_are_prefixed_and_unique():
    names = [spec.name for spec in METRIC_SPECS]
    assert len(names) == len(set(names)), f"a metric is defined twice: {names}"
    assert all(name.startswith("continuum_") for name in names)
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in names)
    twice = (MetricSpec("continuum_x", "counter", "x"), MetricSpec("continuum_x", "gauge", "y"))
    with pytest.raises(ValueError, match="defined twice"):
        index_by_name(twice)


def test_every_metric_is_one_ray_accepts():
    """Ray validates a metric when a replica creates it (histogram boundaries must be positive):
    a spec it refuses fails the whole deployment, so check each one here."""
    from ray.util import metrics as ray_metrics

    for spec in METRIC_SPECS:
        try:
            if spec.kind == "histogram":
                ray_metrics.Histogram(spec.name, spec.description, list(spec.buckets), spec.labels)
            elif spec.kind == "gauge":
                ray_metrics.Gauge(spec.name, spec.description, spec.labels)
            else:
                ray_metrics.Counter(spec.name, spec.description, spec.labels)
        except ValueError as error:
            pytest.fail(f"Ray refuses metric {spec.name}: {error}")


def test_every_counter_exists_at_zero_before_anything_happens():
    sink = PrometheusSink()
    assert sink.value("continuum_preemptions") == 0
    for reason in ("stop", "length", "abort", "error"):
        assert sink.value("continuum_requests_finished", {"finish_reason": reason}) == 0


def test_grafana_dashboard_uses_only_exported_metrics():
    """Every PromQL expression in the dashboard names metrics that Ray exports for us."""
    import json

    exported = set()
    for spec in METRICS.values():
        base = "ray_" + spec.name
        exported |= {
            "counter": {base + "_total"},
            "gauge": {base},
            "histogram": {base + "_bucket", base + "_sum", base + "_count"},
        }[spec.kind]
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert len(expressions) >= 8
    for expr in expressions:
        names = set(re.findall(r"\b(ray_continuum_[a-z0-9_]+)", expr))
        assert names, f"expression uses no continuum metric: {expr}"
        assert names <= exported, f"unknown metrics {names - exported} in {expr}"
    used = {n for e in expressions for n in re.findall(r"\b(ray_continuum_[a-z0-9_]+)", e)}
    for required in (
        "time_to_first_token",
        "inter_token_latency",
        "kv_blocks_used",
        "preemptions",
        "prefix_cache_hits",
        "generation_tokens",
        "waiting_sequences",
    ):
        assert any(required in name for name in used), f"the dashboard has no panel for {required}"
