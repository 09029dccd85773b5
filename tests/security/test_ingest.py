"""Security promises of `POST /v1/usage/events` (ingest_http.py): only a key of AIMS_BILLING_INGEST_KEYS records
usage; a request without one (missing, wrong, the MCP token) is answered 401 and stores nothing at all, not even an
audit row; ingestion without configured keys is off (403); the key is never stored, logged or answered, and grants
nothing else (the MCP endpoint still wants its own token)."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import httpx
import pytest

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.ingest_http import IngestKeys, IngestRefused
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from tests.conftest import serving_http
from tests.tools.test_wallets import give_tier

pytestmark = pytest.mark.anyio

KEY = "ingest-key-0123456789abcdef"
EVENTS = [{"customer": "cus_team", "units": 100, "identifier": "u1"}]


def row_counts(store: Store) -> dict[str, int]:
    """Rows in every table, the audit log included."""
    tables = [r["name"] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: store.query(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"] for t in tables if t != "sqlite_sequence"}


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", f"Basic {KEY}", "Bearer mcp-token", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x",
    f"Bearer {KEY.upper()}", "Bearer ingest-key-other",
])
async def test_a_request_without_a_valid_ingest_key_is_401_and_stores_nothing(
        make_server: Callable[..., BillingServer], authorization: str | None) -> None:
    server = make_server(aims_billing_ingest_keys=f"other-key,{KEY}")
    async with serving_http(server, token="mcp-token") as base, httpx.AsyncClient(base_url=base) as http:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        before = row_counts(server.state.store)
        headers = {} if authorization is None else {"Authorization": authorization}
        for _ in range(5):
            answer = await http.post("/v1/usage/events", json=EVENTS, headers=headers)
            assert answer.status_code == 401, answer.text
            assert answer.headers["www-authenticate"].startswith("Bearer")
        assert row_counts(server.state.store) == before


async def test_a_refused_key_learns_nothing_about_the_policy(make_server: Callable[..., BillingServer]) -> None:
    server = make_server(aims_billing_ingest_keys=KEY, aims_billing_read_only=True)
    async with serving_http(server) as base, httpx.AsyncClient(base_url=base) as http:
        assert server.state is not None
        before = row_counts(server.state.store)
        answer = await http.post("/v1/usage/events", json=EVENTS, headers={"Authorization": "Bearer guess"})
        assert answer.status_code == 401 and "read" not in answer.text.lower()
        assert row_counts(server.state.store) == before


async def test_ingestion_without_configured_keys_is_off_and_stores_nothing(
        make_server: Callable[..., BillingServer]) -> None:
    server = make_server()
    async with serving_http(server) as base, httpx.AsyncClient(base_url=base) as http:
        assert server.state is not None
        before = row_counts(server.state.store)
        for authorization in ("Bearer", "Bearer anything", ""):
            answer = await http.post("/v1/usage/events", json=EVENTS, headers={"Authorization": authorization})
            assert (answer.status_code, answer.json()["code"]) == (403, "ingest_disabled")
        assert row_counts(server.state.store) == before


async def test_the_ingest_key_is_never_stored_or_answered_and_the_audit_row_names_its_digest(
        make_server: Callable[..., BillingServer], caplog: pytest.LogCaptureFixture) -> None:
    server = make_server(aims_billing_ingest_keys=KEY)
    async with serving_http(server, token="mcp-token") as base, httpx.AsyncClient(base_url=base) as http:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        answer = await http.post("/v1/usage/events", json=EVENTS, headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.json()["totals"]["accepted"] == 1
        assert KEY not in answer.text
        store = server.state.store
        query = "SELECT tool, caller, arguments FROM audit_log WHERE tool LIKE 'http:%'"
        with anyio.fail_after(5):  # the row is queued after the answer is sent
            while not store.query(query):
                await anyio.sleep(0.01)
        rows = store.query(query)
        assert [(r["tool"], r["caller"][:7]) for r in rows] == [("http:POST /v1/usage/events", "ingest:")]
        everything = [str(v) for t in row_counts(store) for r in store.query(f"SELECT * FROM {t}") for v in r.values()]
        assert not any(KEY in value for value in everything)
        assert KEY not in caplog.text


async def test_the_ingest_key_does_not_open_the_mcp_endpoint(make_server: Callable[..., BillingServer]) -> None:
    server = make_server(aims_billing_ingest_keys=KEY)
    async with serving_http(server, token="mcp-token") as base, httpx.AsyncClient(base_url=base) as http:
        answer = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                 headers={"Authorization": f"Bearer {KEY}", "Accept": "application/json"})
        assert answer.status_code == 401


def test_ingest_keys_are_secrets_compared_by_digest(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(aims_billing_ingest_keys=f" {KEY} , ,second-key")
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    assert {s.get_secret_value() for s in settings.secrets()} >= {KEY, "second-key"}
    keys = IngestKeys.from_settings(settings)
    assert KEY not in repr(vars(keys))  # only SHA-256 digests are kept
    assert keys.authenticate(f"Bearer {KEY}").startswith("ingest:")
    assert keys.authenticate("bearer second-key") != keys.authenticate(f"Bearer {KEY}")
    for wrong in (None, "Bearer", f"Token {KEY}", "Bearer \udcff"):
        with pytest.raises(IngestRefused) as refused:
            keys.authenticate(wrong)
        assert refused.value.status == 401 and KEY not in refused.value.message
