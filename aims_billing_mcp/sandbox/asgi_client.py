"""Call an ASGI app in process: one HTTP request in, status, headers and body out, no socket.

Used to deliver webhooks to an in-process server, and reusable by an SDK ``HTTPClient`` that routes
the real ``stripe`` SDK into an ASGI app. Runs under any anyio backend (asyncio in practice).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio

ASGIApp = Any  # an ASGI 3 callable: ``async app(scope, receive, send)``
Message = dict[str, Any]


async def call_asgi(
    app: ASGIApp,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | str | None,
) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """Send one request to ``app`` and collect its response as ``(body, status, headers)``.

    ``url`` is absolute (``http://host/path?query``) or a path. The body goes in one
    ``http.request`` message; after the response completes, ``receive`` reports a disconnect.
    An exception raised by the app propagates; an app that returns without starting a response is
    a ``RuntimeError``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme or "http"
    host = parts.hostname or "testserver"
    port = parts.port or (443 if scheme == "https" else 80)
    payload = body.encode() if isinstance(body, str) else (body or b"")
    raw_headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
    names = {k for k, _ in raw_headers}
    if b"host" not in names:
        default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
        raw_headers.insert(0, (b"host", (host if default_port else f"{host}:{port}").encode("latin-1")))
    if b"content-length" not in names and (payload or method.upper() in ("POST", "PUT", "PATCH")):
        raw_headers.append((b"content-length", str(len(payload)).encode()))
    raw_path = parts.path or "/"
    scope: Message = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": scheme,
        "path": unquote(raw_path),
        "raw_path": raw_path.encode("latin-1"),
        "query_string": parts.query.encode("latin-1"),
        "root_path": "",
        "headers": raw_headers,
        "client": ("127.0.0.1", 0),
        "server": (host, port),
        "extensions": {},
    }
    request_sent = False
    response_done = anyio.Event()
    status: int | None = None
    response_headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await response_done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            response_headers.extend((bytes(k), bytes(v)) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                response_done.set()

    try:
        await app(scope, receive, send)
    finally:
        response_done.set()
    if status is None:
        raise RuntimeError("the ASGI app returned without sending a response")
    return b"".join(chunks), status, response_headers
