"""The engine's own process: its main thread runs the step loop (`python -m replicas.engine_core`).

Why a process: OpenMP parallel regions started from a non-main thread run far slower here
(libgomp: a linear layer 1.7x, a small elementwise op 7x), and in a Serve replica the engine
would share its GIL with Serve's streaming threads. The replica talks to this process over a
pipe in typed msgpack messages (replicas/messages.py): commands in (add, abort, finish), one
`StepDone` out per step with only what is new (token ids, no text, no prompt).
"""

from __future__ import annotations

import ctypes
import signal
import sys
from multiprocessing.connection import Connection

import msgspec

from replicas.config import EngineConfig
from replicas.messages import (
    AbortRequest,
    Added,
    AddRequest,
    CacheChanges,
    Command,
    Died,
    EngineInfo,
    ErrorKind,
    Event,
    FinishGeneration,
    Ready,
    Shutdown,
    StartupFailed,
    StatsChanged,
    StepDone,
)
from replicas.metrics import RecordingSink
from replicas.sampling_params import SamplingParams
from scheduler import QueueFullError, RequestTooLongError


class EnginePipe:
    """One end of the engine pipe: typed messages in one direction, typed messages out."""

    def __init__(self, conn: Connection, receives: type) -> None:
        self.conn = conn
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(receives)

    def send(self, message: Command | Event) -> None:
        self.conn.send_bytes(self._encoder.encode(message))

    def recv(self):
        return self._decoder.decode(self.conn.recv_bytes())

    def poll(self, timeout: float | None) -> bool:
        return self.conn.poll(timeout)


def error_kind(exc: Exception) -> ErrorKind:
    if isinstance(exc, QueueFullError):
        return "queue_full"
    if isinstance(exc, RequestTooLongError):
        return "too_long"
    return "invalid"


def cache_changes(engine) -> CacheChanges | None:
    if not engine.config.report_cache_events:
        return None
    events = engine.block_manager.drain_cache_events()
    return CacheChanges(events.stored, events.removed)


def serve_engine(pipe: EnginePipe, config: EngineConfig) -> None:
    """Build the engine, then run commands and steps until told to stop."""
    from replicas.engine import LLMEngine

    sink = RecordingSink()
    try:
        engine = LLMEngine(config, sink)
    except Exception as exc:
        pipe.send(StartupFailed(f"{type(exc).__name__}: {exc}"))
        return
    info = EngineInfo(engine.max_model_len, engine.block_manager.block_size)
    pipe.send(Ready(info, engine.stats()))
    while True:
        # Block for commands only when there is nothing to compute.
        while pipe.poll(0 if engine.has_unfinished_requests() else None):
            command = pipe.recv()
            if isinstance(command, AddRequest):
                try:
                    params = SamplingParams.model_validate(command.params)
                    engine.add_request(command.request_id, command.prompt_token_ids, params)
                except Exception as exc:  # refused (too long, queue full): the caller's error
                    pipe.send(Added(command.request_id, engine.stats(), error_kind(exc), str(exc)))
                else:
                    pipe.send(Added(command.request_id, engine.stats()))
            elif isinstance(command, AbortRequest):
                engine.abort_request(command.request_id)
                pipe.send(StatsChanged(engine.stats(), sink.drain(), cache_changes(engine)))
            elif isinstance(command, FinishGeneration):
                engine.finish_generation(command.request_id, command.index)
                pipe.send(StatsChanged(engine.stats(), sink.drain(), cache_changes(engine)))
            elif isinstance(command, Shutdown):
                return
        if engine.has_unfinished_requests():
            outputs = engine.step()
            pipe.send(StepDone(outputs, engine.stats(), sink.drain(), cache_changes(engine)))


def main() -> None:
    # Exit with the replica: the kernel signals us when the parent dies.
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    pipe = EnginePipe(Connection(int(sys.argv[1])), Command)
    try:
        config = EngineConfig.model_validate_json(pipe.conn.recv_bytes())
        serve_engine(pipe, config)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the replica went away
    except BaseException as exc:
        try:
            pipe.send(Died(f"{type(exc).__name__}: {exc}"))
        finally:
            raise


if __name__ == "__main__":
    main()
