"""The stdio transport answers every frame: what the SDK's reader would drop without a word (so the client waits for
its own timeout) gets a JSON-RPC error with the request's id when it can be read, and the server keeps serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest

from aims_billing_mcp import stdio_guard
from aims_billing_mcp.stdio_guard import read_frame, request_id_of, serve_lines
from tests.support.zygote import spawn

INITIALIZE = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "raw", "version": "1"}}}


def call(request_id: Any, arguments: str) -> str:
    return ('{"jsonrpc":"2.0","id":' + json.dumps(request_id) + ',"method":"tools/call","params":{"name":'
            '"quote_usage","arguments":' + arguments + "}}")


HOSTILE_FRAMES = [
    pytest.param(call(2, '{"customer":"cus_x","units":' + "9" * 4400 + "}"), 2, types.PARSE_ERROR, id="4400-digits"),
    pytest.param(call(3, '{"customer":' + "[" * 100_000 + "]" * 100_000 + "}"), 3, types.PARSE_ERROR,
                 id="nested-100000-deep"),
    pytest.param('[{"jsonrpc":"2.0","id":4,"method":"tools/list"}]', 4, types.INVALID_REQUEST, id="batch"),
    pytest.param('{"jsonrpc":"2.0","id":"r-5","method":123}', "r-5", types.INVALID_REQUEST, id="method-not-string"),
    pytest.param('{"jsonrpc":"2.0","id":6,"method":"tools/list"', 6, types.PARSE_ERROR, id="truncated"),
    pytest.param(call(7, '{"customer":"cus_x","units":"\\ud800"}'), 7, types.PARSE_ERROR, id="lone-surrogate"),
    pytest.param("not json at all", None, types.PARSE_ERROR, id="garbage"),
]


@pytest.mark.parametrize(("frame", "request_id", "code"), HOSTILE_FRAMES)
def test_a_frame_the_sdk_would_drop_is_recognised_with_its_id(frame: str, request_id: Any, code: int) -> None:
    problem = read_frame(frame)
    assert isinstance(problem, tuple) and problem[0] == code
    found, is_request = request_id_of(frame)
    assert is_request
    assert found == ([request_id] if frame.startswith("[") else request_id)


@pytest.mark.parametrize("frame", [json.dumps(INITIALIZE), '{"jsonrpc":"2.0","method":"notifications/initialized"}',
                                   call(9, '{"customer":"cus_x","units":"\\u00e9\\ud83d\\ude00"}'), ""])
def test_a_frame_the_sdk_reads_is_passed_through(frame: str) -> None:
    assert not isinstance(read_frame(frame), tuple)


def test_a_notification_the_server_cannot_read_is_not_a_request() -> None:
    assert request_id_of('{"jsonrpc":"2.0","method":5}') == (None, False)


@pytest.fixture
def stdio_server(tmp_path: Path) -> Iterator[Any]:
    env = {**os.environ, "AIMS_BILLING_DB": str(tmp_path / "stdio.db"), "PYTHONUNBUFFERED": "1"}
    process = spawn([sys.executable, "-m", "aims_billing_mcp", "serve", "--no-webhooks"], cwd=tmp_path,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    yield process
    process.kill()
    process.communicate(timeout=10)


def exchange(process: Any, frames: list[str], answers: int) -> list[dict[str, Any]]:
    """Write the frames, then read `answers` lines (a missing answer fails the test by the pipe's EOF or timeout)."""
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("".join(frame + "\n" for frame in frames).encode())
    process.stdin.flush()
    return [json.loads(process.stdout.readline()) for _ in range(answers)]


def test_over_stdio_every_hostile_frame_gets_an_error_and_the_server_keeps_serving(
        stdio_server: subprocess.Popen[bytes]) -> None:
    exchange(stdio_server, [json.dumps(INITIALIZE), '{"jsonrpc":"2.0","method":"notifications/initialized"}'], 1)
    frames = [param.values[0] for param in HOSTILE_FRAMES]
    answers = exchange(stdio_server, [*frames, '{"jsonrpc":"2.0","id":99,"method":"tools/list"}'], len(frames) + 1)
    expected = [(param.values[1], param.values[2]) for param in HOSTILE_FRAMES]
    assert [(a["id"], a["error"]["code"]) for a in answers[:-1]] == expected
    assert answers[-1]["id"] == 99 and answers[-1]["result"]["tools"]


class _Chunks:
    """A stdin buffer whose reads return these chunks, as a pipe returns what the client has written so far."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)
        self.reads = 0

    def read1(self, size: int) -> bytes:
        self.reads += 1
        return self._chunks.pop(0) if self._chunks else b""


def _split_everywhere(data: bytes) -> list[list[bytes]]:
    return [[data]] + [[data[:cut], data[cut:]] for cut in range(1, len(data))]


WIRE = ('{"a":"caf\u00e9 \U0001f600"}\r\n{"b":1}\r{"c":2}\n\n{"d":"\\u2028"}\n'.encode()
        + b'{"e":"\xff\xfe bad utf-8"}\n{"last":"no newline"}')


@pytest.mark.anyio
@pytest.mark.parametrize("chunks", _split_everywhere(WIRE), ids=lambda c: f"cut-{len(c[0])}")
async def test_stdin_read_in_chunks_gives_the_lines_the_sdks_text_wrapper_gives(chunks: list[bytes]) -> None:
    import io

    from aims_billing_mcp.stdio_guard import ChunkedLines

    sdk = io.TextIOWrapper(io.BytesIO(WIRE), encoding="utf-8", errors="replace")  # what the SDK reads lines with
    expected = list(iter(sdk.readline, ""))
    assert [line async for line in ChunkedLines(_Chunks(chunks))] == expected


@pytest.mark.anyio
async def test_frames_written_together_are_read_in_one_worker_thread_hop() -> None:
    from aims_billing_mcp.stdio_guard import ChunkedLines

    frames = b"".join(f'{{"jsonrpc":"2.0","id":{i},"method":"ping"}}\n'.encode() for i in range(32))
    buffer = _Chunks([frames])
    lines = [line async for line in ChunkedLines(buffer)]
    assert len(lines) == 32 and buffer.reads == 2  # the chunk, then end of file


@pytest.mark.anyio
async def test_an_answer_is_written_and_flushed_whole_in_utf8() -> None:
    import io

    from aims_billing_mcp.stdio_guard import FramedOut

    out = io.BytesIO()
    framed = FramedOut(out)
    await framed.write('{"text":"caf\u00e9"}')
    await framed.write("\n")
    assert out.getvalue() == b""  # nothing half-written before the flush
    await framed.flush()
    assert out.getvalue() == '{"text":"caf\u00e9"}\n'.encode()


class Lines:
    """Stdin's lines, as ChunkedLines gives them."""

    def __init__(self, *lines: str) -> None:
        self._lines = [line + "\n" for line in lines]

    def __aiter__(self) -> Lines:
        return self

    async def __anext__(self) -> str:
        if not self._lines:
            raise StopAsyncIteration
        return self._lines.pop(0)


class Written:
    """Stdout, as FramedOut takes it: each answer written, then flushed."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.flushed = anyio.Event()

    async def write(self, text: str) -> None:
        self.frames.append(text)

    async def flush(self) -> None:
        self.flushed.set()


@pytest.mark.anyio
@pytest.mark.parametrize("streams", ["the SDK's", "plain memory"])
async def test_each_frame_is_parsed_once_and_passed_on_or_answered(
        streams: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if streams == "plain memory":  # an SDK without its context streams
        monkeypatch.setattr(stdio_guard, "_streams", anyio.create_memory_object_stream)
    out = Written()

    with anyio.fail_after(10):
        async with serve_lines(Lines('{"jsonrpc":"2.0","id":1,"method":"ping"}', "",
                                     '{"jsonrpc":"2.0","id":2,"method":'), out) as (read_stream, write_stream):
            ping = await read_stream.receive()
            blank = await read_stream.receive()  # as the SDK's reader does: its parse error, for the server
            await out.flushed.wait()
            await write_stream.aclose()

    assert isinstance(ping.message, types.JSONRPCRequest) and ping.message.id == 1
    assert isinstance(blank, ValueError)
    [answer] = [json.loads(frame) for frame in out.frames]
    assert answer["id"] == 2 and answer["error"]["code"] == types.PARSE_ERROR
