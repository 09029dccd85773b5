"""The x402 payment service on a real store: requirements, verification through the SDK's exact-EVM facilitator over
the offline signer, the receipt recorded once with the wallet credit, and every bad input refused with the spec's
reason code, a sentence, and nothing written. Payments are signed by a generated eth-account key
(tests/support/x402_worker)."""

from __future__ import annotations

import base64
import functools
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aims_billing_mcp.errors import ConfigurationError, InvalidInput, NotFound, PaymentRejected
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.services.x402 import (
    MAX_QUOTE_ID,
    NETWORKS,
    SANDBOX_PAY_TO,
    Challenge,
    X402Service,
    challenge_key,
    decode_payment_header,
    encode_header,
)
from aims_billing_mcp.services.x402_models import Receipt
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from tests.conftest import Clock
from tests.support.x402_worker import Payer, header

pytestmark = pytest.mark.anyio

AGENT = "agent-x"
TABLES = ("x402_receipts", "x402_quotes", "agent_wallets", "agent_transactions", "ledger_requests")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pricing() -> Pricing:
    return Pricing.load()


@pytest.fixture
def ledger(store: Store, pricing: Pricing, clock: Clock) -> LedgerService:
    return LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None, clock=clock)


@pytest.fixture
async def service(store: Store, ledger: LedgerService, pricing: Pricing, clock: Clock) -> X402Service:
    await ledger.create_wallet(AGENT, "cus_x", None, "open")
    return X402Service(store, ledger, None, pricing, clock=clock)


@pytest.fixture(scope="module")
def payer() -> Payer:
    return Payer()


def snapshot(store: Store) -> dict[str, list[dict[str, Any]]]:
    return {table: store.query(f"SELECT * FROM {table} ORDER BY 1") for table in TABLES}


async def refused(store: Store, call: Callable[[], Awaitable[Any]], code: str, *words: str) -> PaymentRejected:
    before = snapshot(store)
    with pytest.raises(PaymentRejected) as caught:
        await call()
    assert caught.value.code == code, caught.value.to_dict()
    message = caught.value.message
    assert message.endswith(tuple("abcdefghijklmnopqrstuvwxyz)0123456789\"'")) and len(message) > 30, message
    for word in words:
        assert word in message, message
    assert snapshot(store) == before
    return caught.value


def balance(ledger: LedgerService) -> int:
    return ledger.get_wallet(AGENT).balance


# --- requirements -----------------------------------------------------------------------------------------------


async def test_requirements_v2_are_the_x402_payment_required_for_base_sepolia_usdc(service: X402Service,
                                                                                   store: Store) -> None:
    result = await service.create_requirements(luc=500, agent_id=AGENT, description="500 LUC", resource="urn:luc")
    required = result.payment_required
    assert required["x402Version"] == 2
    [accepts] = required["accepts"]
    assert accepts == {"scheme": "exact", "network": "eip155:84532", "asset": NETWORKS["base-sepolia"][2],
                       "amount": "500000", "payTo": SANDBOX_PAY_TO, "maxTimeoutSeconds": 300,
                       "extra": {"name": "USDC", "version": "2", "quoteId": result.quote_id}}
    assert required["resource"]["url"] == "urn:luc"
    assert json.loads(base64.b64decode(result.header)) == required
    assert (result.amount_usd, result.luc, result.agent_id) == ("0.5", 500, AGENT)
    quote = store.query_one("SELECT * FROM x402_quotes WHERE id = ?", (result.quote_id,))
    assert quote is not None and (quote["status"], quote["amount"], quote["luc"]) == ("open", 500_000, 500)


async def test_requirements_v1_base_and_usd_and_atomic_amounts(service: X402Service) -> None:
    v1 = await service.create_requirements(amount_usd="1.25", description="d", resource="https://x/r", version=1,
                                           network="base")
    [accepts] = v1.payment_required["accepts"]
    assert v1.payment_required["x402Version"] == 1
    assert (accepts["network"], accepts["maxAmountRequired"], accepts["asset"]) == (
        "base", "1250000", NETWORKS["base"][2])
    assert accepts["extra"]["name"] == "USD Coin" and accepts["resource"] == "https://x/r"
    assert v1.luc == 0
    atomic = await service.create_requirements(amount_atomic=7, agent_id=AGENT, description="d", resource="r",
                                               luc=None) if False else None
    assert atomic is None
    credited = await service.create_requirements(amount_atomic=2_000_000, agent_id=AGENT, description="d",
                                                 resource="r")
    assert credited.luc == 2000


@pytest.mark.parametrize(("kwargs", "param"), [
    ({}, "amount_usd"),
    ({"amount_usd": "1", "luc": 5}, "amount_usd"),
    ({"amount_usd": "1.0000001"}, "amount_usd"),
    ({"amount_usd": "-1"}, "amount_usd"),
    ({"amount_usd": "0"}, "amount_usd"),
    ({"amount_atomic": 0}, "amount_atomic"),
    ({"amount_atomic": True}, "amount_atomic"),
    ({"luc": 5}, "agent_id"),
    ({"amount_atomic": 10, "agent_id": AGENT}, "amount_atomic"),
    ({"amount_usd": "1", "network": "mainnet"}, "network"),
    ({"amount_usd": "1", "valid_seconds": 0}, "valid_seconds"),
    ({"amount_usd": "1", "version": 3}, "version"),
    ({"amount_usd": "1", "description": " "}, "description"),
])
async def test_bad_requirements_are_refused_naming_the_field(service: X402Service, store: Store,
                                                             kwargs: dict[str, Any], param: str) -> None:
    args: dict[str, Any] = {"description": "d", "resource": "r", **kwargs}
    before = snapshot(store)
    with pytest.raises(InvalidInput) as caught:
        await service.create_requirements(**args)
    assert caught.value.param == param
    assert snapshot(store) == before


async def test_requirements_for_an_agent_without_a_wallet_are_refused(service: X402Service) -> None:
    with pytest.raises(NotFound):
        await service.create_requirements(luc=5, agent_id="nobody", description="d", resource="r")


# --- the happy paths --------------------------------------------------------------------------------------------


async def test_v2_payment_is_verified_settled_recorded_and_credited_once(
        service: X402Service, ledger: LedgerService, store: Store, payer: Payer) -> None:
    quote = await service.create_requirements(luc=500, agent_id=AGENT, description="credits", resource="urn:luc")
    payment = payer.pay(quote.payment_required)
    receipt = await service.verify_and_settle(header(payment), quote_id=quote.quote_id)
    assert (receipt.mode, receipt.x402_version, receipt.network, receipt.payer) == (
        "local", 2, "eip155:84532", payer.address.lower())
    assert (receipt.amount_atomic, receipt.amount_usd, receipt.luc_credited, receipt.balance_after) == (
        "500000", "0.5", 500, 500)
    assert receipt.tx_hash and receipt.tx_hash.startswith("0x") and len(receipt.tx_hash) == 66
    assert receipt.settlement["success"] is True and receipt.settlement["transaction"] == receipt.tx_hash
    assert json.loads(base64.b64decode(receipt.payment_response_header)) == receipt.settlement
    assert balance(ledger) == 500
    assert ledger.check_ledger() == []
    [entry] = ledger.get_wallet(AGENT).recent
    assert (entry.kind, entry.amount, entry.reference) == ("credit", 500, receipt.receipt_id)
    quote_row = store.query_one("SELECT status, receipt_id FROM x402_quotes WHERE id = ?", (quote.quote_id,))
    assert quote_row == {"status": "paid", "receipt_id": receipt.receipt_id}
    [row] = service.receipts()
    assert (row.receipt_id, row.payer, row.luc_credited, row.amount_usd) == (
        receipt.receipt_id, payer.address.lower(), 500, "0.5")

    # the same payment again, as header or JSON, for this quote or (its quoteId rewritten) another: refused as a
    # replay, nothing credited
    await refused(store, lambda: service.verify_and_settle(header(payment), quote_id=quote.quote_id),
                  "invalid_exact_evm_nonce_already_used")
    other = await service.create_requirements(luc=500, agent_id=AGENT, description="credits", resource="urn:luc")
    await refused(store, lambda: service.verify_and_settle(naming(payment, other.quote_id)),
                  "invalid_exact_evm_nonce_already_used", "already settled")
    assert balance(ledger) == 500


async def test_v1_payment_and_json_object_and_json_text(service: X402Service, ledger: LedgerService,
                                                        payer: Payer) -> None:
    v1 = await service.create_requirements(luc=100, agent_id=AGENT, description="d", resource="r", version=1)
    payment = payer.pay(v1.payment_required)
    assert payment["x402Version"] == 1 and payment["network"] == "base-sepolia"
    receipt = await service.verify_and_settle(header(payment), quote_id=v1.quote_id)
    assert (receipt.x402_version, receipt.luc_credited) == (1, 100)
    v2 = await service.create_requirements(luc=10, agent_id=AGENT, description="d", resource="r")
    await service.verify_and_settle(payer.pay(v2.payment_required), quote_id=v2.quote_id)
    v2b = await service.create_requirements(luc=1, agent_id=AGENT, description="d", resource="r")
    await service.verify_and_settle(json.dumps(payer.pay(v2b.payment_required)), quote_id=v2b.quote_id)
    assert balance(ledger) == 111
    assert len(service.receipts()) == 3


async def test_a_payment_without_an_agent_records_a_receipt_and_credits_nothing(
        service: X402Service, payer: Payer) -> None:
    quote = await service.create_requirements(amount_usd="0.01", description="an article", resource="urn:article")
    receipt = await service.verify_and_settle(payer.pay(quote.payment_required), quote_id=quote.quote_id)
    assert (receipt.agent_id, receipt.luc_credited, receipt.balance_after) == (None, 0, None)


# --- bad input: each refused with the spec's reason, nothing written --------------------------------------------


def naming(payment: dict[str, Any] | str, quote_id: str) -> dict[str, Any]:
    """The payment (object or header value) with the quote it names rewritten (the signature does not cover it)."""
    out = decode_payment_header(payment)[1] if isinstance(payment, str) else json.loads(json.dumps(payment))
    out["accepted"]["extra"]["quoteId"] = quote_id
    return out


def _tamper(payment: dict[str, Any], **auth: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(payment))
    out["payload"]["authorization"].update(auth)
    return out


@pytest.mark.parametrize(("case", "code"), [
    ("not base64", "invalid_payload"),
    ("base64 not json", "invalid_payload"),
    ("json array", "invalid_payload"),
    ("version 3", "invalid_x402_version"),
    ("no version", "invalid_x402_version"),
    ("no authorization", "invalid_payload"),
    ("short nonce", "invalid_payload"),
    ("bad from", "invalid_payload"),
    ("wrong scheme", "invalid_scheme"),
    ("wrong network", "invalid_network"),
    ("wrong network v1", "invalid_network"),
    ("wrong asset", "invalid_exact_evm_payload_asset_mismatch"),
    ("recipient", "invalid_exact_evm_payload_recipient_mismatch"),
    ("amount", "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("expired", "invalid_exact_evm_payload_authorization_valid_before"),
    ("not yet valid", "invalid_exact_evm_payload_authorization_valid_after"),
    ("other key", "invalid_exact_evm_payload_signature"),
    ("tampered value", "invalid_exact_evm_payload_signature"),
    ("tampered nonce", "invalid_exact_evm_payload_signature"),
    ("tampered from", "invalid_exact_evm_payload_signature"),
    ("garbage signature", "invalid_exact_evm_payload_signature"),
])
async def test_bad_payments_are_refused_with_the_spec_reason_and_nothing_written(
        service: X402Service, ledger: LedgerService, store: Store, payer: Payer, case: str, code: str) -> None:
    quote = await service.create_requirements(luc=50, agent_id=AGENT, description="d", resource="r")
    required = quote.payment_required
    good = payer.pay(required)
    now = int(service._clock())
    accepted = dict(required["accepts"][0])
    payments: dict[str, Any] = {
        "not base64": "%%% not base64 %%%",
        "base64 not json": base64.b64encode(b"\xff\xfe not json").decode(),
        "json array": header([1, 2]),  # type: ignore[arg-type]
        "version 3": header({**good, "x402Version": 3}),
        "no version": header({k: v for k, v in good.items() if k != "x402Version"}),
        "no authorization": header({**good, "payload": {"signature": "0x00"}}),
        "short nonce": header(_tamper(good, nonce="0x1234")),
        "bad from": header(_tamper(good, **{"from": "0xnothex"})),
        "wrong scheme": header({**good, "accepted": {**accepted, "scheme": "upto"}}),
        "wrong network": header({**good, "accepted": {**accepted, "network": "eip155:8453"}}),
        "wrong network v1": header({"x402Version": 1, "scheme": "exact", "network": "base",
                                    "payload": good["payload"]}),
        "wrong asset": header({**good, "accepted": {**accepted, "asset": NETWORKS["base"][2]}}),
        "recipient": header(payer.pay(required, to="0x" + "11" * 20)),
        "amount": header(payer.pay(required, value="49999")),
        "expired": header(payer.pay(required, validBefore=str(now - 1))),
        "not yet valid": header(payer.pay(required, validAfter=str(now + 120))),
        "other key": header(_resign_with_other_key(good, required)),
        "tampered value": header(payer.pay(required, sign_overrides={"value": "1"})),
        "tampered nonce": header(_tamper(good, nonce="0x" + "ab" * 32)),
        "tampered from": header(_tamper(good, **{"from": Payer().address})),
        "garbage signature": header({**good, "payload": {**good["payload"], "signature": "0x" + "00" * 65}}),
    }
    error = await refused(store, lambda: service.verify_and_settle(payments[case], quote_id=quote.quote_id), code)
    assert error.param == "payment"
    assert balance(ledger) == 0
    # and the good payment still goes through afterwards: a refusal claims nothing
    await service.verify_and_settle(good, quote_id=quote.quote_id)
    assert balance(ledger) == 50


def _resign_with_other_key(payment: dict[str, Any], required: dict[str, Any]) -> dict[str, Any]:
    other = Payer()
    auth = payment["payload"]["authorization"]
    signature = other.sign(auth, required["accepts"][0]["network"])
    return {**payment, "payload": {"authorization": auth, "signature": signature}}


async def test_unknown_expired_and_paid_quotes_are_refused(
        service: X402Service, store: Store, clock: Clock, payer: Payer) -> None:
    quote = await service.create_requirements(luc=5, agent_id=AGENT, description="d", resource="r",
                                              valid_seconds=60)
    payment = payer.pay(quote.payment_required)
    error = await refused(store, lambda: service.verify_and_settle(naming(payment, "q_nope")),
                          "invalid_payment_requirements", "unknown quote q_nope")
    assert error.details["quote_status"] == "unknown"
    clock.advance(61)
    error = await refused(store, lambda: service.verify_and_settle(payment, quote_id=quote.quote_id),
                          "invalid_payment_requirements", "expired")
    assert error.details["quote_status"] == "expired"
    clock.advance(-61)
    await service.verify_and_settle(payment, quote_id=quote.quote_id)
    second = payer.pay(quote.payment_required)  # a fresh, valid authorization for a quote already paid
    error = await refused(store, lambda: service.verify_and_settle(second, quote_id=quote.quote_id),
                          "invalid_payment_requirements", "already paid")
    assert error.details["quote_status"] == "paid"


async def test_a_payment_settles_only_the_quote_it_accepted_and_a_v1_payment_needs_quote_id(
        service: X402Service, ledger: LedgerService, store: Store, payer: Payer) -> None:
    mine, other = [await service.create_requirements(luc=5, agent_id=AGENT, description="d", resource="r")
                   for _ in range(2)]
    error = await refused(store, lambda: service.verify_and_settle(payer.pay(mine.payment_required),
                                                                   quote_id=other.quote_id),
                          "invalid_payment_requirements", mine.quote_id, other.quote_id)
    assert (error.param, error.details["quote_status"]) == ("quote_id", "mismatch")
    v1 = payer.pay(mine.payment_required, version=1)
    error = await refused(store, lambda: service.verify_and_settle(v1), "invalid_payment_requirements", "v1")
    assert error.param == "quote_id"
    for asked in ({"agent_id": "someone-else"}, {"luc": 6}):
        call = functools.partial(service.verify_and_settle, v1, quote_id=mine.quote_id, **asked)
        error = await refused(store, call, "invalid_payment_requirements", "cannot pay another")
        assert error.param == next(iter(asked))
    await service.verify_and_settle(v1, quote_id=mine.quote_id, agent_id=AGENT, luc=5)
    assert balance(ledger) == 5


async def test_a_credit_refused_by_the_ledger_undoes_the_receipt(
        service: X402Service, store: Store, payer: Payer) -> None:
    quote = await service.create_requirements(luc=5, agent_id=AGENT, description="d", resource="r")
    store.write_sync(lambda conn: conn.execute("DELETE FROM agent_wallets WHERE agent_id = ?", (AGENT,)))
    with pytest.raises(NotFound):
        await service.verify_and_settle(payer.pay(quote.payment_required), quote_id=quote.quote_id)
    assert store.query("SELECT * FROM x402_receipts") == []
    assert store.query_one("SELECT status FROM x402_quotes") == {"status": "open"}


# --- challenge tokens: stored only when paid ---------------------------------------------------------------------


async def test_a_challenge_is_stored_only_when_paid_and_is_paid_once(
        service: X402Service, ledger: LedgerService, store: Store) -> None:
    challenge = await service.challenge(agent_id=AGENT, luc=40, resource="/x402/credits")
    assert challenge.quote_id.startswith("qt_") and len(challenge.quote_id) < MAX_QUOTE_ID
    assert (challenge.luc, challenge.amount_atomic, challenge.max_timeout_seconds) == (40, "40000", 300)
    assert store.query("SELECT * FROM x402_quotes") == []
    receipt = await service.verify_and_settle(Payer().pay(challenge.payment_required))
    assert (receipt.quote_id, receipt.luc_credited) == (challenge.quote_id, 40)
    row = store.query_one("SELECT status, agent_id, luc, amount, resource FROM x402_quotes")
    assert row == {"status": "paid", "agent_id": AGENT, "luc": 40, "amount": 40000, "resource": "/x402/credits"}
    second = Payer().pay(challenge.payment_required)  # another payer, a fresh authorization, the same challenge
    error = await refused(store, lambda: service.verify_and_settle(second), "invalid_payment_requirements",
                          "already paid")
    assert error.details["quote_status"] == "paid"
    assert balance(ledger) == 40


async def test_an_expired_challenge_is_refused(service: X402Service, store: Store, clock: Clock) -> None:
    challenge = await service.challenge(agent_id=AGENT, luc=40, resource="r")
    payment = Payer().pay(challenge.payment_required, validBefore=str(int(clock()) + 3600))
    clock.advance(300)
    error = await refused(store, lambda: service.verify_and_settle(payment), "invalid_payment_requirements",
                          "expired")
    assert error.details["quote_status"] == "expired"


async def test_challenges_outlive_a_restart_through_the_private_key_file_and_die_with_it(
        service: X402Service, store: Store, ledger: LedgerService, pricing: Pricing, clock: Clock) -> None:
    first = await service.challenge(agent_id=AGENT, luc=1, resource="r")
    second = await service.challenge(agent_id=AGENT, luc=2, resource="r")
    key_file = store.path.with_name(f"{store.path.stem}.x402.key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    restarted = X402Service(store, ledger, None, pricing, clock=clock)
    await restarted.verify_and_settle(Payer().pay(first.payment_required))
    key_file.unlink()
    renewed = X402Service(store, ledger, None, pricing, clock=clock)
    error = await refused(store, lambda: renewed.verify_and_settle(Payer().pay(second.payment_required)),
                          "invalid_payment_requirements", "unknown quote")
    assert error.details["quote_status"] == "unknown"
    key_file.write_text("not a key")
    broken = X402Service(store, ledger, None, pricing, clock=clock)
    with pytest.raises(ConfigurationError) as caught:
        await broken.challenge(agent_id=AGENT, luc=1, resource="r")
    assert str(key_file) in caught.value.message and "delete it" in caught.value.message


def _settings(**values: str) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


async def test_instances_configured_with_one_challenge_key_pay_each_others_challenges_and_keep_no_key_file(
        store: Store, ledger: LedgerService, pricing: Pricing, clock: Clock) -> None:
    await ledger.create_wallet(AGENT, "cus_x", None, "open")
    shared = {"aims_x402_challenge_key": "a-deployment-wide-challenge-key-0123456789"}
    one, other = (X402Service.from_settings(store, ledger, None, pricing, _settings(**shared), clock=clock)
                  for _ in range(2))
    stranger = X402Service.from_settings(store, ledger, None, pricing, _settings(
        aims_x402_challenge_key="another-deployments-challenge-key-987654321"), clock=clock)
    from_one = await one.challenge(agent_id=AGENT, luc=5, resource="r")
    for_stranger = await one.challenge(agent_id=AGENT, luc=6, resource="r")

    assert (await other.verify_and_settle(Payer().pay(from_one.payment_required))).luc_credited == 5
    await refused(store, lambda: stranger.verify_and_settle(Payer().pay(for_stranger.payment_required)),
                  "invalid_payment_requirements", "unknown quote")
    assert not store.path.with_name(f"{store.path.stem}.x402.key").exists()


@pytest.mark.parametrize(("a", "b", "same"), [
    ({"stripe_secret_key": "sk_test_" + "1" * 24}, {"stripe_secret_key": "sk_test_" + "1" * 24}, True),
    ({"stripe_secret_key": "sk_test_" + "1" * 24}, {"stripe_secret_key": "sk_test_" + "2" * 24}, False),
    ({"stripe_secret_key": "sk_test_" + "1" * 24,
      "aims_x402_challenge_key": "x" * 32}, {"aims_x402_challenge_key": "x" * 32}, True),  # the setting wins
])
def test_without_the_setting_the_challenge_key_is_derived_from_the_stripe_key_every_instance_shares(
        a: dict[str, str], b: dict[str, str], same: bool) -> None:
    first, second = challenge_key(_settings(**a)), challenge_key(_settings(**b))

    assert first is not None and second is not None and (first == second) is same
    assert first != ("sk_test_" + "1" * 24).encode() and len(first) == 32  # a derived key, not the Stripe key


def test_in_sandbox_mode_without_the_setting_no_key_is_configured() -> None:
    assert challenge_key(_settings()) is None  # then the SQLite key file serves (PostgreSQL refuses: see store tests)


# --- helpers and constants --------------------------------------------------------------------------------------


def test_header_helpers_round_trip() -> None:
    obj = {"x402Version": 2, "payload": {"a": 1}}
    assert decode_payment_header(encode_header(obj)) == (2, obj)
    assert decode_payment_header(json.dumps(obj)) == (2, obj)
    urlsafe = base64.urlsafe_b64encode(json.dumps({"x402Version": 1, "p": "??>>"}).encode()).decode().rstrip("=")
    assert decode_payment_header(urlsafe)[0] == 1


def test_mirrored_constants_match_the_sdk() -> None:
    from x402.mechanisms.evm import constants
    from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS

    from aims_billing_mcp.services import x402 as module

    for name in ("ERR_INVALID_SIGNATURE", "ERR_RECIPIENT_MISMATCH", "ERR_AUTHORIZATION_VALUE_MISMATCH",
                 "ERR_VALID_BEFORE_EXPIRED", "ERR_VALID_AFTER_FUTURE", "ERR_NONCE_ALREADY_USED", "SCHEME_EXACT"):
        assert getattr(module, name) == getattr(constants, name)
    for caip, _chain, asset, domain, version in NETWORKS.values():
        [default] = DEFAULT_ASSETS[caip]
        assert (default["asset"], default["name"], default["version"], default["decimals"]) == (
            asset, domain, version, 6)
    from eth_utils import to_checksum_address

    assert to_checksum_address(SANDBOX_PAY_TO) == SANDBOX_PAY_TO


def test_importing_the_service_does_not_import_the_evm_stack() -> None:
    import subprocess

    code = ("import sys, aims_billing_mcp.services.x402; "
            "print(any(m.startswith(('x402', 'eth_account', 'web3')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- pay or challenge: the one step behind purchase_luc_credits and GET /x402/credits ----------------------------


@pytest.mark.parametrize("sent", ["nothing", "a payment for other luc", "a tampered payment", "a good payment"])
async def test_pay_or_challenge_credits_a_good_payment_and_answers_anything_else_with_a_fresh_challenge(
        service: X402Service, ledger: LedgerService, store: Store, sent: str) -> None:
    first = await service.challenge(agent_id=AGENT, luc=40, resource="r")
    payment = {"nothing": None, "a good payment": header(Payer().pay(first.payment_required)),
               "a payment for other luc": header(Payer().pay(first.payment_required)),
               "a tampered payment": Payer().pay(first.payment_required, value="1")}[sent]
    luc = 41 if sent == "a payment for other luc" else 40
    before = snapshot(store)

    outcome = await service.pay_or_challenge(payment, agent_id=AGENT, luc=luc, resource="r")

    if sent == "a good payment":
        assert isinstance(outcome, Receipt) and (outcome.quote_id, outcome.luc_credited) == (first.quote_id, 40)
        assert balance(ledger) == 40
        return
    assert isinstance(outcome, Challenge) and snapshot(store) == before
    assert outcome.required.quote_id.startswith("qt_") and outcome.required.quote_id != first.quote_id
    assert (outcome.required.agent_id, outcome.required.luc) == (AGENT, luc)
    refusal = None if outcome.refusal is None else (outcome.refusal.code, outcome.refusal.param)
    assert refusal == {"nothing": None, "a payment for other luc": ("invalid_payment_requirements", "luc"),
                       "a tampered payment": ("invalid_exact_evm_payload_authorization_value_mismatch",
                                              "payment")}[sent]
