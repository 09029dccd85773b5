"""The money invariant of agent commerce, checked after every commerce and ACP test (autouse fixtures in those
modules call `check_money_kept`): for every PaymentIntent that succeeded in the sandbox, what our records delivered
is worth at most what Stripe received, and the payment ends either delivered (the whole amount's worth) or
refunded in full; a payment may be owed only where our record says so (a tier start failed and awaiting
`refund-prepaid`, a refused credit in manual review, a refund due): never a silent loss.

Worth is the pricing file's price of what was delivered: the LUC credited to a wallet with the PaymentIntent as
reference must be exactly the LUC of the lines paid for, a tier line is worth its price once its subscription
started."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.services.tiers import Pricing

PRICING = Pricing.load()
OWED_PREPAID = ("pending", "claimed", "credited", "subscribed", "failed", "refused", "refunding")


def _databases(folder: Path) -> list[sqlite3.Connection]:
    found = []
    for path in sorted(folder.rglob("*.db")):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'payment_sessions'").fetchone():
                found.append(conn)
                continue
        except sqlite3.DatabaseError:
            pass
        conn.close()
    return found


def _objects(sandbox: Sandbox, kind: str) -> list[dict[str, Any]]:
    objects, _ = sandbox.store.page(kind, {}, limit=1_000_000)
    return objects


def _lines_worth(lines: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(price of the credit lines, their LUC, price of the tier line)."""
    credits = luc = tier = 0
    for line in lines:
        item = PRICING.items[line["item"]]
        if item.subscribes:
            tier += item.unit_price * line["quantity"]
        else:
            credits += item.unit_price * line["quantity"]
            luc += item.luc * line["quantity"]
    return credits, luc, tier


def _prepaid_worth(conn: sqlite3.Connection, source_id: str, pi: str) -> tuple[int, int, bool]:
    """A tier line's (delivered worth, refunded amount, owed) from its prepaid subscription row."""
    row = conn.execute("SELECT * FROM prepaid_subscriptions WHERE source_id = ?", (source_id,)).fetchone()
    assert row is not None, f"{pi} paid for a tier and no prepaid subscription was recorded for {source_id}"
    if row["status"] == "started":
        return int(row["amount"]), 0, False
    if row["status"] == "refunded":  # what invoices drew from the credit before the refund was used: delivered
        refunded = int(row["refunded_amount"] or 0)
        return int(row["amount"]) - refunded, refunded, False
    return 0, 0, row["status"] in OWED_PREPAID


def check_money_kept(sandbox: Sandbox, folder: Path) -> None:
    refunds: dict[str, int] = {}
    for refund in _objects(sandbox, "refund"):
        if refund.get("status") == "succeeded":
            refunds[refund["payment_intent"]] = refunds.get(refund["payment_intent"], 0) + int(refund["amount"])
    databases = _databases(folder)
    try:
        for pi in _objects(sandbox, "payment_intent"):
            if pi["status"] != "succeeded":
                continue
            for conn in databases:
                session = conn.execute("SELECT * FROM payment_sessions WHERE payment_intent_id = ?",
                                       (pi["id"],)).fetchone()
                if session is not None:
                    _check_one(conn, pi, dict(session), refunds.get(pi["id"], 0))
                    break
    finally:
        for conn in databases:
            conn.close()


def _check_one(conn: sqlite3.Connection, pi: dict[str, Any], session: dict[str, Any], stripe_refunded: int) -> None:
    pid, received = pi["id"], int(pi["amount_received"])
    luc_row = conn.execute("SELECT COALESCE(SUM(amount), 0) FROM agent_transactions WHERE reference = ? AND "
                           "wallet_id IS NOT NULL AND amount > 0", (pid,)).fetchone()
    luc_credited = int(luc_row[0])
    worth, recorded_refund, owed = 0, 0, False
    acp = conn.execute("SELECT * FROM acp_payments WHERE payment_session_id = ?", (session["id"],)).fetchone() \
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'acp_payments'").fetchone() else None
    checkout = conn.execute("SELECT * FROM acp_checkout_sessions WHERE id = ?", (acp["checkout_session_id"],)
                            ).fetchone() if acp is not None else None
    if acp is not None and acp["refund_status"] is not None:
        assert luc_credited == 0, f"{pid}: refunded as undeliverable, yet {luc_credited} LUC were credited"
        if acp["refund_status"] == "due":
            owed = True
        else:
            recorded_refund = received
    elif checkout is not None:
        state = json.loads(checkout["state"])
        order = state.get("order") or {}
        assert checkout["status"] == "completed" and order.get("payment_intent") == pid, (
            f"{pid} succeeded for checkout {checkout['id']} ({checkout['status']}): neither delivered nor refunded")
        credits, luc, tier = _lines_worth(json.loads(acp["lines"])["lines"])
        if order.get("luc_refused"):
            owed = True
        else:
            assert luc_credited == luc, f"{pid}: {luc_credited} LUC credited for lines worth {luc} LUC"
            worth += credits
        if tier:
            done, back, waiting = _prepaid_worth(conn, checkout["id"], pid)
            worth, recorded_refund, owed = worth + done, back, owed or waiting
    else:
        fulfilment = json.loads(session["fulfilment"]) if session["fulfilment"] else {}
        item = PRICING.items.get(session["item_id"] or "")
        assert session["fulfilled_at"] is not None or fulfilment.get("status") == "failed", (
            f"{pid} succeeded for payment session {session['id']} ({session['status']}): nothing fulfilled")
        if fulfilment.get("kind") == "acp_order":
            raise AssertionError(f"{pid}: an ACP payment without its frozen lines (acp_payments)")
        if item is None:
            worth = int(session["amount"])  # an amount payment: the receipt is what is delivered
        elif item.subscribes:
            worth, recorded_refund, owed = _prepaid_worth(conn, session["id"], pid)
        elif fulfilment.get("status") == "failed":
            owed = True
        else:
            assert luc_credited == item.luc, f"{pid}: {luc_credited} LUC credited for {item.id} ({item.luc} LUC)"
            worth = item.unit_price
    assert worth <= received, f"{pid}: delivered {worth} for {received} received"
    assert stripe_refunded == recorded_refund or owed, (
        f"{pid}: Stripe refunded {stripe_refunded}, our record says {recorded_refund}")
    if not owed:
        assert worth + stripe_refunded == received, (
            f"{pid}: {received} received, {worth} delivered, {stripe_refunded} refunded: neither delivered nor "
            "refunded in full")


@pytest.fixture(autouse=True)
def money_kept(sandbox_app: Any, tmp_path: Path) -> Iterator[None]:
    """Imported by a test module, checks the invariant after each of its tests (on the sandbox and every
    database the test wrote under its tmp_path)."""
    yield
    check_money_kept(sandbox_app.state.sandbox, tmp_path)
