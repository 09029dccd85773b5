"""x402 payments: payment requirements (402 challenges), verification, settlement, receipts once, wallet credits.

Quotes. A quote is what a payment settles: amount (atomic USDC), network, asset, pay-to, the agent wallet and the
LUC a payment credits, expiry. Two kinds, one behaviour:
- a stored quote (`create_requirements`, the MCP tool: authenticated callers): a row in `x402_quotes`; open quotes
  expire, are swept (`sweep_expired_quotes`, from the server's background sweep) and are capped in number;
- a challenge (`challenge`: GET /x402/credits and purchase_luc_credits without a payment) costs no storage: its
  quote id is a token `qt_<base64url JSON>.<HMAC>` that describes the quote itself, signed with a server key kept
  in the database (`x402_quote_key`, one row: every process and instance on the database signs and verifies with
  the same key; made on first use, never printed). It is stored only when paid, as a paid row in the transaction
  that records the receipt. A key file an older release kept beside the SQLite database (`<db stem>.x402.key`) is
  imported as that first key, so the challenges it signed stay payable.
The quote a payment settles is the one the payer accepted: a v2 payment names it in `accepted.extra.quoteId`; a
caller's quote_id, agent_id or luc that disagrees is refused and nothing is credited. Only a v1 payment (which
names no quote) takes its quote from the caller.

Bearer payments and payer registration. The EIP-3009 signature covers from, to, value, the time window and the nonce,
not the quote id: an unredeemed payment header is a bearer instrument, and whoever holds it can rewrite the quote it
names to another of the same price. A wallet closes that by registering its payer addresses (`register_payer`, each
proven by an EIP-191 signature of `payer_registration_message`): a wallet with registered payers accepts payments
only from them, and a registered address pays only its wallets' quotes.

Verification. `verify_and_settle` decodes the payment (a base64 `PAYMENT-SIGNATURE`/`X-PAYMENT` header value or its
JSON, at most MAX_PAYMENT_CHARS), checks it against the quote (version, scheme, network, asset, recipient, exact
amount, validAfter <= now < validBefore, nonce shape, quote open and unexpired, payer registration), then verifies
and settles it in the configured mode:
- `local`: the SDK's own exact-EVM facilitator (`ExactEvmScheme`) over an offline `FacilitatorEvmSigner`
  (`x402_signer.py`): EIP-712 signature recovery of `from`, nonce state from our receipts table, simulated
  settlement with a deterministic tx hash (no money moves: refused in live mode);
- `http`: a remote facilitator's `/verify` and `/settle` through the SDK's `HTTPFacilitatorClient`;
- `stripe`: the payment is a PaymentIntent id, re-read through the gateway: succeeded, amount_received equal to the
  quote (cents), currency usd, metadata.quote_id equal to the quote.
Then ONE store job records the receipt, marks the quote paid and credits the wallet: the UNIQUE keys (network,
asset, payer, nonce), tx hash, PaymentIntent id and quote id guard replays in the same transaction as the credit,
so a replay (even racing from another process) credits nothing and answers `invalid_exact_evm_nonce_already_used`
(`payment_intent_already_used` for a PaymentIntent). These keys are global, not per agent: a payment is a payment.

Live mode (an sk_live_ key): no default pay-to, no `local` settlement, mainnet only (`live_mode_problem`); until
configured every x402 call answers a ConfigurationError naming the setting.

Errors are `PaymentRejected` whose code is the x402 spec's reason (the SDK's constants, mirrored below so this
module imports nothing heavy; tests check they match). The SDK's EVM stack costs about half a second to import: it
is imported on the first verification, never at server start.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import jsonsafe
from ..errors import ConfigurationError, InvalidInput, LimitReached, NotFound, PaymentRejected, StripeError
from ..store import Store, Tx, dumps, new_id, utc_iso, utc_now
from ..store.x402 import TRANSITIONS, Quote, QuoteStatus, ReceiptConflict, ReceiptRecord, quote_state
from .ceiling import Ceiling
from .connect import ConnectService
from .ledger import LedgerService, require_text
from .tiers import Pricing
from .x402_models import Mode, PayerRegistration, Receipt, ReceiptRow, RequirementsResult

if TYPE_CHECKING:
    from ..settings import Settings

# A fixed, valid test address payments go to in sandbox/test mode when AIMS_X402_PAY_TO is unset. Its key is
# unknown (it is the last 20 bytes of keccak256(b"aims-billing-mcp sandbox x402 pay-to")): never use it on mainnet.
SANDBOX_PAY_TO = "0x88905996E9aFA7565698F7d1cfC71b4D4b3840d7"

SCHEME_EXACT = "exact"
USDC_DECIMALS = 6
ATOMIC_PER_USD = 10**USDC_DECIMALS
MAX_ATOMIC = 10**13  # 10 million USD: far above any credit purchase
MAX_VALID_SECONDS = 86_400
MAX_TEXT = 500
MAX_RESOURCE = 2048
MAX_LUC = 10**9  # LUC one purchase may credit (purchase_luc_credits, GET /x402/credits)
MAX_PAYMENT_CHARS = 16_384  # a payment header value (a v2 payment is about 1.5 KB)
MAX_QUOTE_ID = 512  # a challenge token (qt_...) with the longest agent id is about 400 characters
MAX_PAYERS = 20  # payer addresses one wallet may register
MAX_OPEN_QUOTES = 10_000  # stored quotes open at once: pay them or let them expire
EXPIRED_QUOTE_GRACE = 3600  # an expired open quote is kept this long (so a late payer is told "expired"), then swept
CHALLENGE_SECONDS = 300
TOKEN_PREFIX = "qt_"
_TOKEN_CONTEXT = b"aims-billing-mcp x402 quote v1"

# network name -> (CAIP-2 id, chain id, USDC address, EIP-712 domain name, version): the SDK's DEFAULT_ASSETS entries
NETWORKS: dict[str, tuple[str, int, str, str, str]] = {
    "base": ("eip155:8453", 8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin", "2"),
    "base-sepolia": ("eip155:84532", 84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2"),
}
CAIP_TO_NAME = {caip: name for name, (caip, *_rest) in NETWORKS.items()}

# Reason codes: the x402 spec's (x402.mechanisms.evm.constants ERR_* where the SDK has them).
ERR_INVALID_SIGNATURE = "invalid_exact_evm_payload_signature"
ERR_RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
ERR_AUTHORIZATION_VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
ERR_VALID_BEFORE_EXPIRED = "invalid_exact_evm_payload_authorization_valid_before"
ERR_VALID_AFTER_FUTURE = "invalid_exact_evm_payload_authorization_valid_after"
ERR_NONCE_ALREADY_USED = "invalid_exact_evm_nonce_already_used"
ERR_ASSET_MISMATCH = "invalid_exact_evm_payload_asset_mismatch"
ERR_INVALID_NETWORK = "invalid_network"
ERR_INVALID_SCHEME = "invalid_scheme"
ERR_INVALID_VERSION = "invalid_x402_version"
ERR_INVALID_PAYLOAD = "invalid_payload"
ERR_INVALID_REQUIREMENTS = "invalid_payment_requirements"  # unknown, expired or already paid quote
ERR_INVALID_TRANSACTION_STATE = "invalid_transaction_state"  # a PaymentIntent not succeeded
ERR_PAYMENT_INTENT_ALREADY_USED = "payment_intent_already_used"
ERR_UNEXPECTED_SETTLE = "unexpected_settle_error"
ERR_PAYER_NOT_REGISTERED = "payer_not_registered"  # ours: payer registration (not an x402 spec reason)

SENTENCES = {
    ERR_INVALID_SIGNATURE: "the EIP-712 TransferWithAuthorization signature does not recover the authorization's "
                           "`from` address: sign the authorization exactly as sent, with the payer's key",
    ERR_RECIPIENT_MISMATCH: "the authorization pays another address than the quote's payTo: pay payTo",
    ERR_AUTHORIZATION_VALUE_MISMATCH: "the authorization's value is not the quote's exact amount: sign the amount "
                                      "of the requirements",
    ERR_VALID_BEFORE_EXPIRED: "the authorization has expired (validBefore is past): sign a new one",
    ERR_VALID_AFTER_FUTURE: "the authorization is not valid yet (validAfter is in the future): wait or re-sign",
    ERR_NONCE_ALREADY_USED: "this authorization (payer and nonce) was already settled: a payment is accepted once; "
                            "sign a new authorization with a fresh nonce for a new quote",
    "invalid_exact_evm_insufficient_balance": "the payer's balance is below the amount",
    "invalid_exact_evm_failed_to_verify_signature": "the signature could not be verified",
    "invalid_exact_evm_payload_undeployed_smart_wallet": "smart-wallet signatures need a chain: pay from an EOA",
    "network_mismatch": "the payment's network is not the requirements' network",
    "unsupported_scheme": "only the exact scheme is accepted",
    ERR_PAYER_NOT_REGISTERED: "the authorization's `from` is not a registered payer of the quote's wallet",
}

_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_HEX_NONCE = re.compile(r"^0x[0-9a-fA-F]{64}$")
_HEX_SIGNATURE = re.compile(r"^0x(?:[0-9a-fA-F]{2})+$")
_UINT = re.compile(r"^[0-9]{1,78}$")
_USD = re.compile(r"^(?:0|[1-9][0-9]{0,12})(?:\.[0-9]{1,6})?$")


def usd_of(atomic: int) -> str:
    """Atomic USDC as a plain USD decimal string ("1.5", "0.000001")."""
    whole, frac = divmod(atomic, ATOMIC_PER_USD)
    return f"{whole}.{frac:06d}".rstrip("0").rstrip(".") if frac else str(whole)


def encode_header(obj: Any) -> str:
    """Base64 of the JSON wire form (camelCase, nulls left out) of a model or dict: the x402 header encoding."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(by_alias=True, exclude_none=True)
    return base64.b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode()


def decode_payment_header(value: str | dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A payment as sent: the base64 value of a `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) header, its JSON text,
    or the parsed object. Returns (x402Version, object); refuses malformed base64/JSON and unknown versions."""
    if isinstance(value, dict):
        obj: Any = value
    elif isinstance(value, str):
        if len(value) > MAX_PAYMENT_CHARS:
            raise PaymentRejected(ERR_INVALID_PAYLOAD, f"the payment is {len(value)} characters long: a payment "
                                  f"header value is at most {MAX_PAYMENT_CHARS}; send the value the x402 client "
                                  "built", param="payment")
        text = value.strip()
        if not text:
            raise PaymentRejected(ERR_INVALID_PAYLOAD, "the payment is empty: send the PAYMENT-SIGNATURE header value",
                                  param="payment")
        if not text.startswith("{"):
            try:
                padded = text + "=" * (-len(text) % 4)
                raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
                text = raw.decode("utf-8")
            except (binascii.Error, ValueError):
                raise PaymentRejected(ERR_INVALID_PAYLOAD, "the payment is neither base64 nor JSON: send the "
                                      "PAYMENT-SIGNATURE (or X-PAYMENT) header value unchanged",
                                      param="payment") from None
        try:
            obj = jsonsafe.loads(text)
        except ValueError:
            raise PaymentRejected(ERR_INVALID_PAYLOAD, "the payment's base64 does not decode to JSON: send the "
                                  "header value unchanged", param="payment") from None
    else:
        raise PaymentRejected(ERR_INVALID_PAYLOAD, "the payment must be a header value (string) or a JSON object",
                              param="payment")
    if not isinstance(obj, dict):
        raise PaymentRejected(ERR_INVALID_PAYLOAD, "the payment must be a JSON object", param="payment")
    version = obj.get("x402Version")
    if isinstance(version, bool) or version not in (1, 2):
        raise PaymentRejected(ERR_INVALID_VERSION, f"x402Version {version!r} is not supported: send version 2 "
                              "(PAYMENT-SIGNATURE) or 1 (X-PAYMENT)", param="payment")
    return int(version), obj


def named_quote(obj: dict[str, Any]) -> str | None:
    """The quote a decoded v2 payment accepted (`accepted.extra.quoteId`); None for v1, which names none."""
    accepted = obj.get("accepted")
    extra = accepted.get("extra") if isinstance(accepted, dict) else None
    quote = extra.get("quoteId") if isinstance(extra, dict) else None
    return quote if isinstance(quote, str) else None


def payer_registration_message(agent_id: str, address: str, pay_to: str) -> str:
    """The text a payer address signs (EIP-191 personal_sign) to register for a wallet on this server (pay_to)."""
    return (f"aims-billing-mcp x402 payer registration\nagent: {agent_id}\npayer: {address.lower()}\n"
            f"pay-to: {pay_to.lower()}")


def live_mode_problem(*, live: bool, pay_to: str | None, facilitator: str, network: str) -> str | None:
    """Why x402 must refuse to sell in live mode with these settings, or None."""
    if not live:
        return None
    problems = []
    if not pay_to:
        problems.append("AIMS_X402_PAY_TO is unset: set it to the 0x address you receive USDC at (live mode has no "
                        "default pay-to)")
    if facilitator == "local":
        problems.append("AIMS_X402_FACILITATOR=local settles offline and moves no money: set "
                        "AIMS_X402_FACILITATOR=http with AIMS_X402_FACILITATOR_URL (a real facilitator), or stripe")
    if network != "base":
        problems.append(f"AIMS_X402_NETWORK={network} is a test network: live mode sells for USDC on base")
    return "x402 is refused in live mode: " + "; ".join(problems) if problems else None


def x402_status(settings: Settings) -> str:
    """One line for `doctor`: why x402 is refused (`live_mode_problem`, as the server answers every x402 call), or
    how it settles."""
    from ..settings import StripeMode

    live = settings.stripe_mode is StripeMode.LIVE
    network = settings.aims_x402_network or ("base" if live else "base-sepolia")
    facilitator = settings.aims_x402_facilitator
    problem = live_mode_problem(live=live, pay_to=settings.aims_x402_pay_to, facilitator=facilitator,
                                network=network)
    if problem is not None:
        return f"REFUSED: {problem}"
    how = {"local": "local (offline: no money moves)", "http": "http (AIMS_X402_FACILITATOR_URL)",
           "stripe": "stripe (PaymentIntents)"}[facilitator]
    pay_to = settings.aims_x402_pay_to or f"{SANDBOX_PAY_TO} (the sandbox test address)"
    return f"settles {how} on {network}, pays to {pay_to}"


def legacy_quote_key(path: Path) -> str | None:
    """The challenge-token key an older release kept in `path` beside the SQLite database (64 hex digits), if it is
    there and well-formed: imported once into the database, so the challenges it signed stay payable."""
    try:
        text = path.read_bytes().decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if re.fullmatch(r"[0-9a-f]{64}", text) else None


def parse_quote_key(text: str) -> bytes:
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ConfigurationError("the x402 challenge key stored in the database (table x402_quote_key) is malformed: "
                                 "delete its row to make a new one (open challenges are then refused)")
    return bytes.fromhex(text)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _rejected(reason: str, detail: str | None = None, **extra: Any) -> PaymentRejected:
    sentence = SENTENCES.get(reason, f"the payment was refused ({reason})")
    if detail:
        sentence = f"{sentence} ({detail})"
    return PaymentRejected(reason, f"payment refused: {sentence}", param="payment", **extra)


class _Authorization:
    __slots__ = ("nonce", "payer", "signature", "to", "valid_after", "valid_before", "value")

    def __init__(self, payload: dict[str, Any]) -> None:
        auth = payload.get("authorization")
        signature = payload.get("signature")
        if not isinstance(auth, dict):
            raise PaymentRejected(ERR_INVALID_PAYLOAD, "the payment has no payload.authorization: send an exact-EVM "
                                  "(EIP-3009) payment", param="payment")
        fields = {k: auth.get(k) for k in ("from", "to", "value", "validAfter", "validBefore", "nonce")}
        bad = [k for k in ("from", "to") if not _HEX_ADDRESS.match(str(fields[k]))]
        bad += [k for k in ("value", "validAfter", "validBefore")
                if not (isinstance(fields[k], str | int) and not isinstance(fields[k], bool)
                        and _UINT.match(str(fields[k])))]
        if not (isinstance(fields["nonce"], str) and _HEX_NONCE.match(str(fields["nonce"]))):
            bad.append("nonce (32 bytes as 0x + 64 hex digits)")
        if not (isinstance(signature, str) and _HEX_SIGNATURE.match(signature)):
            bad.append("signature")
        if bad:
            raise PaymentRejected(ERR_INVALID_PAYLOAD, f"the authorization's {', '.join(bad)} are missing or "
                                  "malformed", param="payment", fields=bad)
        self.payer = str(fields["from"])
        self.to = str(fields["to"])
        self.value = int(str(fields["value"]))
        self.valid_after = int(str(fields["validAfter"]))
        self.valid_before = int(str(fields["validBefore"]))
        self.nonce = str(fields["nonce"]).lower()
        self.signature = str(signature)


@dataclass(frozen=True, slots=True)
class Challenge:
    """A 402 answer (`pay_or_challenge`): the requirements to pay and, after a refused payment, why it was refused."""

    required: RequirementsResult
    refusal: PaymentRejected | None = None


class X402Service:
    def __init__(
        self, store: Store, ledger: LedgerService, gateway: Any, pricing: Pricing, *, pay_to: str | None = None,
        network: str = "base-sepolia", facilitator: str = "local", facilitator_url: str | None = None,
        clock: Callable[[], float] = time.time, live: bool = False, quote_key: bytes | None = None,
        max_open_quotes: int = MAX_OPEN_QUOTES, ceiling: Ceiling | None = None, connect: ConnectService | None = None,
    ) -> None:
        """`live`: the Stripe key is a live one (see `live_mode_problem`). `quote_key`: the challenge tokens' HMAC
        key; by default the database's (`x402_quote_key`), read (or stored) on first use.
        `max_open_quotes`: stored quotes open at once."""
        if pay_to is not None and not _HEX_ADDRESS.match(pay_to):
            raise ValueError(f"pay_to must be a 0x address of 40 hex digits, got {pay_to!r}")
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")
        if facilitator not in ("local", "http", "stripe"):
            raise ValueError(f"facilitator must be local, http or stripe, got {facilitator!r}")
        if facilitator == "http" and not facilitator_url:
            raise ValueError("the http facilitator needs AIMS_X402_FACILITATOR_URL")
        # In live mode there is no default pay-to, no offline settlement and no test network: every call refuses
        self.problem = live_mode_problem(live=live, pay_to=pay_to, facilitator=facilitator, network=network)
        self._store = store
        self._connect = connect  # quotes for "plug:<id>" resources pay its creator (services/connect.py)
        self._ledger = ledger
        self._ceiling = ceiling or Ceiling()  # the per-call money ceiling, in USDC's minor units here
        self._gateway = gateway
        self._luc_per_usd = pricing.luc_per_usd
        self.pay_to = pay_to or ("" if live else SANDBOX_PAY_TO)  # "" is never used: live without it refuses
        self.network = network
        self.live = live
        self.mode: Mode = facilitator  # type: ignore[assignment]
        self.facilitator_url = facilitator_url
        self._clock = clock
        self._quote_key = quote_key
        self._max_open_quotes = max_open_quotes
        self._schemes: dict[str, Any] = {}
        self._http_client: Any = None

    @classmethod
    def from_settings(cls, store: Store, ledger: LedgerService, gateway: Any, pricing: Pricing,
                      settings: Settings, *, clock: Callable[[], float] = time.time,
                      ceiling: Ceiling | None = None, connect: ConnectService | None = None) -> X402Service:
        """As the server builds it: live mode is the key's (sk_live_/rk_live_, allowed or not), not the gateway's."""
        from ..settings import StripeMode

        live = settings.stripe_mode is StripeMode.LIVE
        return cls(store, ledger, gateway, pricing, pay_to=settings.aims_x402_pay_to,
                   network=settings.aims_x402_network or ("base" if live else "base-sepolia"),
                   facilitator=settings.aims_x402_facilitator, facilitator_url=settings.aims_x402_facilitator_url,
                   live=live, clock=clock, ceiling=ceiling, connect=connect)

    def _ready(self) -> None:
        if self.problem is not None:
            setting = next(name for name in ("AIMS_X402_PAY_TO", "AIMS_X402_FACILITATOR", "AIMS_X402_NETWORK")
                           if name in self.problem)
            raise ConfigurationError(self.problem, param=setting)

    def _key(self) -> bytes:
        """The database's challenge key (read once per process); the first use on a new database stores one (the
        server does that at start-up: `load_key`)."""
        if self._quote_key is None:
            stored = self._store.x402.quote_key()
            if stored is None:
                stored = self._store.write_sync(self._add_key())
            self._quote_key = parse_quote_key(stored)
        return self._quote_key

    async def load_key(self) -> None:
        """Read (or, on a new database, store) the challenge key now: at start-up, so that no anonymous challenge
        is the request that writes it."""
        if self._quote_key is None:
            stored = self._store.x402.quote_key()
            if stored is None:
                stored = await self._store.write(self._add_key())
            self._quote_key = parse_quote_key(stored)

    def _add_key(self) -> Callable[[Tx], str]:
        path = getattr(self._store, "path", None)  # SQLite: a key file an older release kept beside the database
        candidate = (legacy_quote_key(path.with_name(f"{path.stem}.x402.key")) if path is not None
                     else None) or os.urandom(32).hex()
        return lambda tx: self._store.x402.add_quote_key(tx, candidate, utc_now())

    # --- requirements ---------------------------------------------------------------------------------------

    async def create_requirements(
        self, *, amount_usd: str | None = None, amount_atomic: int | None = None, luc: int | None = None,
        agent_id: str | None = None, description: str, resource: str, network: str | None = None,
        valid_seconds: int = 300, version: int = 2,
    ) -> RequirementsResult:
        """Store a quote and return its x402 PaymentRequired (v2, or v1 with version=1). Exactly one of amount_usd
        (decimal string, at most 6 decimals), amount_atomic (USDC units) or luc (priced at luc_per_usd). At most
        MAX_OPEN_QUOTES are open at once; expired ones are swept."""
        self._ready()
        atomic, credit = self._price(amount_usd, amount_atomic, luc, agent_id)
        name = self._network(network)
        if isinstance(valid_seconds, bool) or not isinstance(valid_seconds, int) \
                or not 1 <= valid_seconds <= MAX_VALID_SECONDS:
            raise InvalidInput(f"valid_seconds must be a whole number from 1 to {MAX_VALID_SECONDS}, got "
                               f"{valid_seconds!r}", param="valid_seconds")
        if version not in (1, 2) or isinstance(version, bool):
            raise InvalidInput(f"version must be 1 or 2, got {version!r}", param="version")
        require_text(description, "description", MAX_TEXT)
        require_text(resource, "resource", MAX_RESOURCE)
        self._whole_cents(atomic, "amount_usd")
        self._require_wallet(agent_id)
        if self._connect is not None and resource.startswith("plug:"):  # a creator's plug (services/connect.py)
            await self._connect.check_x402_plug(resource, atomic)
        caip = NETWORKS[name][0]
        quote_id = new_id("q")
        now = self._clock()
        expires = int(now) + valid_seconds
        quote = Quote(quote_id, caip, NETWORKS[name][2], self.pay_to, atomic, agent_id, credit, description, resource,
                      version, QuoteStatus.OPEN, expires, utc_iso(now))
        limit, quotes = self._max_open_quotes, self._store.x402

        def insert(tx: Tx) -> None:
            open_quotes = quotes.count_open_quotes(tx, int(now))
            if open_quotes >= limit:
                raise LimitReached(f"{open_quotes} x402 quotes are open (at most {limit}): pay them or let them "
                                   "expire (shorter valid_seconds) before asking for more", param="valid_seconds")
            quotes.add_quote(tx, quote)  # a new id: never taken

        await self._store.write(insert)
        return self._requirements(quote_id, name, atomic, agent_id, credit, description, resource, valid_seconds,
                                  expires, version)

    async def challenge(self, *, agent_id: str, luc: int, resource: str) -> RequirementsResult:
        """A 402 challenge for `luc` credits to `agent_id` that stores nothing: its quote id is a signed token
        describing the quote (CHALLENGE_SECONDS to pay it), stored only when paid."""
        self._ready()
        if isinstance(luc, bool) or not isinstance(luc, int) or not 1 <= luc <= MAX_LUC:
            raise InvalidInput(f"luc must be a whole number from 1 to {MAX_LUC}, got {luc!r}", param="luc")
        atomic, credit = self._price(None, None, luc, agent_id)
        self._whole_cents(atomic, "luc")
        require_text(resource, "resource", MAX_RESOURCE)
        self._require_wallet(agent_id)
        name = self._network(None)
        now = int(self._clock())
        expires = now + CHALLENGE_SECONDS
        quote_id = self._token({"a": agent_id, "l": credit, "m": atomic, "n": NETWORKS[name][0], "e": expires,
                                "c": now, "r": resource, "i": _b64(os.urandom(9))})
        return self._requirements(quote_id, name, atomic, agent_id, credit, _credits_description(credit, agent_id),
                                  resource, CHALLENGE_SECONDS, expires, 2)

    def _whole_cents(self, atomic: int, param: str) -> None:
        if self.mode == "stripe" and atomic % 10_000:
            raise InvalidInput(f"{usd_of(atomic)} USD is not a whole number of cents, which a Stripe PaymentIntent "
                               "needs: round the amount to cents", param=param)

    def _network(self, network: str | None) -> str:
        name = network or self.network
        if name not in NETWORKS:
            raise InvalidInput(f"network {name!r} is not one of {', '.join(NETWORKS)}", param="network")
        if self.live and name != "base":
            raise InvalidInput(f"network {name} is a test network: in live mode payments are USDC on base",
                               param="network")
        return name

    def _require_wallet(self, agent_id: str | None) -> None:
        if agent_id is not None and not self._store.x402.wallet_exists(agent_id):
            raise NotFound(f"no wallet for agent {agent_id}: create it with create_agent_wallet, or check the id",
                           param="agent_id")

    def _requirements(self, quote_id: str, name: str, atomic: int, agent_id: str | None, credit: int,
                      description: str, resource: str, valid_seconds: int, expires: int,
                      version: int) -> RequirementsResult:
        caip, _chain, asset, domain_name, domain_version = NETWORKS[name]
        required = self._payment_required(quote_id, caip, asset, atomic, description, resource, valid_seconds,
                                          version, domain_name, domain_version)
        return RequirementsResult(
            quote_id=quote_id, x402_version=1 if version == 1 else 2, network=caip, asset=asset, pay_to=self.pay_to,
            amount_atomic=str(atomic), amount_usd=usd_of(atomic), agent_id=agent_id, luc=credit,
            max_timeout_seconds=valid_seconds, expires_at=utc_iso(expires), payment_required=required,
            header=encode_header(required))

    # --- challenge tokens -------------------------------------------------------------------------------------

    def _mac(self, body: str) -> bytes:
        message = b"\0".join((_TOKEN_CONTEXT, body.encode(), self.pay_to.lower().encode()))
        return hmac.new(self._key(), message, hashlib.sha256).digest()[:16]

    def _token(self, fields: dict[str, Any]) -> str:
        body = _b64(json.dumps(fields, separators=(",", ":"), sort_keys=True).encode())
        return f"{TOKEN_PREFIX}{body}.{_b64(self._mac(body))}"

    def _token_quote(self, quote_id: str) -> Quote | None:
        """The quote a challenge token describes, if this server signed it (for this pay-to); else None."""
        body, _, mac = quote_id.removeprefix(TOKEN_PREFIX).partition(".")
        try:
            if not hmac.compare_digest(_unb64(mac), self._mac(body)):
                return None
            fields = json.loads(_unb64(body))
            return Quote(id=quote_id, network=fields["n"], asset=NETWORKS[CAIP_TO_NAME[fields["n"]]][2],
                         pay_to=self.pay_to, amount=int(fields["m"]), agent_id=str(fields["a"]), luc=int(fields["l"]),
                         description=_credits_description(fields["l"], fields["a"]), resource=str(fields["r"]),
                         x402_version=2, status=QuoteStatus.OPEN, expires_at=int(fields["e"]),
                         created_at=utc_iso(fields["c"]), stored=False)
        except (ValueError, KeyError, TypeError):  # binascii.Error is a ValueError; a signed token of an older shape
            return None

    def _price(self, amount_usd: str | None, amount_atomic: int | None, luc: int | None,
               agent_id: str | None) -> tuple[int, int]:
        given = [n for n, v in (("amount_usd", amount_usd), ("amount_atomic", amount_atomic), ("luc", luc))
                 if v is not None]
        if len(given) != 1:
            raise InvalidInput("give exactly one of amount_usd (e.g. \"1.50\"), amount_atomic (USDC units) or luc, "
                               f"got {', '.join(given) or 'none'}", param="amount_usd")
        if amount_usd is not None:
            if not isinstance(amount_usd, str) or not _USD.match(amount_usd.strip()):
                raise InvalidInput(f"amount_usd must be a decimal string with at most 6 decimals such as \"1.50\", "
                                   f"got {amount_usd!r}", param="amount_usd")
            try:
                atomic = int(Decimal(amount_usd.strip()) * ATOMIC_PER_USD)
            except InvalidOperation:  # pragma: no cover - the pattern already refused it
                raise InvalidInput(f"amount_usd {amount_usd!r} is not a number", param="amount_usd") from None
            param = "amount_usd"
        elif amount_atomic is not None:
            if isinstance(amount_atomic, bool) or not isinstance(amount_atomic, int):
                raise InvalidInput(f"amount_atomic must be a whole number of USDC units, got {amount_atomic!r}",
                                   param="amount_atomic")
            atomic, param = amount_atomic, "amount_atomic"
        else:
            if isinstance(luc, bool) or not isinstance(luc, int) or luc <= 0:
                raise InvalidInput(f"luc must be a positive whole number, got {luc!r}", param="luc")
            if agent_id is None:
                raise InvalidInput("luc names credits to buy: give agent_id, the wallet to credit", param="agent_id")
            atomic, param = -(-luc * ATOMIC_PER_USD // self._luc_per_usd), "luc"  # rounded up: never under-priced
        if atomic <= 0 or atomic > MAX_ATOMIC:
            raise InvalidInput(f"the amount must be above 0 and at most {usd_of(MAX_ATOMIC)} USD, got "
                               f"{usd_of(max(atomic, 0))} USD", param=param)
        self._ceiling.check(atomic, "usdc", param)
        if luc is not None:
            return atomic, luc
        if agent_id is None:
            return atomic, 0
        credit = atomic * self._luc_per_usd // ATOMIC_PER_USD
        if credit == 0:
            raise InvalidInput(f"{usd_of(atomic)} USD buys 0 LUC at {self._luc_per_usd} LUC per USD: pay more, or "
                               "leave agent_id out for a payment that credits nothing", param=param)
        return atomic, credit

    def _payment_required(self, quote_id: str, caip: str, asset: str, atomic: int, description: str, resource: str,
                          valid_seconds: int, version: int, domain_name: str, domain_version: str) -> dict[str, Any]:
        from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo
        from x402.schemas.v1 import PaymentRequiredV1, PaymentRequirementsV1

        extra = {"name": domain_name, "version": domain_version, "quoteId": quote_id}
        model: Any
        if version == 2:
            model = PaymentRequired(
                error="payment required", resource=ResourceInfo(url=resource, description=description,
                                                                mime_type="application/json"),
                accepts=[PaymentRequirements(scheme=SCHEME_EXACT, network=caip, asset=asset, amount=str(atomic),
                                             pay_to=self.pay_to, max_timeout_seconds=valid_seconds,
                                             extra=extra)])
        else:
            model = PaymentRequiredV1(
                error="payment required",
                accepts=[PaymentRequirementsV1(scheme=SCHEME_EXACT, network=CAIP_TO_NAME[caip],
                                               max_amount_required=str(atomic), resource=resource,
                                               description=description, mime_type="application/json",
                                               pay_to=self.pay_to, max_timeout_seconds=valid_seconds,
                                               asset=asset, extra=extra)])
        out: dict[str, Any] = model.model_dump(by_alias=True, exclude_none=True)
        return out

    # --- verification and settlement ------------------------------------------------------------------------

    async def pay_or_challenge(self, payment: str | dict[str, Any] | None, *, agent_id: str, luc: int,
                               resource: str, quote_id: str | None = None) -> Receipt | Challenge:
        """The paid purchase of `luc` credits for `agent_id` (the paid tool, GET /x402/credits): without a payment,
        a challenge that stores nothing; with one, the payment verified, settled and credited for exactly this
        purchase (one made for another agent or amount is refused), or, if it is refused, a fresh challenge carrying
        the refusal. `quote_id` only for a payment that names none (v1). Errors other than a refused payment (an
        unknown wallet, a configuration refusing x402) are raised."""
        refusal = None
        if payment is not None:
            try:
                return await self.verify_and_settle(payment, quote_id=quote_id, agent_id=agent_id, luc=luc)
            except PaymentRejected as exc:
                refusal = exc
        return Challenge(await self.challenge(agent_id=agent_id, luc=luc, resource=resource), refusal)

    async def verify_and_settle(self, payment: str | dict[str, Any], *, quote_id: str | None = None,
                                agent_id: str | None = None, luc: int | None = None) -> Receipt:
        """Verify a payment, settle it, and record receipt + quote paid + wallet credit at once. The quote is the one
        the payment accepted (a v2 payment's `accepted.extra.quoteId`); `quote_id` is needed only for a payment
        that names none (v1, a PaymentIntent). A `quote_id`, `agent_id` or `luc` given that disagrees with the
        quote is refused before anything is settled."""
        self._ready()
        if self.mode == "stripe":
            quote = self._quote_of(None, quote_id, agent_id, luc)
            return await self._stripe(payment, quote)
        version, obj = decode_payment_header(payment)
        quote = self._quote_of(named_quote(obj) if version == 2 else None, quote_id, agent_id, luc)
        auth, payload_v2, requirements = self._check(version, obj, quote)
        caip, asset, payer = quote.network, quote.asset.lower(), auth.payer.lower()
        if self._nonce_used(caip, asset, payer, auth.nonce):  # a replay is named as such, whatever the quote
            raise _rejected(ERR_NONCE_ALREADY_USED)
        _quote_payable(quote.id, quote.status, quote.expires_at, self._clock())
        self._check_payer(quote, payer)
        if self.mode == "local":
            settlement = self._settle_local(payload_v2, requirements)
        else:
            settlement = await self._settle_http(payload_v2, requirements)
        tx_hash = str(settlement.get("transaction") or "") or None
        receipt = await self._record(quote, version=version, network=caip, asset=asset, payer=payer,
                                     nonce=auth.nonce, tx_hash=tx_hash, payment_intent=None, settlement=settlement)
        if self._connect is not None and quote.resource.startswith("plug:"):
            await self._connect.settle_x402(receipt.receipt_id, quote.resource, quote.amount)
        return receipt

    def _quote_of(self, named: str | None, quote_id: str | None, agent_id: str | None,
                  luc: int | None) -> Quote:
        """The quote a payment settles, checked against what the caller says it is for."""
        if quote_id is not None and named is not None and quote_id != named:
            raise PaymentRejected(ERR_INVALID_REQUIREMENTS, f"the payment was made for quote {_short(named)} (its "
                                  f"accepted requirements name it), not quote {_short(quote_id)}: a payment settles "
                                  "the quote it accepted; leave quote_id out or pass that one", param="quote_id",
                                  quote_status="mismatch")
        quote = self._open_quote(named or quote_id)
        for field, asked, quoted in (("agent_id", agent_id, quote.agent_id), ("luc", luc, quote.luc)):
            if asked is not None and asked != quoted:
                raise PaymentRejected(ERR_INVALID_REQUIREMENTS, f"the payment's quote {_short(quote.id)} credits "
                                      f"{quote.luc} LUC to {quote.agent_id or 'no wallet'}, but this request "
                                      f"asks for {field} {asked}: a payment made for one purchase cannot pay "
                                      "another; pay the challenge of this request", param=field,
                                      quote_status="mismatch")
        return quote

    def _open_quote(self, quote_id: str | None) -> Quote:
        if not isinstance(quote_id, str) or not quote_id.strip():
            raise PaymentRejected(ERR_INVALID_REQUIREMENTS, "the payment names no quote (a v1 payment and a "
                                  "PaymentIntent name none): pay a version 2 PaymentRequired, whose accepted "
                                  "requirements name it, or pass quote_id where the call takes one", param="quote_id")
        if len(quote_id) > MAX_QUOTE_ID:
            raise PaymentRejected(ERR_INVALID_REQUIREMENTS, f"quote_id is {len(quote_id)} characters long: at most "
                                  f"{MAX_QUOTE_ID}; pass the quote id of the payment requirements", param="quote_id",
                                  quote_status="unknown")
        quote = self._store.x402.find_quote(quote_id)
        if quote is None and quote_id.startswith(TOKEN_PREFIX):
            quote = self._token_quote(quote_id)
        if quote is None:
            raise PaymentRejected(ERR_INVALID_REQUIREMENTS, f"unknown quote {_short(quote_id)}: ask for payment "
                                  "requirements first and pay the quote they name", param="quote_id",
                                  quote_status="unknown")
        return quote

    def _check_payer(self, quote: Quote, payer: str) -> None:
        """Payer registration: a wallet with registered payers is paid only by them, and a registered address pays
        only its wallets' quotes."""
        links = self._store.x402.payer_links(payer, quote.agent_id)
        if not links or any(r.address == payer and r.agent_id == quote.agent_id for r in links):
            return
        if any(r.agent_id == quote.agent_id for r in links):
            detail = f"wallet {quote.agent_id} accepts payments only from its registered payers, not {payer}"
        else:
            detail = (f"{payer} is registered to pay for other wallets only, and quote {_short(quote.id)} credits "
                      f"{quote.agent_id or 'no wallet'}")
        raise _rejected(ERR_PAYER_NOT_REGISTERED, f"{detail}: pay from a registered address, or register this one "
                        "with register_x402_payer")

    def _check(self, version: int, obj: dict[str, Any], quote: Quote) -> tuple[_Authorization, Any, Any]:
        """Everything that needs no signature work, against the quote; returns the payment as the SDK's v2 models."""
        from pydantic import ValidationError
        from x402.schemas import PaymentPayload, PaymentRequirements
        from x402.schemas.v1 import PaymentPayloadV1

        caip = quote.network
        name = CAIP_TO_NAME[caip]
        _c, _chain, asset, domain_name, domain_version = NETWORKS[name]
        requirements = PaymentRequirements(
            scheme=SCHEME_EXACT, network=caip, asset=asset, amount=str(quote.amount), pay_to=quote.pay_to,
            max_timeout_seconds=max(1, quote.expires_at - int(self._clock())),
            extra={"name": domain_name, "version": domain_version, "quoteId": quote.id})
        try:
            parsed: Any = (PaymentPayload if version == 2 else PaymentPayloadV1).model_validate(obj)
        except ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
            raise PaymentRejected(ERR_INVALID_PAYLOAD, f"the v{version} payment payload is malformed at "
                                  f"{', '.join(fields)}: send the payload the x402 client built",
                                  param="payment", fields=fields) from None
        if version == 2:
            scheme, network, paid_asset = parsed.accepted.scheme, parsed.accepted.network, parsed.accepted.asset
        else:
            scheme, network, paid_asset = parsed.scheme, NETWORKS.get(parsed.network, ("?",))[0], asset
        if scheme != SCHEME_EXACT:
            raise PaymentRejected(ERR_INVALID_SCHEME, f"scheme {scheme!r} is not accepted: pay with the exact scheme",
                                  param="payment")
        if network != caip:
            raise PaymentRejected(ERR_INVALID_NETWORK, f"the payment is on {network!r} but the quote is on {caip} "
                                  f"({name}): pay on {caip}", param="payment")
        if str(paid_asset).lower() != asset.lower():
            raise PaymentRejected(ERR_ASSET_MISMATCH, f"the payment is in asset {paid_asset} but the quote asks for "
                                  f"USDC {asset} on {name}", param="payment")
        auth = _Authorization(parsed.payload)
        if auth.to.lower() != quote.pay_to.lower():
            raise _rejected(ERR_RECIPIENT_MISMATCH, f"to {auth.to}, payTo {quote.pay_to}")
        if auth.value != quote.amount:
            raise _rejected(ERR_AUTHORIZATION_VALUE_MISMATCH, f"value {auth.value}, amount {quote.amount}")
        now = int(self._clock())
        if auth.valid_after > now:
            raise _rejected(ERR_VALID_AFTER_FUTURE, f"validAfter {auth.valid_after}, now {now}")
        if now >= auth.valid_before:
            raise _rejected(ERR_VALID_BEFORE_EXPIRED, f"validBefore {auth.valid_before}, now {now}")
        payload_v2 = parsed if version == 2 else PaymentPayload(payload=parsed.payload, accepted=requirements)
        return auth, payload_v2, requirements

    def _nonce_used(self, network: str, asset: str, payer: str, nonce: str) -> bool:
        return self._store.x402.nonce_used(network, asset.lower(), payer.lower(), nonce.lower())

    def _scheme(self, caip: str) -> Any:
        """The SDK's exact-EVM facilitator over the offline signer, one per network (built on first use)."""
        scheme = self._schemes.get(caip)
        if scheme is None:
            from x402.mechanisms.evm.exact.facilitator import ExactEvmScheme, ExactEvmSchemeConfig

            from .x402_signer import OfflineFacilitatorSigner

            _c, chain_id, asset, domain_name, domain_version = NETWORKS[CAIP_TO_NAME[caip]]
            signer = OfflineFacilitatorSigner(
                chain_id=chain_id, tokens={asset: (domain_name, domain_version)},
                nonce_used=lambda token, payer, nonce: self._nonce_used(caip, token, payer, nonce))
            # simulate_in_settle: settle runs the full verification (signature, then the simulated transfer, which
            # checks the nonce) once, instead of verify() and settle() recovering the signature twice
            scheme = ExactEvmScheme(signer, ExactEvmSchemeConfig(simulate_in_settle=True))
            self._schemes[caip] = scheme
        return scheme

    def _settle_local(self, payload: Any, requirements: Any) -> dict[str, Any]:
        result = self._scheme(str(requirements.network)).settle(payload, requirements)
        if not result.success:
            raise _rejected(result.error_reason or ERR_UNEXPECTED_SETTLE, result.error_message)
        out: dict[str, Any] = result.model_dump(by_alias=True, exclude_none=True)
        return out

    async def _settle_http(self, payload: Any, requirements: Any) -> dict[str, Any]:
        from x402.http import FacilitatorConfig, HTTPFacilitatorClient

        if self._http_client is None:
            self._http_client = HTTPFacilitatorClient(FacilitatorConfig(url=str(self.facilitator_url)))
        client = self._http_client
        try:
            verified = await client.verify(payload, requirements)
        except Exception as exc:
            raise PaymentRejected("unexpected_verify_error", f"the facilitator at {self.facilitator_url} did not "
                                  f"verify the payment: {exc}: retry later", param="payment", retryable=True) from exc
        if not verified.is_valid:
            raise _rejected(verified.invalid_reason or "unexpected_verify_error", verified.invalid_message)
        try:
            settled = await client.settle(payload, requirements)
        except Exception as exc:
            raise PaymentRejected(ERR_UNEXPECTED_SETTLE, f"the facilitator at {self.facilitator_url} did not settle "
                                  f"the payment: {exc}: retry later", param="payment", retryable=True) from exc
        if not settled.success:
            raise _rejected(settled.error_reason or ERR_UNEXPECTED_SETTLE, settled.error_message)
        out: dict[str, Any] = settled.model_dump(by_alias=True, exclude_none=True)
        return out

    async def aclose(self) -> None:
        if self._http_client is not None:
            await self._http_client.aclose()
            self._http_client = None

    async def _stripe(self, payment: str | dict[str, Any], quote: Quote) -> Receipt:
        from ..stripe_gateway import StripeRequest

        pi_id = payment.get("payment_intent") if isinstance(payment, dict) else payment
        if not (isinstance(pi_id, str) and re.fullmatch(r"pi_[A-Za-z0-9_]{1,200}", pi_id.strip())):
            raise PaymentRejected(ERR_INVALID_PAYLOAD, "in stripe mode the payment is a PaymentIntent id (pi_...): "
                                  "pay through Stripe and pass its id", param="payment")
        pi_id = pi_id.strip()
        if self._store.x402.payment_intent_used(pi_id):
            raise _pi_used(pi_id)
        _quote_payable(quote.id, quote.status, quote.expires_at, self._clock())
        try:
            pi = (await self._gateway.send(StripeRequest("get", f"/v1/payment_intents/{pi_id}"))).data
        except StripeError as exc:
            raise PaymentRejected(ERR_INVALID_PAYLOAD, f"PaymentIntent {pi_id} could not be read from Stripe: "
                                  f"{exc.message}", param="payment") from exc
        cents = quote.amount // 10_000
        if pi.get("status") != "succeeded":
            raise PaymentRejected(ERR_INVALID_TRANSACTION_STATE, f"PaymentIntent {pi_id} is {pi.get('status')}, not "
                                  "succeeded: confirm it first", param="payment")
        if (pi.get("metadata") or {}).get("quote_id") != quote.id:
            raise PaymentRejected(ERR_INVALID_REQUIREMENTS, f"PaymentIntent {pi_id} is not for quote {quote.id} "
                                  "(its metadata.quote_id differs): create it with metadata[quote_id]",
                                  param="payment")
        if pi.get("currency") != "usd" or pi.get("amount_received") != cents:
            raise PaymentRejected(ERR_AUTHORIZATION_VALUE_MISMATCH, f"PaymentIntent {pi_id} received "
                                  f"{pi.get('amount_received')} {pi.get('currency')} but the quote is {cents} usd "
                                  "cents", param="payment")
        payer = str(pi.get("customer") or "stripe")
        settlement = {"success": True, "transaction": pi_id, "network": quote.network, "payer": payer,
                      "amount": str(quote.amount)}
        return await self._record(quote, version=2, network="stripe", asset="usd", payer=payer, nonce=pi_id,
                                  tx_hash=None, payment_intent=pi_id, settlement=settlement)

    async def _record(self, quote: Quote, *, version: int, network: str, asset: str, payer: str, nonce: str,
                      tx_hash: str | None, payment_intent: str | None, settlement: dict[str, Any]) -> Receipt:
        """One job: receipt (UNIQUE keys), quote paid, wallet credited; any refusal undoes all three."""
        receipt_id = new_id("rcpt")
        quote_id, agent_id, luc = quote.id, quote.agent_id, quote.luc
        clock, ledger, mode, quotes = self._clock, self._ledger, self.mode, self._store.x402
        settlement_json = dumps(settlement)
        key = f"x402:{network}:{asset}:{payer}:{nonce}"

        def job(tx: Tx) -> tuple[str, int | None]:
            now = clock()
            iso = utc_iso(now)
            if quotes.payment_used(tx, network, asset, payer, nonce, tx_hash, payment_intent):
                raise _pi_used(payment_intent) if payment_intent else _rejected(ERR_NONCE_ALREADY_USED)
            if quote.stored:
                found = quotes.quote_status(tx, quote_id)
                status, expires_at = found if found is not None else (None, quote.expires_at)
                _quote_payable(quote_id, status, expires_at, now)
            else:  # a challenge token: stored now and marked paid below (its PRIMARY KEY refuses a second payment)
                _quote_payable(quote_id, quote.status, quote.expires_at, now)
                if not quotes.add_quote(tx, quote):
                    _quote_payable(quote_id, QuoteStatus.PAID, quote.expires_at, now)
            try:
                quotes.record_receipt(tx, ReceiptRecord(
                    receipt_id, quote_id, network, asset, payer, quote.pay_to, quote.amount, nonce, tx_hash, agent_id,
                    luc if agent_id else 0, iso, payment_intent, mode, version, settlement_json))
            except ReceiptConflict as exc:  # the constraints stand behind the check above
                if exc.on == "quote":
                    _quote_payable(quote_id, QuoteStatus.PAID, quote.expires_at, now)
                raise _pi_used(payment_intent) if payment_intent else _rejected(ERR_NONCE_ALREADY_USED) from exc
            quotes.mark_quote_paid(tx, quote_id, receipt_id, iso)
            balance = None
            if agent_id and luc:
                posting = ledger.credit_in(tx, agent_id, luc, idempotency_key=key, reason="x402 payment",
                                           reference=receipt_id)
                balance = posting.balance_after
            return iso, balance

        created_at, balance = await self._store.write(job)
        return Receipt(
            receipt_id=receipt_id, quote_id=quote_id, mode=mode, x402_version=version, network=network, asset=asset,
            payer=payer, pay_to=quote.pay_to, amount_atomic=str(quote.amount), amount_usd=usd_of(quote.amount),
            nonce=nonce, tx_hash=tx_hash, payment_intent=payment_intent, agent_id=agent_id,
            luc_credited=luc if agent_id else 0, balance_after=balance, settlement=settlement,
            payment_response_header=encode_header(settlement), created_at=created_at)

    # --- payer registration and housekeeping ---------------------------------------------------------------

    async def register_payer(self, *, agent_id: str, address: str, signature: str) -> PayerRegistration:
        """Register `address` as a payer of `agent_id`'s wallet, proven by its EIP-191 signature of
        `payer_registration_message` (so nobody registers an address they do not hold). Registering again is a
        no-op. From then on the wallet's quotes are paid only from its registered addresses, and the address pays
        only its wallets' quotes."""
        self._ready()
        if not isinstance(address, str) or not _HEX_ADDRESS.match(address):
            raise InvalidInput(f"address must be a 0x address of 40 hex digits, got {address!r}", param="address")
        if not isinstance(signature, str) or not _HEX_SIGNATURE.match(signature) or len(signature) != 132:
            raise InvalidInput("signature must be the 65-byte EIP-191 signature as 0x + 130 hex digits",
                               param="signature")
        self._require_wallet(agent_id)
        message = payer_registration_message(agent_id, address, self.pay_to)
        from eth_account import Account
        from eth_account.messages import encode_defunct

        try:
            signer = str(Account.recover_message(encode_defunct(text=message), signature=signature))
        except Exception:  # a malformed signature (bad v, s out of range): eth-account raises several types
            signer = ""
        if signer.lower() != address.lower():
            raise InvalidInput(f"the signature is not {address}'s signature of the registration message: sign "
                               f"exactly {message!r} with personal_sign (EIP-191) using that address's key",
                               param="signature", message_to_sign=message)
        lower, at, registry = address.lower(), utc_iso(self._clock()), self._store.x402

        def insert(tx: Tx) -> list[str]:
            known = registry.payers_of(tx, agent_id)
            if lower in known:
                return known
            if len(known) >= MAX_PAYERS:
                raise LimitReached(f"wallet {agent_id} has {len(known)} registered payers (at most {MAX_PAYERS}): "
                                   "pay from one of them", param="address")
            registry.register_payer(tx, lower, agent_id, at)
            return registry.payers_of(tx, agent_id)

        payers = await self._store.write(insert)
        return PayerRegistration(agent_id=agent_id, address=address.lower(), payers=payers, message=message)

    async def sweep_expired_quotes(self) -> int:
        """Delete stored quotes that expired unpaid more than EXPIRED_QUOTE_GRACE seconds ago; returns how many."""
        cutoff = int(self._clock()) - EXPIRED_QUOTE_GRACE

        quotes = self._store.x402
        return await self._store.write(lambda tx: quotes.sweep_quotes(tx, cutoff))

    # --- reads ----------------------------------------------------------------------------------------------

    def receipts(self, limit: int = 50) -> list[ReceiptRow]:
        """The most recent receipts, newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidInput(f"limit must be a whole number from 1 to 1000, got {limit!r}", param="limit")
        return [ReceiptRow(receipt_id=r.id, quote_id=r.quote_id, created_at=r.created_at, mode=r.mode,
                           network=r.network, asset=r.asset, payer=r.payer, amount_atomic=str(r.amount),
                           amount_usd=usd_of(r.amount), tx_hash=r.tx_hash, payment_intent=r.payment_intent,
                           agent_id=r.agent_id, luc_credited=r.luc_credited)
                for r in self._store.x402.recent_receipts(limit)]


def _quote_payable(quote_id: str, status: str | None, expires_at: int, now: float) -> None:
    """Refuse to pay a quote whose state (`status` as stored, None once swept) cannot move to paid at `now`."""
    state = quote_state(status, expires_at, now)
    if QuoteStatus.PAID in TRANSITIONS[state]:
        return
    if state is QuoteStatus.PAID:
        raise PaymentRejected(ERR_INVALID_REQUIREMENTS, f"quote {_short(quote_id)} is already paid: ask for new "
                              "payment requirements for a new purchase", param="quote_id",
                              quote_status=QuoteStatus.PAID.value)
    raise PaymentRejected(ERR_INVALID_REQUIREMENTS, f"quote {_short(quote_id)} expired at {utc_iso(expires_at)}: ask "
                          "for new payment requirements", param="quote_id", quote_status=QuoteStatus.EXPIRED.value)


def _short(quote_id: str) -> str:
    """A quote id for a message: a challenge token is long; its start is enough to tell which."""
    return quote_id if len(quote_id) <= 48 else quote_id[:40] + "..."


def _credits_description(luc: int, agent_id: str) -> str:
    return f"{luc} LUC credits for agent {agent_id}"


def _pi_used(payment_intent: str | None) -> PaymentRejected:
    return PaymentRejected(ERR_PAYMENT_INTENT_ALREADY_USED, f"PaymentIntent {payment_intent} already paid a quote: "
                           "each PaymentIntent pays once; create a new one for a new quote", param="payment")


