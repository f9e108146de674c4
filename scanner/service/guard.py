"""The service's gate, one ASGI middleware in front of every route: the bearer token, the limit
on requests in flight, and the body limit and deadline, enforced on the stream itself (a
chunked body has no Content-Length to trust)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
from pathlib import Path

from ..errors import MemscanError

OPEN_PATHS = ("/healthz",)  # liveness probes carry no token and are never turned away
# What a browser loads before it can send a token: the page (which then asks for it), the API docs and their
# assets. None of it touches the model or holds data.
PUBLIC_PATHS = ("/", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PUBLIC_PREFIXES = ("/static/", "/static-offline-docs/")
TOKEN_ENV = "MEMSCAN_TOKEN"


def load_token(token_file: str | Path | None = None, env: str = TOKEN_ENV) -> str | None:
    """The bearer token: the first line of `token_file`, else the environment variable `env`, else None."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise MemscanError(f"{token_file}: cannot read the token ({exc})") from exc
        if not token:
            raise MemscanError(f"{token_file}: the token file is empty")
        return token
    return os.environ.get(env) or None


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


async def _send_error(send, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": reason, "detail": None}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
    })
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: token (when set), at most `max_concurrency` requests in flight, bodies of at
    most `max_body_bytes` that arrive within `body_timeout_s`; each refusal a JSON 4xx/503."""

    def __init__(self, app, *, token: str | None, max_concurrency: int, max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.token = token
        self.max_concurrency = max_concurrency
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.token is not None and not self._public(scope) and not self._authorized(scope):
            await _send_error(send, 401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            return
        if self.in_flight >= self.max_concurrency:
            await _send_error(send, 503, f"over {self.max_concurrency} requests in flight; retry", {"Retry-After": "1"})
            return
        self.in_flight += 1
        try:
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            replayed = False

            async def replay():
                # The body once, whole; after it, the client's own messages (its disconnect).
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    def _public(scope) -> bool:
        """A GET of the page, the docs or their static files: open with a token set too."""
        path = scope["path"]
        return scope["method"] in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES))

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, credentials = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode())

    async def _read_body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None once a 413 (too large) or 408 (too slow) has been sent."""
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:  # refused before a byte is read
            await _send_error(send, 413, f"request body over {self.max_body_bytes} bytes")
            return None
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.0))
            except asyncio.TimeoutError:
                await _send_error(send, 408, f"request body not received within {self.body_timeout_s:g} s")
                return None
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                await _send_error(send, 413, f"request body over {self.max_body_bytes} bytes")
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
