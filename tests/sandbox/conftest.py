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
def client(app: Starlette) -> TestClient:
    return TestClient(app, headers=AUTH)


def post(client: TestClient, path: str, data: dict[str, str] | None = None, **headers: str) -> Any:
    """POST form data; returns the response (callers check status and json)."""
    return client.post(path, data=data or {}, headers=headers)


def ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def product(client: TestClient) -> dict[str, Any]:
    return ok(post(client, "/v1/products", {"name": "Pro plan"}))


@pytest.fixture
def monthly(client: TestClient, product: dict[str, Any]) -> dict[str, Any]:
    return ok(post(client, "/v1/prices", {
        "product": product["id"], "currency": "usd", "unit_amount": "2000",
        "recurring[interval]": "month", "lookup_key": "pro_monthly",
    }))


@pytest.fixture
def one_time(client: TestClient, product: dict[str, Any]) -> dict[str, Any]:
    data = {"product": product["id"], "currency": "usd", "unit_amount": "1500"}
    return ok(post(client, "/v1/prices", data))
