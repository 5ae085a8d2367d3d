"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, and the mapping
from what replicas raise (through Ray) to what the client must see."""

import logging

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from replicas.errors import EngineDeadError, EngineStepError
from scheduler import QueueFullError

logger = logging.getLogger(__name__)


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class APIError(Exception):
    """An error the client caused or must see, with OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers

    def body(self) -> bytes:
        return msgspec.json.encode(ErrorBody(self.detail))

    def response(self) -> Response:
        return Response(
            self.body(), self.status, headers=self.headers, media_type="application/json"
        )


def retry_later(status: int, message: str, code: str) -> APIError:
    """Overload or a replica restarting: the client should come back in a moment."""
    kind = "rate_limit_error" if status == 429 else "service_unavailable"
    return APIError(status, message, kind, code=code, headers={"Retry-After": "1"})


def request_timeout() -> APIError:
    return APIError(408, "the request passed its deadline", "timeout_error", code="request_timeout")


def replica_unavailable(exc: BaseException) -> bool:
    """The replica (or its engine) is gone: another replica may serve the request."""
    cause = getattr(exc, "cause", None) or exc
    return isinstance(cause, EngineDeadError | RayActorError)


def classify_engine_error(exc: BaseException) -> APIError:
    """Map an exception raised by a replica (Ray wraps it) to what the client should see."""
    if isinstance(exc, APIError):
        return exc
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, QueueFullError):
        return retry_later(429, str(cause), "queue_full")
    if isinstance(cause, BackPressureError):
        return retry_later(503, "all replicas are busy; retry", "queue_full")
    if replica_unavailable(cause):
        return retry_later(503, "the model replica is restarting; retry", "replica_unavailable")
    if isinstance(cause, ValueError):
        return APIError(400, str(cause).splitlines()[0] if str(cause) else "invalid request")
    if isinstance(cause, EngineStepError):
        logger.error("engine step failed: %s", cause)
        return APIError(500, "the engine failed while generating this request", "internal_error")
    logger.error("request failed: %r", exc)
    return APIError(500, "internal error while generating", "internal_error")


def _location(loc: tuple) -> str | None:
    return ".".join(str(p) for p in loc if p != "body") or None


async def _api_error(_: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(_: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown route, body too large, ...) in OpenAI's shape."""
    kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    return APIError(exc.status_code, str(exc.detail), kind, headers=exc.headers).response()


async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        message = f"the request body is not valid JSON: {reason}".rstrip(": ")
        return APIError(400, message, code="invalid_json").response()
    param = _location(first.get("loc", ()))
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, param=param, code="invalid_value").response()


async def _sampling_error(_: Request, exc: ValidationError) -> Response:
    """Values each valid alone but not together (e.g. for SamplingParams)."""
    first = exc.errors()[0]
    param = _location(first.get("loc", ()))
    return APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _sampling_error)


class InternalErrorMiddleware:
    """Unexpected errors before a response has started become OpenAI-style 500s.

    Unlike an `Exception` handler (which re-raises after responding, to be logged twice),
    this answers once; cancellations (a client that left) pass through untouched.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started or scope["type"] != "http" or isinstance(exc, TaskCancelledError):
                raise
            logger.exception("unhandled error")
            error = APIError(500, "internal server error", "internal_error")
            await error.response()(scope, receive, send)
