"""The engine's own process: its main thread runs the step loop (`python -m replicas.engine_core`).

Why a process: OpenMP parallel regions started from a non-main thread run far slower here
(libgomp: a linear layer 1.7x, a small elementwise op 7x), and in a Serve replica the engine
would share its GIL with Serve's streaming threads. The replica talks to this process over a
pipe: commands in (add, abort), one message out per step (outputs, load, metric records).
"""

from __future__ import annotations

import ctypes
import signal
import sys
from multiprocessing.connection import Connection

from replicas.config import EngineConfig
from replicas.metrics import RecordingSink


def engine_info(engine) -> dict:
    bm = engine.block_manager
    return {
        "model_name": engine.model_name,
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.vocab_size,
        "block_size": bm.block_size,
        "num_blocks": bm.num_blocks,
    }


def engine_load(engine) -> dict[str, int]:
    """What the router reads for this replica."""
    scheduler, bm = engine.scheduler, engine.block_manager
    return {
        "num_waiting": scheduler.num_waiting,
        "num_running": scheduler.num_running,
        "free_blocks": bm.num_free_blocks,
        "total_blocks": bm.num_blocks,
        "block_size": bm.block_size,
        "prefix_cache_queries": bm.prefix_cache_queries,
        "prefix_cache_hits": bm.prefix_cache_hits,
        "requests_admitted": engine.num_requests_admitted,
    }


def serve_engine(conn: Connection) -> None:
    """Build the engine from the first message, then run commands and steps until told to stop."""
    from replicas.engine import LLMEngine

    config = EngineConfig.model_validate(conn.recv())
    sink = RecordingSink()
    try:
        engine = LLMEngine(config, sink)
    except BaseException as exc:
        conn.send(("failed", exc))
        return
    conn.send(("ready", engine_info(engine), engine_load(engine)))
    while True:
        # Block for commands only when there is nothing to compute.
        while conn.poll(0 if engine.has_unfinished_requests() else None):
            command, *args = conn.recv()
            if command == "add":
                request_id, prompt, params = args
                error = None
                try:
                    engine.add_request(request_id, prompt, params)
                except Exception as exc:  # refused (too long, queue full): the caller's error
                    error = exc
                conn.send(("added", request_id, error, engine_load(engine)))
            elif command == "abort":
                engine.abort_request(args[0])
                conn.send(("load", engine_load(engine), sink.drain()))
            elif command == "shutdown":
                return
        if engine.has_unfinished_requests():
            outputs = engine.step()
            conn.send(("step", outputs, engine_load(engine), sink.drain()))


def main() -> None:
    # Exit with the replica: the kernel signals us when the parent dies.
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    conn = Connection(int(sys.argv[1]))
    try:
        serve_engine(conn)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the replica went away
    except BaseException as exc:
        try:  # a plain error: the original may not pickle
            conn.send(("dead", RuntimeError(f"{type(exc).__name__}: {exc}")))
        finally:
            raise


if __name__ == "__main__":
    main()
