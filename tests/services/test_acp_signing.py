"""ACP request signing: with a signing secret, every checkout request (REST headers `Signature` / `Timestamp`, MCP
`meta.signature` / `meta.timestamp`) must be signed (HMAC-SHA256 over `<Timestamp>.<body>`, base64url) and fresh
(300 s); missing, forged or stale → 401 with ACP's Error naming the cause. Without a secret nothing is checked."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

from aims_billing_mcp.services.acp_protocol import sign_request, signed_payload
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store, utc_iso
from tests.conftest import Clock, commerce_stack, serving_http
from tests.services.test_acp import conforms
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)
from tests.tools.test_wallets import give_tier

pytestmark = pytest.mark.anyio

KEY = "acp_test_key_1"
SECRET = "whsec_acp_signing_test"
BODY = {"currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {}, "metadata": {"agent_id": "buyer"}}


class Seller:
    def __init__(self, http: httpx.AsyncClient, clock: Clock) -> None:
        self.http, self.clock, self.keys = http, clock, 0

    def headers(self, body: bytes, *, sign: bool = True, secret: str = SECRET, skew: float = 0,
                drop: str | None = None) -> dict[str, str]:
        self.keys += 1
        out = {"API-Version": "2026-04-17", "Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
               "Idempotency-Key": f"k-{self.keys}"}
        if sign:
            timestamp = utc_iso(self.clock() + skew)
            out["Timestamp"] = timestamp
            out["Signature"] = sign_request(secret, timestamp, body)
            if drop:
                del out[drop]
        return out

    async def create(self, **options: Any) -> httpx.Response:
        raw = json.dumps(BODY).encode()
        return await self.http.post("/acp/checkout_sessions", content=raw, headers=self.headers(raw, **options))


def make_seller(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store,
                secret: str | None) -> Callable[[], Any]:
    async def build() -> AsyncIterator[Seller]:
        clock = Clock()
        async with (commerce_stack(make_settings(), sandbox_app, store) as stack,
                    stack.acp_seller(KEY, clock=clock, signing_secret=secret) as (http, _acp)):
            yield Seller(http, clock)

    return build


@pytest.fixture
async def signed(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> AsyncIterator[Seller]:
    async for seller in make_seller(make_settings, sandbox_app, store, SECRET)():
        yield seller


@pytest.fixture
async def unsigned(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> AsyncIterator[Seller]:
    async for seller in make_seller(make_settings, sandbox_app, store, None)():
        yield seller


def refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    conforms(response.json(), "Error")
    assert response.json()["type"] == "invalid_request"
    assert response.json()["code"] == code


async def test_a_validly_signed_request_is_served(signed: Seller) -> None:
    created = await signed.create()
    assert created.status_code == 201, created.text
    session_id = created.json()["id"]
    got = await signed.http.get(f"/acp/checkout_sessions/{session_id}", headers=signed.headers(b""))
    assert got.status_code == 200, got.text
    # the signature may be sent with base64 padding too, and the timestamp with an offset
    raw = b""
    headers = signed.headers(raw)
    headers["Timestamp"] = headers["Timestamp"].replace("Z", "+00:00")
    headers["Signature"] = sign_request(SECRET, headers["Timestamp"], raw) + "="
    assert (await signed.http.get(f"/acp/checkout_sessions/{session_id}", headers=headers)).status_code == 200


async def test_missing_signature_or_timestamp_is_401(signed: Seller) -> None:
    refused(await signed.create(sign=False), "missing_signature")
    refused(await signed.create(drop="Signature"), "missing_signature")
    refused(await signed.create(drop="Timestamp"), "missing_signature")
    refused(await signed.http.get("/acp/checkout_sessions/cs_x", headers=signed.headers(b"", sign=False)),
            "missing_signature")


async def test_a_forged_signature_is_401(signed: Seller) -> None:
    refused(await signed.create(secret="not-the-secret"), "invalid_signature")
    raw = json.dumps(BODY).encode()
    headers = signed.headers(raw)
    tampered = json.dumps({**BODY, "metadata": {"agent_id": "thief"}}).encode()  # signed body swapped
    refused(await signed.http.post("/acp/checkout_sessions", content=tampered, headers=headers), "invalid_signature")
    headers = signed.headers(raw)
    headers["Signature"] = "!!not base64!!"
    refused(await signed.http.post("/acp/checkout_sessions", content=raw, headers=headers), "invalid_signature")
    headers = signed.headers(raw)
    headers["Timestamp"] = "yesterday"
    refused(await signed.http.post("/acp/checkout_sessions", content=raw, headers=headers), "invalid_timestamp")


async def test_a_stale_or_future_timestamp_is_401(signed: Seller) -> None:
    refused(await signed.create(skew=-301), "stale_timestamp")
    refused(await signed.create(skew=301), "stale_timestamp")
    assert (await signed.create(skew=-299)).status_code == 201


async def test_without_a_secret_nothing_is_checked(unsigned: Seller) -> None:
    assert (await unsigned.create(sign=False)).status_code == 201
    assert (await unsigned.create(secret="anything")).status_code == 201


async def test_the_mcp_binding_checks_meta_signature_and_the_app_wires_the_setting(make_server: Any) -> None:
    server = make_server(aims_billing_acp_api_keys=[KEY], aims_billing_acp_signing_secret=SECRET)
    async with serving_http(server, token="mcp-only") as base:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        await server.state.ledger.create_wallet("buyer", "cus_team", None, "w-buyer")
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"})
        async with Client(streamable_http_client(f"{base}/acp/mcp", http_client=http)) as client:
            timestamp = utc_iso(time.time())
            meta = {"api_version": "2026-04-17", "timestamp": timestamp,
                    "signature": sign_request(SECRET, timestamp, signed_payload(BODY))}
            answer = await client.call_tool("create_checkout_session", {"meta": meta, "payload": BODY})
            assert not answer.is_error, answer.content
            session_id = answer.structured_content["id"]  # type: ignore[index]
            get_meta = {"api_version": "2026-04-17", "timestamp": timestamp,
                        "signature": sign_request(SECRET, timestamp, b"")}
            got = await client.call_tool("get_checkout_session", {"meta": get_meta, "id": session_id})
            assert not got.is_error, got.content
            for bad, code in (({"api_version": "2026-04-17"}, "missing_signature"),
                              ({**meta, "signature": sign_request("wrong", timestamp, signed_payload(BODY))},
                               "invalid_signature")):
                with pytest.raises(MCPError) as caught:
                    await client.call_tool("create_checkout_session", {"meta": bad, "payload": BODY})
                assert caught.value.data["code"] == code  # type: ignore[index]
                conforms(caught.value.data, "Error")
        async with httpx.AsyncClient(base_url=base) as plain:
            rest = await plain.post("/acp/checkout_sessions", json=BODY, headers={
                "API-Version": "2026-04-17", "Authorization": f"Bearer {KEY}", "Idempotency-Key": "k"})
        refused(rest, "missing_signature")
