"""The Serve application: engine replicas behind the KV-aware router, and the OpenAI ingress.

`build_app` is the `import_path` of every config in configs/: Serve calls it with the
application's `args`, validated here (AppConfig) before any replica starts.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.api import OpenAIIngress
from cluster.config import AppConfig
from cluster.router import KVAwareRequestRouter
from replicas.deployment import LLMDeployment

INGRESS_EXTRA_GRACE_S = 10.0
IngressDeployment = serve.deployment(name="OpenAIIngress")(OpenAIIngress)


def build_app(args: dict | None = None) -> Application:
    config = AppConfig.model_validate(args or {})
    router = RequestRouterConfig(
        request_router_class=KVAwareRequestRouter,
        request_router_kwargs=config.router_kwargs(),
        request_routing_stats_period_s=config.router.stats_period_s,
        request_routing_stats_timeout_s=max(2 * config.router.stats_period_s, 1.0),
    )
    llm = LLMDeployment.options(
        request_router_config=router, **config.replicas.deployment_options()
    ).bind(config.engine_for_replicas().model_dump(mode="json"))
    # The ingress outlives the engine replicas' grace, to end what they could not finish with
    # an error event and [DONE] rather than a cut connection.
    ingress = IngressDeployment.options(
        **config.ingress.deployment_options(),
        graceful_shutdown_timeout_s=config.replicas.graceful_shutdown_timeout_s
        + INGRESS_EXTRA_GRACE_S,
    )
    return ingress.bind(llm, config.model_dump(mode="json"))
