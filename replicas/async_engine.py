"""The engine behind an asyncio API: the engine computes in its own process, callers stream text.

`AsyncLLMEngine` starts `replicas.engine_core` as a child process and talks to it over a pipe in
typed messages: commands go out (add, abort, finish), one `StepDone` per step comes back with
token ids only. A reader thread turns them into text here (`OutputProcessor`: detokenization,
stop strings, logprob text), off the engine's compute loop, and hands each caller its output.
A caller that has not taken its previous output gets the new one merged into it, so a slow
consumer costs one message, not one per step. A caller that stops listening (disconnect,
cancellation) aborts its request; its blocks are freed before the next step. If the engine
process dies, every stream fails and `check_health` says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from multiprocessing import Pipe

from replicas.cache_report import CacheReporter
from replicas.config import EngineConfig
from replicas.engine_core import EnginePipe
from replicas.errors import EngineDeadError, EngineStepError
from replicas.messages import (
    AbortRequest,
    Added,
    AddRequest,
    CacheChanges,
    Died,
    EngineInfo,
    EngineOutput,
    Event,
    FinishGeneration,
    MetricRecord,
    Ready,
    ReplicaStats,
    Shutdown,
    StartupFailed,
    StatsChanged,
    StepDone,
)
from replicas.metrics import RaySink
from replicas.output_processor import OutputProcessor
from replicas.outputs import RequestOutput, merge_deltas
from replicas.sampling_params import OutputKind, SamplingParams
from scheduler import QueueFullError, RequestTooLongError

logger = logging.getLogger(__name__)

GAUGE_REFRESH_S = 1.0
REFUSALS = {"queue_full": QueueFullError, "too_long": RequestTooLongError, "invalid": ValueError}


class _Stream:
    """One caller's outputs: what arrives before the caller takes it is merged into one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: RequestOutput | None = None
        self.error: BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self.pending = output if self.pending is None else merge_deltas(self.pending, output)
        self.ready.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ready.set()

    async def get(self) -> RequestOutput:
        await self.ready.wait()
        self.ready.clear()
        if self.error is not None:
            raise self.error
        output, self.pending = self.pending, None
        if output.error is not None:
            raise EngineStepError(output.error)
        return output


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, metrics: RaySink | None = None) -> None:
        """Start the engine process and wait until its model is loaded (raises if it fails)."""
        self.metrics = metrics
        self.messages_per_s = config.stream_messages_per_s
        self.cache_reporter = CacheReporter() if config.report_cache_events else None
        conn, child_conn = Pipe()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "replicas.engine_core", str(child_conn.fileno())],
            pass_fds=[child_conn.fileno()],
        )
        child_conn.close()
        self._pipe = EnginePipe(conn, Event)
        self._send_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._pending_adds: dict[str, concurrent.futures.Future] = {}
        self._error: BaseException | None = None
        conn.send_bytes(config.model_dump_json().encode())
        # The tokenizer loads here while the engine process loads the model.
        from replicas.model_loader import resolve_model_source
        from replicas.tokenizer import load_tokenizer

        self.processor = OutputProcessor(load_tokenizer(config, resolve_model_source(config)))
        ready = self._recv_startup()
        self.info: EngineInfo = ready.info
        self._stats: ReplicaStats = ready.stats
        self._reader = threading.Thread(
            target=self._read, name="continuum-engine-reader", daemon=True
        )
        self._reader.start()

    # --- caller side (any event loop) ---------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (only what is new in each); abort it if the caller leaves.

        Raises ValueError at once for a request the engine can never run, or for a request id
        already in use (the request holding it is left alone).
        """
        self.check_health()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params.model_copy(update={"output_kind": OutputKind.DELTA})
        stream = _Stream(asyncio.get_running_loop())
        added: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._streams[request_id] = stream
        self._pending_adds[request_id] = added
        self.processor.add_request(request_id, prompt_token_ids, params, prompt)
        finished = False
        try:
            self._send(AddRequest(request_id, prompt_token_ids, params.model_dump(mode="json")))
            await asyncio.wrap_future(added)
            last_sent = None
            while True:
                if self.messages_per_s and last_sent is not None:
                    # This stream's share of the replica's message budget; what arrives in the
                    # meantime is merged into one message.
                    interval = len(self._streams) / self.messages_per_s
                    await asyncio.sleep(last_sent + interval - stream.loop.time())
                output = await stream.get()
                finished = output.finished
                yield output
                last_sent = stream.loop.time()
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            self._pending_adds.pop(request_id, None)
            self.processor.remove_request(request_id)
            if not finished and self._error is None:
                self._send(AbortRequest(request_id))

    def check_health(self) -> None:
        if self._error is not None or self._process.poll() is not None:
            raise EngineDeadError(f"the engine process has stopped: {self._error!r}")

    def stats(self) -> ReplicaStats:
        """The replica's load as of the engine's last message (what the router reads)."""
        alive = self._error is None and self._process.poll() is None
        if alive == self._stats.engine_alive:
            return self._stats
        return ReplicaStats(**{**self._stats.as_dict(), "engine_alive": alive})

    def routing_report(self) -> dict:
        """What Serve carries to the router (`record_routing_stats`): the load, and the prefix
        cache's changes since the previous report when they are recorded."""
        report = self.stats().as_dict()
        if self.cache_reporter is not None:
            report["cache_events"] = self.cache_reporter.report()
        return report

    def shutdown(self) -> None:
        if self._process.poll() is None:
            try:
                self._send(Shutdown())
                self._process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
        self._pipe.conn.close()

    # --- pipe -----------------------------------------------------------------------------------

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._pipe.send(message)
        except OSError as exc:
            raise EngineDeadError(f"the engine process has stopped: {exc!r}") from exc

    def _recv_startup(self) -> Ready:
        try:
            reply = self._pipe.recv()
        except EOFError as exc:
            raise EngineDeadError(f"the engine process exited with {self._process.wait()}") from exc
        if isinstance(reply, StartupFailed):
            self._process.wait()
            raise EngineDeadError(f"the engine failed to start: {reply.error}")
        return reply

    def _read(self) -> None:
        """Reader thread: route each message from the engine process to its callers."""
        try:
            while True:
                if not self._pipe.poll(GAUGE_REFRESH_S):  # idle: keep the gauges alive
                    if self.metrics is not None:
                        self.metrics.refresh_gauges()
                    continue
                event = self._pipe.recv()
                if isinstance(event, StepDone):
                    self._stats = event.stats
                    self._deliver(event.outputs)
                    self._record(event.metrics)
                    self._absorb(event.cache)
                elif isinstance(event, StatsChanged):
                    self._stats = event.stats
                    self._record(event.metrics)
                    self._absorb(event.cache)
                elif isinstance(event, Added):
                    self._stats = event.stats
                    self._resolve_add(event)
                elif isinstance(event, Died):
                    raise EngineDeadError(event.error)
        except BaseException as exc:
            self._error = exc if not isinstance(exc, EOFError) else EngineDeadError("engine exited")
            logger.error("the engine process stopped: %r", self._error)
            self._fail_all(EngineDeadError(f"the engine process has stopped: {self._error!r}"))

    def _absorb(self, changes: CacheChanges | None) -> None:
        if changes is not None and self.cache_reporter is not None:
            self.cache_reporter.absorb(changes.stored, changes.removed)

    def _resolve_add(self, event: Added) -> None:
        future = self._pending_adds.pop(event.request_id, None)
        if future is None:
            return
        if event.error_kind is None:
            future.set_result(None)
        else:
            future.set_exception(REFUSALS[event.error_kind](event.error))

    def _record(self, records: list[MetricRecord]) -> None:
        if self.metrics is not None:
            for record in records:
                self.metrics.record(record.name, record.value, record.labels)

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        processed = self.processor.process(outputs)
        for request_id, index in processed.stopped:
            self._send(FinishGeneration(request_id, index))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = defaultdict(
            list
        )
        for output in processed.request_outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop[stream.loop].append((stream, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                for _, output in items:
                    self._send(AbortRequest(output.request_id))

    def _fail_all(self, error: BaseException) -> None:
        for future in list(self._pending_adds.values()):
            if not future.done():
                future.set_exception(error)
        for stream in list(self._streams.values()):
            with contextlib.suppress(RuntimeError):  # that caller's loop is already closed
                stream.loop.call_soon_threadsafe(stream.fail, error)


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.put(output)
