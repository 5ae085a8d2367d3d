"""Engine metrics: each defined once, recorded through one small interface, exported two ways.

In a Serve replica they go through Ray's metrics pipeline (`ray.serve.metrics`), which adds the
`deployment`, `replica` and `application` tags and exports them as `ray_continuum_*` on each
node's Prometheus port and in the Ray dashboard. Offline (the `LLM` API, benchmarks, tests) they
go to a `prometheus_client` registry. Either way the engine calls `EngineMetrics`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol

from scheduler.routing import REASONS as ROUTING_REASONS

Kind = Literal["counter", "gauge", "histogram"]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 240, 480)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # Label values known in advance: a counter exists at 0 for each from the start.
    label_values: tuple[tuple[str, ...], ...] = ()


FINISH_REASONS = ("stop", "length", "abort", "error")

METRIC_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "continuum_time_to_first_token_seconds",
        "histogram",
        "Arrival to first token.",
        buckets=TTFT_BUCKETS,
    ),
    MetricSpec(
        "continuum_inter_token_latency_seconds",
        "histogram",
        "Between consecutive tokens of a sequence.",
        buckets=ITL_BUCKETS,
    ),
    MetricSpec(
        "continuum_e2e_request_latency_seconds",
        "histogram",
        "Arrival to finish.",
        buckets=E2E_BUCKETS,
    ),
    MetricSpec(
        "continuum_queue_wait_seconds",
        "histogram",
        "Arrival to first scheduled step.",
        buckets=TTFT_BUCKETS,
    ),
    MetricSpec("continuum_prompt_tokens", "counter", "Prompt tokens of admitted requests."),
    MetricSpec("continuum_generation_tokens", "counter", "Tokens sampled."),
    MetricSpec(
        "continuum_requests_finished",
        "counter",
        "Finished generations, by reason.",
        ("finish_reason",),
        label_values=tuple((reason,) for reason in FINISH_REASONS),
    ),
    MetricSpec("continuum_preemptions", "counter", "Sequences preempted to free KV blocks."),
    MetricSpec(
        "continuum_prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."
    ),
    MetricSpec(
        "continuum_prefix_cache_queries",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
    ),
    MetricSpec("continuum_running_sequences", "gauge", "Sequences in the running batch."),
    MetricSpec("continuum_waiting_sequences", "gauge", "Sequences waiting to be scheduled."),
    MetricSpec(
        "continuum_kv_blocks_used", "gauge", "KV-cache blocks held (owned or not yet freeable)."
    ),
    MetricSpec("continuum_kv_blocks_total", "gauge", "KV-cache blocks in the cache."),
    MetricSpec("continuum_step_tokens", "gauge", "Tokens fed to the model in the last step."),
    MetricSpec(
        "continuum_router_requests",
        "counter",
        "Requests the router sent to each replica.",
        ("target_replica",),
    ),
    MetricSpec(
        "continuum_router_decisions",
        "counter",
        "Routing decisions by reason: prefix_hit, load, fallback (no room anywhere), session.",
        ("reason",),
        label_values=tuple((reason,) for reason in ROUTING_REASONS),
    ),
    MetricSpec(
        "continuum_router_prefix_blocks_matched",
        "histogram",
        "Leading prompt blocks the chosen replica holds, per the router's prefix index "
        "(le=0.5 counts requests with no block cached: Ray's boundaries must be positive).",
        buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    ),
    MetricSpec(
        "continuum_router_decision_seconds",
        "histogram",
        "Time the routing policy took to choose a replica (prefix match and cost), per request.",
        buckets=(2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2),
    ),
    MetricSpec(
        "continuum_router_index_entries",
        "gauge",
        "(block, replica) entries in the router's prefix index.",
    ),
    MetricSpec(
        "continuum_router_index_bytes",
        "gauge",
        "Approximate memory of the router's prefix index.",
    ),
)


def index_by_name(specs: tuple[MetricSpec, ...]) -> dict[str, MetricSpec]:
    """Specs by name; two specs of one name would be one metric recorded two ways."""
    index: dict[str, MetricSpec] = {}
    for spec in specs:
        if spec.name in index:
            raise ValueError(f"metric {spec.name} is defined twice")
        index[spec.name] = spec
    return index


METRICS = index_by_name(METRIC_SPECS)


class MetricsSink(Protocol):
    """Where values go: `record` adds to a counter, sets a gauge, or observes a histogram."""

    def record(self, name: str, value: float, labels: dict[str, str] | None = None) -> None: ...


class PrometheusSink:
    """prometheus_client metrics in their own registry (so engines in one process don't clash)."""

    def __init__(self, registry=None) -> None:
        import prometheus_client as prom

        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self._metrics = {}
        for spec in METRICS.values():
            kwargs = {"registry": self.registry, "labelnames": spec.labels}
            if spec.kind == "counter":
                metric = prom.Counter(spec.name, spec.description, **kwargs)
            elif spec.kind == "gauge":
                metric = prom.Gauge(spec.name, spec.description, **kwargs)
            else:
                metric = prom.Histogram(spec.name, spec.description, buckets=spec.buckets, **kwargs)
            for values in spec.label_values:  # known label values exist at 0 from the start
                metric.labels(*values)
            self._metrics[spec.name] = (spec.kind, metric)

    def record(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        kind, metric = self._metrics[name]
        if labels:
            metric = metric.labels(**labels)
        if kind == "counter":
            metric.inc(value)
        elif kind == "gauge":
            metric.set(value)
        else:
            metric.observe(value)

    def value(self, sample: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value: a metric's name, or a sample name like `..._count`."""
        spec = METRICS.get(sample)
        if spec is not None and spec.kind == "counter":
            sample += "_total"
        return self.registry.get_sample_value(sample, labels or {})


class RaySink:
    """Ray Serve metrics: tagged with deployment, replica and application when in a replica.

    Ray drops a gauge series that is not set again within two report intervals, so the last
    value of each gauge is kept for `refresh_gauges` to set again while the engine is idle.
    """

    def __init__(self, names: list[str] | None = None) -> None:
        from ray.serve import metrics as serve_metrics

        self._gauge_values: dict[tuple[str, tuple], tuple[float, dict[str, str] | None]] = {}
        self._metrics = {}
        for name in names or list(METRICS):
            spec = METRICS[name]
            if spec.kind == "counter":
                metric = serve_metrics.Counter(name, spec.description, tag_keys=spec.labels)
            elif spec.kind == "gauge":
                metric = serve_metrics.Gauge(name, spec.description, tag_keys=spec.labels)
            else:
                metric = serve_metrics.Histogram(
                    name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels
                )
            self._metrics[name] = (spec.kind, metric)
        self._start_counters_at_zero()

    def _start_counters_at_zero(self) -> None:
        """Ray exports a counter only once it is incremented and refuses increments of 0, so a
        rate or alert over it sees nothing until the first event: record a 0 for each known
        label value, through Ray's own recording path, so every counter exists from the start."""
        from ray.serve.metrics import _add_serve_context_tag_values

        for name, (kind, metric) in self._metrics.items():
            spec = METRICS[name]
            if kind != "counter" or (spec.labels and not spec.label_values):
                continue
            for values in spec.label_values or ((),):
                tags = dict(zip(spec.labels, values, strict=True))
                _add_serve_context_tag_values(metric._tag_keys, tags)
                metric._record(0, tags)

    def record(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        kind, metric = self._metrics[name]
        if kind == "counter":
            if value > 0:  # Ray refuses zero increments
                metric.inc(value, tags=labels)
        elif kind == "gauge":
            metric.set(value, tags=labels)
            self._gauge_values[(name, tuple(sorted((labels or {}).items())))] = (value, labels)
        else:
            metric.observe(value, tags=labels)

    def refresh_gauges(self) -> None:
        for (name, _), (value, labels) in list(self._gauge_values.items()):
            self._metrics[name][1].set(value, tags=labels)


class RecordingSink:
    """Keeps records to replay into another sink (the engine process ships them per step)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, dict[str, str] | None]] = []

    def record(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.records.append((name, value, labels))

    def drain(self) -> list[tuple[str, float, dict[str, str] | None]]:
        records, self.records = self.records, []
        return records


class EngineMetrics:
    """What the engine reports, in its own terms; turns scheduler counters into deltas."""

    def __init__(self, sink: MetricsSink) -> None:
        self.sink = sink
        self._preemptions = 0
        self._prefix_hits = 0
        self._prefix_queries = 0

    def request_admitted(self, prompt_tokens: int) -> None:
        self.sink.record("continuum_prompt_tokens", prompt_tokens)

    def first_scheduled(self, arrival_time: float, now: float) -> None:
        self.sink.record("continuum_queue_wait_seconds", now - arrival_time)

    def tokens_sampled(self, count: int) -> None:
        self.sink.record("continuum_generation_tokens", count)

    def first_token(self, arrival_time: float, now: float) -> None:
        self.sink.record("continuum_time_to_first_token_seconds", now - arrival_time)

    def next_token(self, since_last: float) -> None:
        self.sink.record("continuum_inter_token_latency_seconds", since_last)

    def finished(self, reason: str, arrival_time: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.sink.record("continuum_requests_finished", 1, {"finish_reason": reason})
        self.sink.record("continuum_e2e_request_latency_seconds", now - arrival_time)

    def step(self, step_tokens: int, scheduler, block_manager) -> None:
        """After a step: its size, the gauges, and the scheduler's running totals as deltas."""
        self.sink.record("continuum_step_tokens", step_tokens)
        self.gauges(scheduler, block_manager)

    def gauges(self, scheduler, block_manager) -> None:
        sink = self.sink
        sink.record("continuum_running_sequences", scheduler.num_running)
        sink.record("continuum_waiting_sequences", scheduler.num_waiting)
        sink.record("continuum_kv_blocks_used", block_manager.num_used_blocks)
        sink.record("continuum_kv_blocks_total", block_manager.num_blocks)
        for name, attr, total in (
            ("continuum_preemptions", "_preemptions", scheduler.num_preemptions),
            ("continuum_prefix_cache_hits", "_prefix_hits", block_manager.prefix_cache_hits),
            (
                "continuum_prefix_cache_queries",
                "_prefix_queries",
                block_manager.prefix_cache_queries,
            ),
        ):
            if delta := total - getattr(self, attr):
                sink.record(name, delta)
                setattr(self, attr, total)
