"""Stdio transport that answers every frame: the SDK's reader drops a line it cannot parse (an integer of 4,400
digits, nesting 100,000 deep, a JSON-RPC batch, a malformed message) without a word, so the client waits for its own
timeout. Our server is what the agent sees, so this serves stdio as the SDK's `stdio_server` does (the same streams,
the same parse of each line, the same answers written), except that a line the SDK would drop is answered here with
a JSON-RPC error carrying the request's id when the id can be read (`-32700` parse error, `-32600` invalid request),
or `id: null` and one log line when it cannot. A notification (no id) is never answered, as JSON-RPC requires; it is
logged. Each line is parsed once: checked first and then parsed again by the SDK's reader, a batch of 100 events
(10 KB) was parsed twice.

The SDK's streams wrap stdin and stdout in `anyio.wrap_file`, which spends one worker-thread hop per line read and
two (write, flush) per answer: with 32 calls in flight that is ~100 thread hand-offs (and GIL hand-offs) per 32
calls. Here stdin is read a chunk of frames at a time (`ChunkedLines`, one hop per read, decoded as the SDK decodes:
UTF-8 with errors replaced, universal newlines) and each answer is written and flushed in one hop (`FramedOut`).
"""

from __future__ import annotations

import codecs
import io
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import mcp_types as types
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from . import jsonsafe

log = logging.getLogger(__name__)

_streams: Any
try:  # the SDK's own (its stdio transport's): each message carries its sender's context
    from mcp.shared._context_streams import create_context_streams as _streams
except ImportError:  # an SDK without them: plain memory streams, which the SDK's readers also take
    _streams = anyio.create_memory_object_stream

RequestId = str | int | None
MAX_ID_DIGITS = 18  # a JSON-RPC id we answer must fit the SDK's strict int


class _Replies:
    """Answers to the frames the SDK would drop, on the transport's write stream."""

    def __init__(self, write_stream: Any) -> None:
        self._write_stream = write_stream

    async def answer(self, line: str, code: int, message: str) -> None:
        request_id, is_request = request_id_of(line)
        if isinstance(request_id, list):  # a batch: one answer per request in it
            for item in request_id:
                await self._reply(item, code, message)
            return
        if not is_request:
            log.warning("stdio: dropped a notification the server cannot read (%s): %s", message, line[:120])
            return
        if request_id is None:
            log.warning("stdio: answered an unreadable frame with id null (%s): %s", message, line[:120])
        await self._reply(request_id, code, message)

    async def _reply(self, request_id: RequestId, code: int, message: str) -> None:
        error = types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))
        await self._write_stream.send(SessionMessage(error))


def read_frame(line: str) -> SessionMessage | Exception | tuple[int, str]:
    """The SDK reader's parse of `line`: its message; or, for a blank line, the parse error (which the SDK's reader
    passes on to the server, which goes on); or, for a line the SDK would drop, the JSON-RPC error code and a
    message saying what to fix."""
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except (ValueError, RecursionError) as exc:
        if not line.strip():
            return exc
        if isinstance(exc, ValidationError):
            errors = exc.errors()
            first: dict[str, Any] = dict(errors[0]) if errors else {}
            kind = str(first.get("type", ""))
            if kind.startswith("json_") or kind == "recursion_loop":
                return (types.PARSE_ERROR,
                        f"parse error: {first.get('msg', 'invalid JSON')}; send one JSON object per line")
            if line.lstrip().startswith("["):
                return types.INVALID_REQUEST, "JSON-RPC batches are not supported by MCP: send one message per line"
            return types.INVALID_REQUEST, f"invalid request: not a JSON-RPC 2.0 message ({_where(first)})"
        return types.PARSE_ERROR, f"parse error: {type(exc).__name__}; send one JSON object per line"


def _where(error: Any) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()) if not isinstance(part, int))
    return f"{location}: {error.get('msg', 'invalid')}" if location else str(error.get("msg", "invalid"))


def request_id_of(line: str) -> tuple[Any, bool]:
    """The id of the request in `line` as far as it can be read, and whether it is a request at all (a message with
    no id is a notification). A batch gives the list of its requests' ids. Never raises."""
    try:
        value = jsonsafe.loads(line)
    except ValueError:  # too deep, a huge number, a lone surrogate, not JSON: scan for the id instead
        return _top_level_id(line)
    if isinstance(value, list):
        ids = [_valid_id(item.get("id")) for item in value if isinstance(item, dict) and "id" in item]
        return ids, bool(ids)
    if isinstance(value, dict):
        return _valid_id(value.get("id")), "id" in value or "method" not in value
    return None, True


def _valid_id(value: Any) -> RequestId:
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


def _top_level_id(line: str) -> tuple[RequestId, bool]:
    """Find `"id": <string or integer>` at depth 1 of a line json cannot load (too deep, a huge number), scanning
    strings and brackets without building anything."""
    depth, i, n, key, after_colon = 0, 0, len(line), None, False
    while i < n:
        ch = line[i]
        if ch == '"':
            end = i + 1
            while end < n and line[end] != '"':
                end += 2 if line[end] == "\\" else 1
            text = line[i + 1:end]
            if depth == 1 and after_colon and key == "id":
                return text, True
            if depth == 1 and not after_colon:
                key = text
            i = end + 1
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == ":" and depth == 1:
            after_colon = True
        elif ch == "," and depth == 1:
            key, after_colon = None, False
        elif depth == 1 and after_colon and key == "id" and (ch.isdigit() or ch == "-"):
            end = i + 1
            while end < n and line[end].isdigit():
                end += 1
            digits = line[i:end]
            return (int(digits) if len(digits.lstrip("-")) <= MAX_ID_DIGITS else None), True
        i += 1
    return None, True


@asynccontextmanager
async def guarded_stdio_server() -> AsyncIterator[tuple[Any, Any]]:
    """The SDK's stdio streams, with every frame it would drop answered here. Stdin and stdout are claimed as the
    SDK claims them (fd 0 diverted to the null device and fd 1 to stderr while serving, so a child process can
    neither read our frames nor write into the wire)."""
    stdin_buffer, release_stdin = _claim(0)
    try:
        stdout_buffer, release_stdout = _claim(1)
        try:
            async with serve_lines(ChunkedLines(stdin_buffer), FramedOut(stdout_buffer)) as streams:
                yield streams
        finally:
            if release_stdout is not None:
                release_stdout()
    finally:
        if release_stdin is not None:
            release_stdin()


@asynccontextmanager
async def serve_lines(lines: Any, out: Any) -> AsyncIterator[tuple[Any, Any]]:
    """The SDK's `stdio_server` over these lines and this output (its streams, its reader's parse of each line, its
    writer's answers), with each line the SDK's reader would drop answered instead (`read_frame`)."""
    read_writer, read_stream = _streams[SessionMessage | Exception](0)
    write_stream, write_reader = _streams[SessionMessage](0)
    replies = _Replies(write_stream)

    async def reader() -> None:
        try:
            async with read_writer:
                async for line in lines:
                    frame = read_frame(line)
                    if isinstance(frame, tuple):
                        await replies.answer(line, *frame)
                    else:
                        await read_writer.send(frame)
        except anyio.ClosedResourceError:
            await anyio.lowlevel.checkpoint()

    async def writer() -> None:
        try:
            async with write_reader:
                async for session_message in write_reader:
                    await out.write(session_message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n")
                    await out.flush()
        except anyio.ClosedResourceError:
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer)
        yield read_stream, write_stream


class ChunkedLines:
    """The lines of a binary stream, read on a worker thread a chunk at a time (whatever the client has written,
    up to CHUNK bytes: one thread hop for many frames) and decoded as the SDK's text wrapper decodes them (UTF-8,
    errors replaced; CRLF and a lone CR read as LF, also across chunks). Each line keeps its LF."""

    CHUNK = 1 << 16

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer
        self._decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(errors="replace"),
                                                     translate=True)
        self._lines: list[str] = []  # complete lines, in reverse order (pop from the end)
        self._partial = ""
        self._eof = False

    def __aiter__(self) -> ChunkedLines:
        return self

    async def __anext__(self) -> str:
        while not self._lines:
            if self._eof:
                raise StopAsyncIteration
            chunk: bytes = await anyio.to_thread.run_sync(self._read)
            self._eof = not chunk
            text = self._partial + self._decoder.decode(chunk, final=self._eof)
            *complete, self._partial = text.split("\n")
            lines = [line + "\n" for line in complete]
            if self._eof and self._partial:  # the last line, without its newline
                lines.append(self._partial)
                self._partial = ""
            self._lines = lines[::-1]
        return self._lines.pop()

    def _read(self) -> bytes:
        read = getattr(self._buffer, "read1", None) or self._buffer.read
        data: bytes = read(self.CHUNK)
        return data


class FramedOut:
    """The SDK writes each answer then flushes it: the text is kept at `write` and written and flushed in one
    worker-thread call at `flush` (UTF-8, as the SDK's text wrapper writes it)."""

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer
        self._pending: list[str] = []

    async def write(self, text: str) -> None:
        self._pending.append(text)

    async def flush(self) -> None:
        data = "".join(self._pending).encode("utf-8")
        self._pending.clear()
        if data:
            await anyio.to_thread.run_sync(self._write, data)

    def _write(self, data: bytes) -> None:
        self._buffer.write(data)
        self._buffer.flush()


def _claim(fd: int) -> tuple[Any, Callable[[], None] | None]:
    """The SDK's claim of a standard stream (fd 0 or 1): a private duplicate serves the wire, the fd itself points
    at the null device (stdin) or stderr (stdout) while serving; the buffer in place when it cannot be claimed."""
    stream = sys.stdin if fd == 0 else sys.stdout
    try:
        from mcp.server.stdio import _claim_fd, _open_stdin_diversion, _open_stdout_diversion

        if fd == 0:
            return _claim_fd(0, sys.stdin, "rb", _open_stdin_diversion)
        return _claim_fd(1, sys.stdout, "wb", _open_stdout_diversion)
    except (ImportError, RuntimeError, OSError):  # an SDK without the claim: the buffer in place, as v1 did
        return stream.buffer, None
