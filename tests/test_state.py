"""The composition root (state.py) and the fulfilment registry it fills (services/fulfilment.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from aims_billing_mcp.services.fulfilment import Fulfilment, Seller
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import open_state
from aims_billing_mcp.store import Store
from aims_billing_mcp.store.prepaid import COLUMNS, PrepaidRow

pytestmark = pytest.mark.anyio


def test_open_state_closes_the_store_it_opened(make_settings: Callable[..., Settings]) -> None:
    with open_state(make_settings()) as state:
        assert state.store.query("SELECT 1 AS one") == [{"one": 1}]

    with pytest.raises(sqlite3.ProgrammingError):
        state.store.query("SELECT 1")


async def test_open_state_leaves_a_store_it_was_handed_open(make_settings: Callable[..., Settings],
                                                           store: Store, sandbox_app: Any) -> None:
    async with open_state(make_settings(), store=store, sandbox_app=sandbox_app) as state:
        assert state.store is store

    assert store.query("SELECT 1 AS one") == [{"one": 1}]


async def test_open_state_closes_from_inside_a_running_loop_as_a_command_called_from_async_code_does(
        make_settings: Callable[..., Settings]) -> None:
    with open_state(make_settings()) as state:  # the sync form, on a thread that runs a loop
        pass

    with pytest.raises(sqlite3.ProgrammingError):
        state.store.query("SELECT 1")


def test_every_service_is_built_over_the_same_store_gateway_and_prepaid_outbox(
        make_settings: Callable[..., Settings], sandbox_app: Any) -> None:
    with open_state(make_settings(), sandbox_app=sandbox_app) as state:
        assert state.acp._prepaid is state.prepaid and state.commerce.prepaid is state.prepaid
        assert state.acp._gateway is state.gateway and state.commerce._gateway is state.gateway
        assert state.acp._ledger is state.ledger and state.commerce.ledger is state.ledger
        assert state.prepaid._fulfilment is state.fulfilment


def session(source: str) -> dict[str, Any]:
    return {"id": "ps_1", "source": source}


def prepaid_row(source: str) -> PrepaidRow:
    columns: dict[str, Any] = dict.fromkeys(COLUMNS)
    return PrepaidRow.from_mapping({**columns, "id": "ps_1", "source": source, "status": "pending"})


def test_a_paid_session_goes_to_the_first_seller_that_owns_it_and_to_none_when_nobody_does() -> None:
    asked: list[str] = []

    def owner_of(prefix: str) -> Any:
        def fulfil(_tx: Any, row: dict[str, Any], pi: str) -> dict[str, Any] | None:
            asked.append(prefix)
            return {"by": prefix, "pi": pi} if row["id"].startswith(prefix) else None
        return fulfil

    registry = Fulfilment()
    registry.register("payment_session", Seller())
    registry.register("acp", Seller(fulfil=owner_of("ps_")))
    registry.register("other", Seller(fulfil=owner_of("never")))

    assert registry.fulfil(None, session("x"), "pi_1") == {"by": "ps_", "pi": "pi_1"}  # type: ignore[arg-type]
    assert asked == ["ps_"]
    assert registry.fulfil(None, {"id": "cs_9"}, "pi_2") is None  # type: ignore[arg-type]


def test_a_subscription_outcome_is_told_to_its_source_only_and_its_action_handed_back() -> None:
    told: list[tuple[str, str]] = []

    def hearing(name: str) -> Any:
        def hear(_tx: Any, row: dict[str, Any]) -> Callable[[], None]:
            told.append((name, row["id"]))
            return lambda: told.append((name, "after commit"))
        return hear

    registry = Fulfilment()
    registry.register("payment_session", Seller(on_subscription=hearing("payment_session")))
    registry.register("acp", Seller(on_subscription=hearing("acp")))

    action = registry.subscription_outcome(None, prepaid_row("acp"))  # type: ignore[arg-type]
    assert told == [("acp", "ps_1")] and action is not None
    action()
    assert told == [("acp", "ps_1"), ("acp", "after commit")]
    assert registry.subscription_outcome(None, prepaid_row("unknown")) is None  # type: ignore[arg-type]


def test_after_a_commit_every_seller_sends_what_it_queued() -> None:
    sent: list[str] = []
    registry = Fulfilment()
    registry.register("payment_session", Seller())
    registry.register("acp", Seller(after_commit=lambda: sent.append("acp")))
    registry.register("shop", Seller(after_commit=lambda: sent.append("shop")))

    registry.committed()

    assert sent == ["acp", "shop"]


def test_a_source_registered_again_replaces_its_first_seller() -> None:
    sent: list[str] = []
    registry = Fulfilment()
    registry.register("acp", Seller(after_commit=lambda: sent.append("first")))
    registry.register("acp", Seller(after_commit=lambda: sent.append("second")))

    registry.committed()

    assert sent == ["second"]
