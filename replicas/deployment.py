"""The Ray Serve replica: one engine per replica (one GPU each in production).

Requests arrive as `GenerateRequest`s through `generate`, an async generator that streams the
request's text deltas as msgspec-encoded `StreamDelta` bytes (replicas/outputs.py); many are in
flight at once while the engine's step loop runs in its own process. Serve calls
`record_routing_stats` for the router and `check_health` to replace a dead replica.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ray import serve

from replicas.config import EngineConfig
from replicas.errors import EngineDeadError
from replicas.messages import EngineInfo
from replicas.metrics import RaySink
from replicas.outputs import encode_delta
from replicas.sampling_params import SamplingParams

# Serve formats this logger's records (JSON with `logging_config.encoding: JSON`) and tags them
# with the request id, deployment and replica.
logger = logging.getLogger("ray.serve")


@dataclass
class GenerateRequest:
    """What the ingress sends a replica: an already tokenized prompt and how to sample it.

    `request_id` is unique per engine request (the ingress makes it); `log_id` is the client's
    X-Request-ID, which only names log lines.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    log_id: str = ""
    # For the router: the prompt's full-block hashes (`prompt_block_hashes`) and the client's
    # session, if it sent one.
    block_hashes: list[bytes] = field(default_factory=list)
    session_id: str | None = None


class LLMServer:
    def __init__(self, engine_config: dict) -> None:
        # Imported here: Serve's app builder imports this module and needs no torch.
        from replicas.async_engine import AsyncLLMEngine

        self.engine = AsyncLLMEngine(EngineConfig.model_validate(engine_config), RaySink())
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def generate(self, request: GenerateRequest) -> AsyncIterator[bytes]:
        """Stream the request's deltas; cancellation (client gone) aborts it, freeing blocks."""
        start = time.monotonic()
        first_token = None
        tokens = 0
        reasons: list[str] = []
        try:
            async for output in self.engine.generate(
                request.request_id, request.prompt_token_ids, request.params
            ):
                first_token = first_token or time.monotonic()
                tokens += sum(len(c.token_ids) for c in output.outputs)
                reasons += [c.finish_reason for c in output.outputs if c.finish_reason]
                yield encode_delta(output)
        except EngineDeadError as exc:
            # Name this replica, so the router stops sending it work at once.
            raise EngineDeadError(str(exc), self.replica_id) from None
        finally:
            # Sizes and timings only: prompts and outputs are never logged.
            logger.info(
                "request %s %s: prompt_tokens=%d completion_tokens=%d ttft_ms=%s e2e_ms=%.0f",
                request.log_id or request.request_id,
                ",".join(reasons) or "abort",
                len(request.prompt_token_ids),
                tokens,
                "-" if first_token is None else f"{(first_token - start) * 1000:.0f}",
                (time.monotonic() - start) * 1000,
            )

    def model_info(self) -> EngineInfo:
        return self.engine.info

    def record_routing_stats(self) -> dict:
        """`ReplicaStats` (and prefix-cache events) as a dict: the form Serve carries."""
        return self.engine.routing_report()

    def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


LLMDeployment = serve.deployment(name="LLMServer")(LLMServer)
