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

import mcp_types as types
import pytest

from aims_billing_mcp.stdio_guard import frame_problem, request_id_of

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
    problem = frame_problem(frame)
    assert problem is not None and problem[0] == code
    found, is_request = request_id_of(frame)
    assert is_request
    assert found == ([request_id] if frame.startswith("[") else request_id)


@pytest.mark.parametrize("frame", [json.dumps(INITIALIZE), '{"jsonrpc":"2.0","method":"notifications/initialized"}',
                                   call(9, '{"customer":"cus_x","units":"\\u00e9\\ud83d\\ude00"}'), ""])
def test_a_frame_the_sdk_reads_is_passed_through(frame: str) -> None:
    assert frame_problem(frame) is None


def test_a_notification_the_server_cannot_read_is_not_a_request() -> None:
    assert request_id_of('{"jsonrpc":"2.0","method":5}') == (None, False)


@pytest.fixture
def stdio_server(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "AIMS_BILLING_DB": str(tmp_path / "stdio.db"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "aims_billing_mcp", "serve", "--no-webhooks"], cwd=tmp_path,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    yield process
    process.kill()
    process.communicate(timeout=10)


def exchange(process: subprocess.Popen[bytes], frames: list[str], answers: int) -> list[dict[str, Any]]:
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
