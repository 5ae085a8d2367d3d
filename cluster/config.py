"""The application's settings (a Serve config's `args`), validated before any replica starts."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve.config import AutoscalingConfig

from replicas.config import EngineConfig
from replicas.model_source import model_display_name


class RouterConfig(BaseModel):
    """How the KV-aware router weighs queue depth against KV-cache occupancy."""

    model_config = ConfigDict(extra="forbid")

    queue_weight: Annotated[float, Field(ge=0)] = 1.0
    kv_cache_weight: Annotated[float, Field(ge=0)] = 1.0
    stats_period_s: Annotated[float, Field(gt=0, le=10)] = Field(
        0.5, description="How often each replica reports its free blocks and queue."
    )

    @model_validator(mode="after")
    def _some_weight(self) -> RouterConfig:
        if self.queue_weight + self.kv_cache_weight == 0:
            raise ValueError("queue_weight and kv_cache_weight cannot both be 0")
        return self


class ReplicaConfig(BaseModel):
    """How many engine replicas run, and with what resources (Serve deployment options)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: Annotated[int, Field(ge=1)] | None = 1
    autoscaling_config: AutoscalingConfig | None = None
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

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> ReplicaConfig:
        if self.autoscaling_config is not None:
            self.num_replicas = None
        elif self.num_replicas is None:
            raise ValueError("set num_replicas or autoscaling_config")
        return self

    def deployment_options(self) -> dict[str, Any]:
        options = self.model_dump(exclude_none=True)
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
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

    @property
    def model_name(self) -> str:
        return self.served_model_name or model_display_name(self.engine.model)
