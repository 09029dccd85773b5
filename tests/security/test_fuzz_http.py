"""Fuzz every HTTP route of `serve --http` over real HTTP (uvicorn on a free loopback port): Stripe webhooks (signed
with the secret the server verifies with, so odd shapes get past the signature), the x402 paid route, the ACP REST
seller, ACP's MCP binding and MCP itself. For every request: never a 5xx; a refusal (4xx) changes no table but
audit_log. The default run is short (AIMS_FUZZ_EXAMPLES per route, 8 by default); `-m slow` runs
AIMS_FUZZ_SLOW_EXAMPLES (200) per route.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aims_billing_mcp.app import build_server
from aims_billing_mcp.sandbox import SANDBOX_WEBHOOK_SECRET, create_app
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.webhooks import sign_webhook_payload
from tests.conftest import serving_http, table_digests

EXAMPLES = int(os.environ.get("AIMS_FUZZ_EXAMPLES", "8"))
SLOW_EXAMPLES = int(os.environ.get("AIMS_FUZZ_SLOW_EXAMPLES", "200"))
ACP_KEY = "acp-fuzz-key"
ACP_HEADERS = {"Authorization": f"Bearer {ACP_KEY}", "API-Version": "2026-04-17", "Content-Type": "application/json"}

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40),
                      st.sampled_from([2**63, -(2**63), 10**30, "\u202e", "\x00", "sk_test_" + "b" * 24, "x" * 5000]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                          max_leaves=12)
EVENT_TYPES = ["checkout.session.completed", "customer.subscription.updated", "customer.subscription.deleted",
               "invoice.paid", "invoice.payment_failed", "payment_intent.succeeded", "ping"]


def odd_event() -> st.SearchStrategy[dict[str, Any]]:
    """An event of Stripe's outline whose fields are each sometimes right, sometimes of another type."""
    return st.fixed_dictionaries({
        "id": st.one_of(st.builds(lambda n: f"evt_fuzz_{n}", st.integers(0, 10**6)), json_value),
        "type": st.one_of(st.sampled_from(EVENT_TYPES), json_value),
        "created": st.one_of(st.just(int(time.time())), json_value),
        "data": st.one_of(st.fixed_dictionaries({"object": st.one_of(
            st.dictionaries(st.sampled_from(["id", "customer", "status", "metadata", "items", "amount",
                                             "amount_received", "subscription", "mode"]), json_value, max_size=6),
            json_value)}), json_value),
    }, optional={"object": st.just("event"), "livemode": json_value, "api_version": json_value})


def garbage_body() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=200), st.builds(lambda v: json.dumps(v).encode(), json_value),
                     st.sampled_from([b"", b"{", b"[" * 50_000 + b"]" * 50_000, b'{"a":' + b"9" * 5000 + b"}",
                                      b"\xff\xfe", b'{"\\ud800": 1}']))


@dataclass
class HttpFuzzer:
    portal: BlockingPortal
    base: str
    db: Any
    counts: Counter[str] = field(default_factory=Counter)

    def fingerprint(self) -> dict[str, str]:
        return table_digests(self.db)

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
        """`acp_idempotency` may change on an authenticated ACP refusal: ACP §6 stores a 4xx answer for its key so
        a retry replays it (bounded by the body cap, and only for a caller holding an API key)."""
        before = self.fingerprint()
        with httpx.Client(base_url=self.base, timeout=30) as http:
            response = http.request(method, path, content=body, headers=headers or {})
        self.counts["requests"] += 1
        assert response.status_code < 500, f"{method} {path} -> {response.status_code}: {response.text[:300]}"
        if response.status_code >= 400:
            self.counts["clean refusals"] += 1
            changed = {t for t, digest in self.fingerprint().items() if before.get(t) != digest}
            if (headers or {}).get("Authorization") == ACP_HEADERS["Authorization"]:
                changed.discard("acp_idempotency")
            assert not changed, f"{method} {path} refused ({response.status_code}) but changed {changed}"
        return response


@pytest.fixture(scope="module")
def http_fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpFuzzer]:
    folder = tmp_path_factory.mktemp("http-fuzz")
    app = create_app(db_path=":memory:")
    config = Settings(_env_file=None, aims_billing_db=folder / "billing.db",  # type: ignore[call-arg]
                      aims_billing_flush_interval_seconds=0, aims_billing_acp_api_keys=[ACP_KEY])
    server = build_server(config, sandbox_app=app, retry_delay_scale=0.0)
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(serving_http(server)) as base:
        fuzz = HttpFuzzer(portal, base, folder / "billing.db")
        yield fuzz
        print(f"\nhttp fuzz: {dict(fuzz.counts)}")
    app.state.sandbox.close()


def signed(body: bytes) -> dict[str, str]:
    return {"Stripe-Signature": sign_webhook_payload(body.decode("utf-8", "replace"), SANDBOX_WEBHOOK_SECRET),
            "Content-Type": "application/json"}


def mcp_frame(value: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "debit_agent_wallet", "arguments": value}}).encode()


ROUTES: dict[str, Callable[[HttpFuzzer, Any], Any]] = {
    "webhook-odd-signed-event": lambda f, event: f.request(
        "POST", "/webhooks/stripe", body=(b := json.dumps(event).encode()), headers=signed(b)),
    "webhook-garbage": lambda f, body: f.request("POST", "/webhooks/stripe", body=body, headers=signed(body)),
    "x402-credits-query": lambda f, query: f.request("GET", f"/x402/credits?{httpx.QueryParams(query[0])}",
                                                     headers=query[1]),
    "acp-create": lambda f, body: f.request("POST", "/acp/checkout_sessions", body=body,
                                            headers={**ACP_HEADERS, "Idempotency-Key": hashlib.md5(body).hexdigest()}),
    "acp-session-ops": lambda f, op: f.request("POST", f"/acp/checkout_sessions/{op[0]}{op[1]}", body=op[2],
                                               headers={**ACP_HEADERS, "Idempotency-Key": "k-" + op[0][:40]}),
    "acp-mcp-binding": lambda f, body: f.request("POST", "/acp/mcp", body=body, headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}),
    "mcp": lambda f, body: f.request("POST", "/mcp", body=body, headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}),
}

STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "webhook-odd-signed-event": odd_event(),
    "webhook-garbage": garbage_body(),
    "x402-credits-query": st.tuples(
        st.dictionaries(st.sampled_from(["agent_id", "luc", "quote_id", "network"]),
                        st.one_of(st.text(max_size=20), st.sampled_from(["²", "9" * 5000, "-1", "0", "1e3", "alice"])),
                        max_size=4),
        st.dictionaries(st.sampled_from(["PAYMENT-SIGNATURE", "X-PAYMENT"]),
                        st.one_of(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
                                          max_size=200), st.just("e30="), st.just("x" * 20_000)), max_size=1)),
    "acp-create": garbage_body(),
    "acp-session-ops": st.tuples(st.one_of(st.text(alphabet="abcdefghijklmnop_0123456789", min_size=1, max_size=30),
                                           st.just("cs_" + "9" * 300)),
                                 st.sampled_from(["", "/complete", "/cancel"]), garbage_body()),
    "acp-mcp-binding": st.one_of(garbage_body(), st.builds(mcp_frame, json_value)),
    "mcp": st.one_of(garbage_body(), st.builds(mcp_frame, json_value)),
}


def fuzz_route(fuzzer: HttpFuzzer, route: str, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(STRATEGIES[route])
    def run(value: Any) -> None:
        ROUTES[route](fuzzer, value)

    run()


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_http_route_answers_hostile_requests_without_a_5xx_and_a_refusal_writes_nothing(
        http_fuzzer: HttpFuzzer, route: str) -> None:
    fuzz_route(http_fuzzer, route, EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_http_route_survives_a_long_fuzz_run(http_fuzzer: HttpFuzzer, route: str) -> None:
    fuzz_route(http_fuzzer, route, SLOW_EXAMPLES)
