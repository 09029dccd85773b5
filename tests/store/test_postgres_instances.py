"""Issue 15's user story: three `serve --http` instances (three processes, each with its own HOME and working
directory, so only the database is shared) on one PostgreSQL and one Stripe (a sandbox served over HTTP, which every
instance reaches through STRIPE_API_BASE), under load on all three over MCP HTTP, one of them SIGKILLed mid-load.

Every instance is sent the same things at once: wallet debits under the same idempotency keys (a retried call,
landing on another instance), the same x402 payment (for a challenge one instance signed), the same meter event
identifiers, the same signed webhook. Afterwards: every acknowledged debit is in the ledger, each key debited once
with one answer however many instances acknowledged it, the payment credited once, the webhook applied once, each
meter event stored once, and `check-ledger` against PostgreSQL exits 0.

Small by default (POSTGRES_INSTANCES_KEYS, 18 keys); the issue's size runs with `-m slow`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from aims_billing_mcp.sandbox import SANDBOX_WEBHOOK_SECRET, create_app
from aims_billing_mcp.webhooks import sign_webhook_payload
from tests.conftest import ok, serving_app
from tests.support.zygote import run, spawn
from tests.test_webhooks import event, subscription

pytestmark = pytest.mark.anyio

INSTANCES = 3
CALL_S = 30.0  # one call may take this long on a loaded machine before the test fails


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Instance:
    """One `serve --http` process: its home and working directory are its own."""

    number: int
    process: Any  # a worker forked from the zygote (tests/support/zygote.py), Popen's interface
    url: str
    log: Path
    acknowledged: list[dict[str, Any]] = field(default_factory=list)  # debits it answered, in order

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def start_instance(number: int, root: Path, env: dict[str, str]) -> Instance:
    home = root / f"instance{number}"
    home.mkdir()
    port = free_port()
    log = home / "serve.log"
    with log.open("wb") as sink:
        process = spawn(
            [sys.executable, "-m", "aims_billing_mcp", "serve", "--http", "--port", str(port)],
            env={**env, "HOME": str(home)}, cwd=home, stdout=sink, stderr=sink)
    return Instance(number, process, f"http://127.0.0.1:{port}", log)


async def wait_until_serving(instance: Instance) -> None:
    async with httpx.AsyncClient(base_url=instance.url) as http:
        while True:
            try:
                await http.get("/x402/credits")  # any answer: the app is up (its lifespan opened the store)
                return
            except httpx.TransportError:
                assert instance.alive, instance.log.read_text()[-3000:]
                await anyio.sleep(0.05)


@asynccontextmanager
async def instances(root: Path, env: dict[str, str]) -> AsyncIterator[list[Instance]]:
    started = [start_instance(n, root, env) for n in range(INSTANCES)]
    try:
        with anyio.fail_after(60):
            for instance in started:
                await wait_until_serving(instance)
        yield started
    finally:
        for instance in started:
            if instance.alive:
                instance.process.terminate()
        for instance in started:
            try:
                instance.process.wait(30)
            except subprocess.TimeoutExpired:
                instance.process.kill()
                instance.process.wait(30)


async def call(client: Client, tool: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None) -> Any:
    with anyio.fail_after(CALL_S):
        return await client.call_tool(tool, arguments, meta=meta)  # type: ignore[arg-type]


def rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def debit_amount(key: int) -> int:
    return 10 * (key % 5 + 1)


@pytest.mark.parametrize("keys", [
    pytest.param(int(os.environ.get("POSTGRES_INSTANCES_KEYS", "18")), id="quick"),
    pytest.param(400, id="issue-size", marks=pytest.mark.slow),
])
async def test_three_instances_on_one_database_keep_every_guarantee_when_one_is_killed_mid_load(
        postgres_url: str, tmp_path: Path, keys: int) -> None:
    from eth_account import Account
    from x402.mechanisms.evm.exact.client import ExactEvmScheme
    from x402.schemas import PaymentRequirements

    stripe = create_app(db_path=str(tmp_path / "stripe.db"))  # one Stripe for every instance
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AIMS_", "STRIPE_", "X402_"))}
    env.update({"AIMS_BILLING_DATABASE_URL": postgres_url, "AIMS_BILLING_P2P_AGENTS": "5",
                "AIMS_BILLING_FLUSH_INTERVAL_SECONDS": "1", "PYTHONUNBUFFERED": "1",
                "AIMS_X402_CHALLENGE_KEY": "one-challenge-key-for-every-instance-0123"})  # sandbox mode: no Stripe key
    victim = INSTANCES - 1
    kill_after = max(1, keys // 3)
    killed_at: list[int] = []
    payment_answers: list[Any] = []
    webhook_answers: list[httpx.Response] = []
    meter_answers: dict[str, list[dict[str, Any]]] = {}

    async with serving_app(stripe) as stripe_base:
        env["STRIPE_API_BASE"] = stripe_base
        async with instances(tmp_path, env) as running:
            async with Client(f"{running[0].url}/mcp") as first:
                customer = ok(await call(first, "create_customer", {"email": "scale@example.com",
                                                                     "idempotency_key": "c-scale"}))["customer"]["id"]
                ok(await call(first, "create_agent_wallet", {"agent_id": "w1", "customer": customer,
                                                             "idempotency_key": "w-w1"}))
                ok(await call(first, "credit_agent_wallet", {"agent_id": "w1", "amount": 1_000_000,
                                                             "reason": "seed", "idempotency_key": "seed"}))
                answered = await call(first, "purchase_luc_credits", {"agent_id": "w1", "luc": 500})
            assert answered.is_error and isinstance(answered.structured_content, dict)  # 402: pay this
            challenge = answered.structured_content
            accepted = challenge["accepts"][0]  # signed by instance 0's key, paid on every instance
            signed = ExactEvmScheme(Account.create()).create_payment_payload(
                PaymentRequirements.model_validate(accepted))
            payment = {"x402Version": 2, "accepted": accepted, "payload": signed, "resource": challenge.get("resource")}
            webhook = event("customer.subscription.created", subscription(customer=customer, sub_id="sub_scale"),
                            created=int(time.time()), event_id="evt_scale_once")

            async def load(instance: Instance) -> None:
                try:
                    async with Client(f"{instance.url}/mcp") as client:
                        payment_answers.append(await call(client, "purchase_luc_credits",
                                                          {"agent_id": "w1", "luc": 500},
                                                          meta={"x402/payment": payment}))
                        async with httpx.AsyncClient(base_url=instance.url) as http:
                            webhook_answers.append(await http.post("/webhooks/stripe", content=webhook, headers={
                                "Stripe-Signature": sign_webhook_payload(webhook, SANDBOX_WEBHOOK_SECRET),
                                "Content-Type": "application/json"}))
                        for key in range(keys):
                            answer = ok(await call(client, "debit_agent_wallet", {
                                "agent_id": "w1", "amount": debit_amount(key), "reason": f"job {key}",
                                "idempotency_key": f"debit-{key}"}))
                            instance.acknowledged.append({"key": f"debit-{key}", **answer})
                            identifier = f"usage-{key}"
                            meter_answers.setdefault(identifier, []).append(ok(await call(
                                client, "create_meter_event", {"customer": customer, "units": 5,
                                                               "identifier": identifier})))
                            if instance.number == victim and len(instance.acknowledged) == kill_after:
                                os.kill(instance.process.pid, signal.SIGKILL)  # mid-load: its calls now fail
                                killed_at.append(key)
                except Exception:
                    if instance.number != victim or not killed_at:
                        raise

            with anyio.fail_after(60 + keys):
                async with anyio.create_task_group() as tg:
                    for instance in running:
                        tg.start_soon(load, instance)
            survivors_alive = [instance.alive for instance in running if instance.number != victim]
    stripe.state.sandbox.close()

    # the kill happened mid-load, and only the victim died
    assert killed_at and survivors_alive == [True] * (INSTANCES - 1)
    assert len(running[victim].acknowledged) == kill_after < keys
    # every acknowledged debit is in the ledger, and a key's every acknowledgement is one answer
    debits = rows(postgres_url, "SELECT DISTINCT txn_id FROM agent_transactions WHERE reason LIKE 'job %%'")
    acknowledged = [answer for instance in running for answer in instance.acknowledged]
    by_key: dict[str, set[str]] = {}
    for answer in acknowledged:
        by_key.setdefault(answer["key"], set()).add(answer["txn_id"])
    assert all(len(txns) == 1 for txns in by_key.values()), by_key  # one answer per key, whichever instance
    stored_ids = {str(row[0]) for row in debits}
    assert {txn for txns in by_key.values() for txn in txns} <= stored_ids
    # each key debited once: the wallet lost exactly the sum of the keys' amounts
    assert len(by_key) == keys == len(stored_ids)  # the survivors acknowledged every key; one posting each
    [(balance,)] = rows(postgres_url, "SELECT balance FROM agent_wallets WHERE agent_id = 'w1'")
    credited = [answer for answer in payment_answers if not answer.is_error]
    assert len(credited) == 1 and credited[0].structured_content["luc_credited"] == 500, payment_answers
    refusals = [answer.structured_content["error"] for answer in payment_answers if answer.is_error]
    assert all(error["code"] == "invalid_exact_evm_nonce_already_used" or "already paid" in error["message"]
               for error in refusals), refusals  # never "unknown quote": every instance knew instance 0's challenge
    assert balance == 1_000_000 + 500 - sum(debit_amount(key) for key in range(keys))
    [(receipts,)] = rows(postgres_url, "SELECT count(*) FROM x402_receipts")
    assert receipts == 1
    # the webhook applied once
    assert [r.status_code for r in webhook_answers] == [200] * len(webhook_answers) and len(webhook_answers) >= 2
    assert sorted(r.json()["duplicate"] for r in webhook_answers) == [False] + [True] * (len(webhook_answers) - 1)
    assert rows(postgres_url, "SELECT count(*) FROM webhook_events WHERE id = 'evt_scale_once'") == [(1,)]
    # each meter event stored once
    stored = rows(postgres_url, "SELECT identifier, count(*) FROM meter_events GROUP BY identifier")
    assert {identifier for identifier, _ in stored} == set(meter_answers) and all(n == 1 for _, n in stored)
    # every ledger invariant holds
    checked = run([sys.executable, "-m", "aims_billing_mcp", "check-ledger"], capture_output=True, text=True,
                  timeout=120, cwd=tmp_path, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
