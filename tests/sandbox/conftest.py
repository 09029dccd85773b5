"""Fixtures: a fresh in-memory sandbox and a TestClient that authenticates like the SDK."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY

AUTH = {"Authorization": f"Bearer {SANDBOX_SECRET_KEY}"}


@pytest.fixture
def app(sandbox_app: Starlette) -> Starlette:
    """The shared in-memory sandbox app (tests/conftest.py), under the name these tests use."""
    return sandbox_app


@pytest.fixture
def api(app: Starlette) -> TestClient:
    """The sandbox's Stripe API over HTTP (a TestClient authenticated like the SDK). Named `api`, not `client`:
    tests/conftest.py's `client` is an MCP client, and a fixture name means one thing at every level."""
    return TestClient(app, headers=AUTH)


def post(api: TestClient, path: str, data: dict[str, str] | None = None, **headers: str) -> Any:
    """POST form data; returns the response (callers check status and json)."""
    return api.post(path, data=data or {}, headers=headers)


def ok_json(response: Any) -> dict[str, Any]:
    """The JSON body of an HTTP answer that must be 200 (tests/conftest.py's `ok` is the MCP tool result's)."""
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def product(api: TestClient) -> dict[str, Any]:
    return ok_json(post(api, "/v1/products", {"name": "Pro plan"}))


@pytest.fixture
def monthly(api: TestClient, product: dict[str, Any]) -> dict[str, Any]:
    return ok_json(post(api, "/v1/prices", {
        "product": product["id"], "currency": "usd", "unit_amount": "2000",
        "recurring[interval]": "month", "lookup_key": "pro_monthly",
    }))


@pytest.fixture
def one_time(api: TestClient, product: dict[str, Any]) -> dict[str, Any]:
    data = {"product": product["id"], "currency": "usd", "unit_amount": "1500"}
    return ok_json(post(api, "/v1/prices", data))
