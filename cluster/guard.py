"""What every request is checked against before it is parsed: the API key and the body size."""

import hmac
from dataclasses import dataclass

from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from cluster.config import LimitsConfig
from cluster.errors import APIError

OPEN_PATHS = ("/health",)


@dataclass
class Guard:
    api_key: bytes | None
    max_body_bytes: int


# Serve runs one ingress replica per process; it sets this through `configure_guard`.
guard = Guard(api_key=None, max_body_bytes=LimitsConfig().max_body_bytes)


def configure_guard(api_key: str | None, max_body_bytes: int) -> None:
    """Set what `GuardMiddleware` checks. A module function, not an attribute write in the
    ingress: Serve ships the ingress class by value, with copies of the globals it names."""
    guard.api_key = api_key.strip().encode() if api_key and api_key.strip() else None
    guard.max_body_bytes = max_body_bytes


def route_path(scope) -> str:
    """The path below the application's route prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class GuardMiddleware:
    """Bearer-key check (constant time; /health is open) and the request body size limit."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if guard.api_key is not None and route_path(scope) not in OPEN_PATHS:
            scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), guard.api_key):
                error = APIError(
                    401,
                    "missing or incorrect API key (Authorization: Bearer <key>)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error.response()(scope, receive, send)
                return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > guard.max_body_bytes:
            error = APIError(
                413, f"the request body is over {guard.max_body_bytes} bytes", code="too_large"
            )
            await error.response()(scope, receive, send)
            return
        # Bodies without a length are counted as they arrive (413 through the HTTP handler).
        await RequestBodyLimitMiddleware(self.app, guard.max_body_bytes)(scope, receive, send)
