"""The engine behind an asyncio API: the engine runs in its own process, callers stream outputs.

`AsyncLLMEngine` starts `replicas.engine_core` as a child process and talks to it over a pipe:
commands go out (add, abort), and one message per step comes back, which a reader thread splits
into each caller's stream (one thread-safe call per event loop per step). A caller that stops
listening (disconnect, cancellation) aborts its request; its blocks are freed before the next
step. If the engine process dies, every stream fails and `check_health` says so.
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
from dataclasses import dataclass
from multiprocessing import Pipe

from replicas.config import EngineConfig
from replicas.errors import EngineDeadError, EngineStepError
from replicas.metrics import RaySink
from replicas.outputs import RequestOutput, merge_deltas
from replicas.sampling_params import OutputKind, SamplingParams

logger = logging.getLogger(__name__)

GAUGE_REFRESH_S = 1.0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, metrics: RaySink | None = None) -> None:
        """Start the engine process and wait until its model is loaded (raises if it fails)."""
        self.metrics = metrics
        self.stream_interval_s = config.stream_interval_ms / 1000
        self._conn, child_conn = Pipe()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "replicas.engine_core", str(child_conn.fileno())],
            pass_fds=[child_conn.fileno()],
        )
        child_conn.close()
        self._send_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._pending_adds: dict[str, concurrent.futures.Future] = {}
        self._error: BaseException | None = None
        self._send(config.model_dump(mode="json"))
        reply = self._recv_startup()
        self.info: dict = reply[1]
        self._load: dict[str, int] = reply[2]
        self._reader = threading.Thread(
            target=self._read, name="continuum-engine-reader", daemon=True
        )
        self._reader.start()

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
        self._streams[request_id] = stream
        self._pending_adds[request_id] = added
        finished = False
        try:
            self._send(("add", request_id, prompt, params))
            await asyncio.wrap_future(added)
            last_sent = None
            while True:
                item = _output_or_raise(await stream.queue.get())
                if self.stream_interval_s and last_sent is not None and not item.finished:
                    # At most one message per interval: fewer hops through Serve under load.
                    await asyncio.sleep(last_sent + self.stream_interval_s - stream.loop.time())
                    while not stream.queue.empty():
                        item = merge_deltas(item, _output_or_raise(stream.queue.get_nowait()))
                finished = item.finished
                yield item
                last_sent = stream.loop.time()
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            self._pending_adds.pop(request_id, None)
            if not finished and self._error is None:
                self._send(("abort", request_id))

    def check_health(self) -> None:
        if self._error is not None or self._process.poll() is not None:
            raise EngineDeadError(f"the engine process has stopped: {self._error!r}")

    def load(self) -> dict[str, int]:
        """The replica's load as of the engine's last step (what the router reads)."""
        return self._load

    def shutdown(self) -> None:
        if self._process.poll() is None:
            try:
                self._send(("shutdown",))
                self._process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
        self._conn.close()

    # --- pipe -----------------------------------------------------------------------------------

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError as exc:
            raise EngineDeadError(f"the engine process has stopped: {exc!r}") from exc

    def _recv_startup(self) -> tuple:
        try:
            reply = self._conn.recv()
        except EOFError as exc:
            raise EngineDeadError(f"the engine process exited with {self._process.wait()}") from exc
        if reply[0] == "failed":
            self._process.wait()
            raise reply[1]
        return reply

    def _read(self) -> None:
        """Reader thread: route each message from the engine process to its callers."""
        try:
            while True:
                if not self._conn.poll(GAUGE_REFRESH_S):  # idle: keep the gauges alive
                    if self.metrics is not None:
                        self.metrics.refresh_gauges()
                    continue
                kind, *body = self._conn.recv()
                if kind == "step":
                    outputs, self._load, records = body
                    self._deliver(outputs)
                    self._record(records)
                elif kind == "load":  # after an abort, with no step to report it
                    self._load, records = body
                    self._record(records)
                elif kind == "added":
                    request_id, error, self._load = body
                    future = self._pending_adds.pop(request_id, None)
                    if future is None:
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
                elif kind == "dead":
                    raise body[0]
        except BaseException as exc:
            self._error = exc if not isinstance(exc, EOFError) else EngineDeadError("engine exited")
            logger.error("the engine process stopped: %r", self._error)
            self._fail_all(EngineDeadError(f"the engine process has stopped: {self._error!r}"))

    def _record(self, records: list) -> None:
        if self.metrics is not None:
            for name, value, labels in records:
                self.metrics.record(name, value, labels)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = defaultdict(
            list
        )
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop[stream.loop].append((stream.queue, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                for _, output in items:
                    self._send(("abort", output.request_id))

    def _fail_all(self, error: BaseException) -> None:
        for future in list(self._pending_adds.values()):
            if not future.done():
                future.set_exception(error)
        for stream in list(self._streams.values()):
            with contextlib.suppress(RuntimeError):  # that caller's loop is already closed
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)


def _output_or_raise(item: RequestOutput | BaseException) -> RequestOutput:
    """A stream item as an output; the engine's death or a failed step as an exception."""
    if isinstance(item, BaseException):
        raise item
    if item.error is not None:
        raise EngineStepError(item.error)
    return item


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
