"""Auth, headers, routing, error envelopes, lists, idempotency and fault injection over HTTP."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY, Sandbox, create_app

from .conftest import ok_json, post


def test_missing_api_key_is_401_with_stripe_wording(app: Starlette) -> None:
    response = TestClient(app).get("/v1/customers")
    assert response.status_code == 401
    assert response.json()["error"]["message"].startswith("You did not provide an API key")


def test_unknown_api_key_is_masked_in_the_401(app: Starlette) -> None:
    key = "sk_test_51NotARealKeyAtAll9876"
    response = TestClient(app).get("/v1/customers", headers={"Authorization": f"Bearer {key}"})
    error = response.json()["error"]
    assert response.status_code == 401
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "Invalid API Key provided: sk_test_****9876"
    assert key not in response.text


def test_basic_auth_with_the_key_as_username_is_accepted(app: Starlette) -> None:
    token = base64.b64encode(f"{SANDBOX_SECRET_KEY}:".encode()).decode()
    assert TestClient(app).get("/v1/balance", headers={"Authorization": f"Basic {token}"}).status_code == 200


def test_extra_api_keys_can_be_accepted() -> None:
    app = create_app(api_keys=["sk_test_other"])
    response = TestClient(app).get("/v1/balance", headers={"Authorization": "Bearer sk_test_other"})
    assert response.status_code == 200
    app.state.sandbox.close()


def test_every_response_carries_request_id_json_and_version(api: TestClient) -> None:
    response = api.get("/v1/balance", headers={"Stripe-Version": "2025-01-01.test"})
    assert response.headers["request-id"].startswith("req_")
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["stripe-version"] == "2025-01-01.test"
    assert api.get("/v1/balance").headers["stripe-version"] == "2026-01-28.clover"


def test_unknown_route_is_stripe_404(api: TestClient) -> None:
    response = api.get("/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("Unrecognized request URL (GET: /v1/nope)")


@pytest.mark.parametrize(("path", "data", "status", "code", "param"), [
    ("/v1/products", {}, 400, "parameter_missing", "name"),
    ("/v1/products", {"name": "x", "foo": "1"}, 400, "parameter_unknown", "foo"),
    ("/v1/prices", {"product": "prod_x", "unit_amount": "1"}, 400, "parameter_missing", "currency"),
    ("/v1/prices", {"product": "prod_missing", "currency": "usd", "unit_amount": "1"}, 404,
     "resource_missing", "product"),
    ("/v1/customers", {"metadata[a]": "b", "name": "n", "email": "nope"}, 400, "email_invalid", "email"),
])
def test_validation_errors_name_the_param(
    api: TestClient, path: str, data: dict[str, str], status: int, code: str, param: str
) -> None:
    response = post(api, path, data)
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["param"]) == (status, code, param)
    assert error["type"] == "invalid_request_error"


def test_missing_param_message_matches_stripe(api: TestClient) -> None:
    error = post(api, "/v1/prices", {"product": "prod_x", "unit_amount": "1"}).json()["error"]
    assert error["message"] == "Missing required param: currency."


def test_unknown_id_is_404_naming_the_id(api: TestClient) -> None:
    error = api.get("/v1/customers/cus_x").json()["error"]
    assert (error["code"], error["param"]) == ("resource_missing", "id")
    assert error["message"] == "No such customer: 'cus_x'"


def test_lists_are_newest_first_and_paginate_both_ways(api: TestClient) -> None:
    ids = [ok_json(post(api, "/v1/customers", {"name": f"c{i}"}))["id"] for i in range(5)]
    first = ok_json(api.get("/v1/customers", params={"limit": "2"}))
    assert [c["id"] for c in first["data"]] == [ids[4], ids[3]]
    assert first["has_more"] is True and first["url"] == "/v1/customers" and first["object"] == "list"
    second = ok_json(api.get("/v1/customers", params={"limit": "2", "starting_after": ids[3]}))
    assert [c["id"] for c in second["data"]] == [ids[2], ids[1]]
    back = ok_json(api.get("/v1/customers", params={"limit": "2", "ending_before": ids[1]}))
    assert [c["id"] for c in back["data"]] == [ids[3], ids[2]]
    last = ok_json(api.get("/v1/customers", params={"starting_after": ids[1]}))
    assert [c["id"] for c in last["data"]] == [ids[0]] and last["has_more"] is False


@pytest.mark.parametrize("limit", ["0", "101"])
def test_limit_out_of_range_is_refused(api: TestClient, limit: str) -> None:
    response = api.get("/v1/customers", params={"limit": limit})
    assert response.status_code == 400 and response.json()["error"]["param"] == "limit"


def test_same_idempotency_key_replays_the_first_response(api: TestClient, sandbox: Sandbox) -> None:
    first = post(api, "/v1/customers", {"email": "a@example.com"}, **{"Idempotency-Key": "k1"})
    again = post(api, "/v1/customers", {"email": "a@example.com"}, **{"Idempotency-Key": "k1"})
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert sandbox.count("customer") == 1
    assert [r.replayed for r in sandbox.request_log] == [False, True]


def test_same_idempotency_key_with_other_params_is_refused(api: TestClient) -> None:
    post(api, "/v1/customers", {"email": "a@example.com"}, **{"Idempotency-Key": "k1"})
    response = post(api, "/v1/customers", {"email": "b@example.com"}, **{"Idempotency-Key": "k1"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "idempotency_error"


def test_validation_errors_are_not_stored_under_the_key(api: TestClient) -> None:
    assert post(api, "/v1/products", {}, **{"Idempotency-Key": "k2"}).status_code == 400
    assert post(api, "/v1/products", {}, **{"Idempotency-Key": "k2"}).status_code == 400
    assert "idempotent-replayed" not in post(api, "/v1/products", {}, **{"Idempotency-Key": "k2"}).headers


def test_idempotency_keys_are_scoped_per_api_key() -> None:
    app = create_app(api_keys=["sk_test_a", "sk_test_b"])
    a = TestClient(app, headers={"Authorization": "Bearer sk_test_a", "Idempotency-Key": "same"})
    b = TestClient(app, headers={"Authorization": "Bearer sk_test_b", "Idempotency-Key": "same"})
    assert a.post("/v1/customers", data={"name": "a"}).status_code == 200
    assert b.post("/v1/customers", data={"name": "b"}).status_code == 200
    assert app.state.sandbox.count("customer") == 2
    app.state.sandbox.close()


def test_idempotency_keys_and_objects_persist_in_a_db_file(tmp_path: Any) -> None:
    db = str(tmp_path / "sandbox.db")
    app = create_app(db_path=db)
    headers = {"Authorization": f"Bearer {SANDBOX_SECRET_KEY}", "Idempotency-Key": "persist"}
    first = TestClient(app, headers=headers).post("/v1/customers", data={"name": "p"})
    app.state.sandbox.close()
    reopened = create_app(db_path=db)
    again = TestClient(reopened, headers=headers).post("/v1/customers", data={"name": "p"})
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert reopened.state.sandbox.get_object(first.json()["id"])["name"] == "p"
    reopened.state.sandbox.close()


@pytest.mark.parametrize(("status", "error_type", "code"), [
    (429, "invalid_request_error", "rate_limit"),
    (500, "api_error", None),
    (503, "api_error", None),
])
def test_before_fault_answers_the_error_without_executing(
    api: TestClient, sandbox: Sandbox, status: int, error_type: str, code: str | None
) -> None:
    sandbox.faults.inject(status=status, count=1)
    response = post(api, "/v1/customers", {"name": "x"})
    assert response.status_code == status
    assert response.json()["error"]["type"] == error_type
    assert response.json()["error"].get("code") == code
    assert sandbox.count("customer") == 0
    assert post(api, "/v1/customers", {"name": "x"}).status_code == 200
    assert [r.status for r in sandbox.request_log] == [status, 200]


def test_after_fault_executes_and_a_retry_replays_the_stored_result(
    api: TestClient, sandbox: Sandbox
) -> None:
    sandbox.faults.inject(status=500, mode="after")
    lost = post(api, "/v1/customers", {"name": "x"}, **{"Idempotency-Key": "lost"})
    assert lost.status_code == 500
    retry = post(api, "/v1/customers", {"name": "x"}, **{"Idempotency-Key": "lost"})
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    assert sandbox.count("customer") == 1


def test_faults_only_hit_matching_paths_and_can_be_cleared(api: TestClient, sandbox: Sandbox) -> None:
    sandbox.faults.inject(status=503, count=5, path_prefix="/v1/prices")
    assert api.get("/v1/balance").status_code == 200
    assert api.get("/v1/prices").status_code == 503
    sandbox.faults.clear()
    assert api.get("/v1/prices").status_code == 200


def test_faults_and_request_log_are_controllable_over_http(api: TestClient) -> None:
    assert api.post("/_sandbox/faults", json={"status": 429, "count": 2}).status_code == 200
    assert api.get("/v1/balance").status_code == 429
    assert api.delete("/_sandbox/faults").status_code == 200
    assert api.get("/v1/balance").status_code == 200
    log = ok_json(api.get("/_sandbox/requests"))["data"]
    assert [(r["path"], r["status"]) for r in log] == [("/v1/balance", 429), ("/v1/balance", 200)]


def test_delay_only_fault_still_answers(api: TestClient, sandbox: Sandbox) -> None:
    sandbox.faults.inject(status=None, delay_ms=1)
    assert api.get("/v1/balance").status_code == 200


@pytest.mark.parametrize("kwargs", [{"status": 200}, {"status": None}, {"mode": "sideways"}])
def test_nonsense_faults_are_refused(sandbox: Sandbox, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        sandbox.faults.inject(**kwargs)
