"""The two real transports: stdio in a subprocess (what ACHEEVY and Claude Desktop launch) and streamable HTTP
(with and without the bearer token)."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from aims_billing_mcp.http_transport import build_http_app, loopback_socket
from tests.conftest import ok, serving_http

pytestmark = pytest.mark.anyio


async def test_stdio_subprocess_lists_tools_and_answers_a_call(tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "aims_billing_mcp", "serve"],
        env={"AIMS_BILLING_DB": str(tmp_path / "stdio.db"), "PYTHONUNBUFFERED": "1"}, cwd=str(tmp_path),
    )
    with anyio.fail_after(60):
        async with Client(params) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            out = ok(await client.call_tool("create_customer", {"email": "stdio@example.com"}))
    assert {"create_customer", "retrieve_balance", "list_invoices"} <= names
    assert out["customer"]["id"].startswith("cus_")


async def test_streamable_http_requires_the_bearer_token_when_one_is_set(make_server: Any) -> None:
    token = "s3cret-token-for-tests"
    with anyio.fail_after(60):
        async with serving_http(make_server(), token=token) as base:
            url = f"{base}/mcp"
            async with httpx.AsyncClient() as plain:
                refused = await plain.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
                wrong = await plain.post(url, json={}, headers={"Authorization": "Bearer nope"})
            authed = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
            async with Client(streamable_http_client(url, http_client=authed)) as client:
                names = {tool.name for tool in (await client.list_tools()).tools}
                out = ok(await client.call_tool("retrieve_balance", {}))
    assert (refused.status_code, wrong.status_code) == (401, 401)
    assert token not in refused.text
    assert "create_checkout_session" in names and out["mode"] == "sandbox"


async def test_streamable_http_without_a_token_serves_loopback(make_server: Any) -> None:
    with anyio.fail_after(60):
        async with serving_http(make_server()) as base, Client(f"{base}/mcp") as client:
            out = ok(await client.call_tool("create_product", {"name": "Over HTTP"}))
    assert out["product"]["name"] == "Over HTTP"


def test_a_non_loopback_bind_without_a_token_is_refused(make_server: Any) -> None:
    with pytest.raises(ValueError, match="AIMS_BILLING_HTTP_TOKEN"):
        build_http_app(make_server(), host="0.0.0.0", token=None)


async def test_a_connection_to_a_loopback_socket_is_sent_without_nagles_delay() -> None:
    """The companion endpoint's socket (and the tests' servers): asyncio sets TCP_NODELAY on each connection only
    when the socket names TCP as its protocol; without it every answer waited ~40 ms for the delayed ACK."""
    accepted: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    sock = loopback_socket(0)
    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    async with server:
        stream = await anyio.connect_tcp("127.0.0.1", sock.getsockname()[1])
        with anyio.fail_after(10):
            while not accepted:
                await anyio.sleep(0.001)
        await stream.aclose()
    assert accepted and accepted[0] != 0
