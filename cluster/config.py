"""The application's settings (a Serve config's `args`), validated before any replica starts."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve.config import AutoscalingConfig

from replicas.config import EngineConfig
from replicas.model_source import model_display_name
from scheduler.routing import CostWeights
from scheduler.step_time import StepTimeModel

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class RouterConfig(BaseModel):
    """How the router picks a replica (docs/routing.md)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["cost", "queue_kv"] = Field(
        "cost",
        description="cost: estimated time to first token over the replicas' prefix caches; "
        "queue_kv: queue depth and KV-cache fill only.",
    )
    step_model: str | None = Field(
        None,
        description="A step-time model JSON (configs/step-models/, or `python -m cluster "
        "calibrate` on your hardware): the cost policy's weights derive from it. Default: the "
        "synthetic engine's own model, else CostWeights' defaults. A relative path is looked up "
        "in the working directory, then in the project root.",
    )
    cost: dict[str, float | bool | int] = Field(
        default_factory=dict,
        description="Overrides of the cost policy's settings (scheduler.routing.CostWeights), "
        "e.g. prefill_s_per_token, load_guard_s; applied over what the step model gives.",
    )
    queue_weight: Annotated[float, Field(ge=0)] = 1.0
    kv_cache_weight: Annotated[float, Field(ge=0)] = 1.0
    stats_period_s: Annotated[float, Field(gt=0, le=10)] = Field(
        0.5, description="How often each replica reports its load and prefix-cache changes."
    )
    session_header: str | None = Field(
        "X-Session-ID",
        description="Requests carrying this header go where the session went before, while "
        "load allows (None: no session affinity).",
    )
    index_max_entries: Annotated[int, Field(gt=0)] = Field(
        4_000_000, description="Bound on the prefix index's (block, replica) entries."
    )

    @model_validator(mode="after")
    def _valid(self) -> RouterConfig:
        if self.queue_weight + self.kv_cache_weight == 0:
            raise ValueError("queue_weight and kv_cache_weight cannot both be 0")
        unknown = set(self.cost) - {f.name for f in fields(CostWeights)}
        if unknown:
            known = ", ".join(f.name for f in fields(CostWeights))
            raise ValueError(f"router.cost: unknown settings {sorted(unknown)} (known: {known})")
        CostWeights(**self.cost)  # raises on an invalid value
        if self.step_model is not None and not _project_path(self.step_model).is_file():
            raise ValueError(f"router.step_model: no such file {self.step_model!r}")
        return self

    def cost_weights(self, engine: EngineConfig) -> CostWeights:
        """The cost policy's weights: from the step model of the replicas' engine, if known,
        with `cost` over them."""
        model = None
        if self.step_model is not None:
            model = StepTimeModel.load(_project_path(self.step_model))
        elif engine.synthetic is not None:
            model = engine.synthetic.step_model()
        if model is None:
            return CostWeights(**self.cost)
        return CostWeights.from_step_model(model, engine.max_num_batched_tokens, **self.cost)


def _project_path(path: str) -> Path:
    """`path` as given if it exists, else relative to the project root (where configs/ is)."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    return PROJECT_ROOT / given


class ScaledDeployment(BaseModel):
    """A fixed number of replicas, or Serve's autoscaling (which then decides the number)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: Annotated[int, Field(ge=1)] | None = 1
    autoscaling_config: AutoscalingConfig | None = None

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> ScaledDeployment:
        if self.autoscaling_config is not None:
            self.num_replicas = None
        elif self.num_replicas is None:
            raise ValueError("set num_replicas or autoscaling_config")
        return self


class ReplicaConfig(ScaledDeployment):
    """How many engine replicas run, and with what resources (Serve deployment options)."""

    max_ongoing_requests: Annotated[int, Field(ge=1)] = Field(
        256, description="Requests in flight to one replica at once (Serve's limit)."
    )
    max_queued_requests: Annotated[int, Field(ge=1)] = Field(
        1024,
        description="Requests waiting at the ingress for a replica; beyond it, HTTP 503.",
    )
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)
    health_check_period_s: Annotated[float, Field(gt=0)] = 5.0
    health_check_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    graceful_shutdown_timeout_s: Annotated[float, Field(ge=0)] = Field(
        30.0,
        description="On shutdown or downscale, how long a replica keeps serving the requests "
        "it holds before it is stopped (those still running then end with an error event).",
    )

    def deployment_options(self) -> dict[str, Any]:
        options = self.model_dump(exclude_none=True)
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        return options


class IngressConfig(ScaledDeployment):
    """How many OpenAI ingress replicas run. Each streams roughly 13,000 tokens/s per core
    (docs/benchmarks.md, serving-path capacity): past that, scale it out, or autoscale it on
    ongoing requests (streams) like the engine replicas."""

    max_ongoing_requests: Annotated[int, Field(ge=1)] = Field(
        4096, description="Requests (streams) one ingress replica holds at once."
    )
    num_cpus: Annotated[float, Field(ge=0)] = Field(
        0, description="CPUs reserved per ingress replica (0: it shares the node's)."
    )

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas
        return options


class LimitsConfig(BaseModel):
    """What one request may ask for, checked at the ingress before it reaches a replica."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_tokens: Annotated[int, Field(gt=0)] | None = Field(
        None, description="Longest prompt accepted (default: what the context allows)."
    )
    max_tokens: Annotated[int, Field(gt=0)] | None = Field(
        None,
        description="Cap on a request's max_tokens; also the default when it sets none "
        "(default: what the context leaves).",
    )
    max_body_bytes: Annotated[int, Field(gt=0)] = Field(
        4 * 1024 * 1024, description="Largest request body (HTTP 413 beyond)."
    )
    request_timeout_s: Annotated[float, Field(gt=0)] = Field(
        600.0,
        description="Deadline of a request; a client may shorten it with the X-Request-Timeout "
        "header (seconds). Expired requests are aborted (HTTP 408).",
    )


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    served_model_name: str | None = Field(
        None, description="The model name clients use; default: derived from `engine.model`."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    api_key_env: str = Field(
        "CONTINUUM_API_KEY",
        description="Environment variable holding the API key (e.g. from a Kubernetes Secret). "
        "When it is set, every route but /health needs `Authorization: Bearer <key>`.",
    )

    @model_validator(mode="after")
    def _device_matches_resources(self) -> AppConfig:
        gpus = self.replicas.ray_actor_options.get("num_gpus", 0)
        device = self.engine.device
        if device.startswith("cuda") and not gpus:
            raise ValueError("engine.device is cuda but replicas request no GPU (num_gpus)")
        if device == "cpu" and gpus:
            raise ValueError("replicas request GPUs but engine.device is cpu")
        return self

    def router_kwargs(self) -> dict[str, Any]:
        """What the request router is built with (`KVAwareRequestRouter.initialize_state`)."""
        return {
            "policy": self.router.policy,
            "cost_weights": asdict(self.router.cost_weights(self.engine)),
            "queue_weight": self.router.queue_weight,
            "kv_cache_weight": self.router.kv_cache_weight,
            "index_max_entries": self.router.index_max_entries,
        }

    def engine_for_replicas(self) -> EngineConfig:
        """The engine settings replicas run: they report prefix-cache changes when the router
        uses them."""
        return self.engine.model_copy(update={"report_cache_events": self.router.policy == "cost"})

    @property
    def model_name(self) -> str:
        return self.served_model_name or model_display_name(self.engine.model)
