"""The HTTP transport's token check speaks to MCP clients: a 401 names the static bearer token (not an OAuth flow),
and OAuth discovery answers 404, so Inspector and remote connectors ask for a header instead of starting OAuth."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from aims_billing_mcp.http_transport import build_http_app

pytestmark = pytest.mark.anyio
TOKEN = "tok-for-auth-tests-123"


@pytest.fixture
async def http(make_server: Any) -> Any:
    app = build_http_app(make_server(), host="127.0.0.1", token=TOKEN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        yield client


async def test_a_request_without_the_token_is_told_to_send_a_bearer_header_not_to_do_oauth(http: Any) -> None:
    response = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    assert "resource_metadata" not in challenge
    assert "AIMS_BILLING_HTTP_TOKEN" in response.json()["message"] and TOKEN not in response.text


@pytest.mark.parametrize("path", ["/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp",
                                  "/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"])
async def test_oauth_discovery_answers_not_found_with_the_way_to_authenticate(http: Any, path: str) -> None:
    response = await http.get(path)
    assert response.status_code == 404
    assert "not OAuth" in response.json()["message"]
