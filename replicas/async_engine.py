"""The engine behind an asyncio API: one thread runs the step loop, callers stream outputs.

The engine is single-threaded by design, so every change to it (add, abort) is a command that
the loop thread runs between steps. Outputs go back to each caller's event loop in one
thread-safe call per loop per step. A caller that stops listening (disconnect, cancellation)
aborts its request, and the blocks are freed before the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from replicas.config import EngineConfig
from replicas.engine import LLMEngine
from replicas.errors import EngineDeadError
from replicas.metrics import MetricsSink
from replicas.outputs import RequestOutput
from replicas.sampling_params import OutputKind, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, metrics: MetricsSink | None = None) -> None:
        self.engine = LLMEngine(config, metrics)
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="continuum-engine", daemon=True)
        self._thread.start()

    # --- caller side (any event loop) ---------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (only what is new in each); abort it if the caller leaves.

        Raises ValueError at once for a request the engine can never run.
        """
        self.check_health()
        params = params.model_copy(update={"output_kind": OutputKind.DELTA})
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        added: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(lambda: self._add(request_id, prompt, params, stream, added))
        finished = False
        try:
            await asyncio.wrap_future(added)
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit(lambda: self._abort(request_id))

    def check_health(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine loop has stopped: {self._error!r}")

    def load(self) -> dict[str, int]:
        """The replica's live load, for the router (read without locking: plain int reads)."""
        scheduler = self.engine.scheduler
        bm = self.engine.block_manager
        return {
            "num_waiting": scheduler.num_waiting,
            "num_running": scheduler.num_running,
            "free_blocks": bm.num_free_blocks,
            "total_blocks": bm.num_blocks,
            "block_size": bm.block_size,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "requests_admitted": self.engine.num_requests_admitted,
        }

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=30)

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # --- loop thread --------------------------------------------------------------------------

    def _add(
        self, request_id, prompt, params, stream: _Stream, added: concurrent.futures.Future
    ) -> None:
        try:
            self.engine.add_request(request_id, prompt, params)
        except Exception as exc:
            added.set_exception(exc)
            return
        self._streams[request_id] = stream
        added.set_result(None)

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _run(self) -> None:
        try:
            while not self._stopping:
                while not self._commands.empty():
                    self._commands.get_nowait()()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                self._deliver(self.engine.step())
        except BaseException as exc:
            logger.exception("engine loop died")
            self._error = exc
            self._fail_all(EngineDeadError(f"the engine loop has stopped: {exc!r}"))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = defaultdict(
            list
        )
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            by_loop[stream.loop].append((stream.queue, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                for _, output in items:
                    self._abort(output.request_id)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
