"""Marketplace splits on Stripe Connect: creators (connected accounts, Accounts v2), plugs (a one-time price sold
for a creator, with the creator's share) and the split of every sale of a plug.

- A creator is a v2 account with the `recipient` configuration's `stripe_transfers` capability requested; it can
  receive money once onboarding (an account link) is done. Its status follows Stripe: `account.updated` events are
  applied in order (an older event arriving late changes nothing), and `get_connected_account` reads Stripe's
  current state. A sale of a plug whose creator cannot receive transfers is refused before anything is sent to
  Stripe, naming the account and what Stripe still requires.
- `split_for(plug, amount, currency)` is the one split computation: the creator's share (basis points, rounded
  down: the platform keeps the remainder of a cent) or the amount less the platform's fixed fee per unit.
- Checkout sessions and payment links sell plugs as destination charges (`transfer_data[destination]` and
  `application_fee_amount`): Stripe moves the creator's share with the charge itself, so nothing can be paid
  without the creator being paid or transferred twice. A cart holding several creators' plugs is sold there as an
  ACP cart is (below): the platform's charge, then one transfer per creator once `checkout.session.completed` says
  it was paid (group `sale_<checkout session>`; a link's: each session it creates).
- Payment sessions and ACP checkouts of one creator's plugs are destination charges on the PaymentIntent, marked
  transferred in the transaction that records the payment's success (`paid`). An ACP cart of several creators'
  plugs is one platform charge with a `transfer_group`, then one transfer per creator (`source_transaction`: the
  charge) whose idempotency key derives from the payment session and the creator (`transfer_sale`).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

from ..errors import BillingError, InvalidInput, InvalidState, NotFound, Refused
from ..models import format_amount
from ..store import Store, Tx, new_id, utc_now
from ..store.connect import AccountStatus, ConnectedAccount, DuplicatePlug, Plug, Split, SplitStatus
from ..stripe_gateway import StripeGateway, StripeRequest, stripe_idempotency_key
from .background import Background
from .connect_models import (
    AccountLinkResult,
    ConnectedAccountList,
    ConnectedAccountResult,
    ConnectedAccountView,
    CreatorEarnings,
    EarningsReport,
    PayoutSchedule,
    PlugResult,
    PlugView,
    RefundSplitResult,
    SplitView,
)
from .fulfilment import Seller
from .idempotency import IdempotencyService
from .mutations import StripeMutations, compact

ACCOUNT_ID = re.compile(r"acct_[A-Za-z0-9]{1,64}")
INCLUDE = ["configuration.recipient", "requirements", "defaults", "identity"]
MAX_BP = 10_000
USDC_PER_CENT = 10_000  # USDC has 6 decimals: one cent is 10,000 atomic units
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SplitAmounts:
    """One sale's split, in minor units: gross = platform_fee + creator_amount."""

    gross: int
    platform_fee: int
    creator_amount: int


def split_for(plug: Plug, amount: int, currency: str, quantity: int = 1) -> SplitAmounts:
    """How `amount` (of `quantity` units of `plug`) splits between the creator and the platform."""
    if currency != plug.currency:
        raise InvalidInput(f"plug {plug.plug_id} is sold in {plug.currency}, not {currency}", param="currency")
    if amount < 0 or quantity < 1:
        raise InvalidInput("a sale's amount and quantity must be positive", param="amount")
    if plug.share_bp is not None:
        creator = amount * plug.share_bp // MAX_BP
    else:
        creator = max(0, amount - (plug.platform_fee or 0) * quantity)
    return SplitAmounts(amount, amount - creator, creator)


@dataclass(frozen=True, slots=True)
class SalePlan:
    """Where one sale's money goes: the creator's account and the application fee the platform keeps (a destination
    charge), or, with `account` None, several creators paid by separate transfers after one platform charge."""

    account: str | None
    currency: str
    total: int
    lines: tuple[tuple[Plug, SplitAmounts], ...]

    @property
    def creator_amount(self) -> int:
        return sum(split.creator_amount for _, split in self.lines)

    @property
    def application_fee(self) -> int:
        return self.total - self.creator_amount

    @property
    def title(self) -> str:
        return ", ".join(plug.name for plug, _ in self.lines)

    @property
    def accounts(self) -> list[str]:
        return sorted({plug.account_id for plug, _ in self.lines})

    def destination(self, sale: str | None = None) -> dict[str, Any]:
        """The destination-charge parameters (of a PaymentIntent, a session's payment_intent_data, a link); for
        several creators, the transfer group of `sale`'s separate transfers, or nothing when the sale's id is not
        known before Stripe creates it (a checkout session's, a link's: their transfers carry the group)."""
        if self.account is None:
            return {"transfer_group": sale_group(sale)} if sale else {}
        return {"transfer_data": {"destination": self.account}, "application_fee_amount": self.application_fee}


def sale_group(sale: str) -> str:
    """The transfer group of a sale paid by the platform and transferred to several creators."""
    return f"sale_{sale}"


def _status_of_v1(account: dict[str, Any]) -> tuple[AccountStatus, tuple[str, ...]]:
    """The status an `account.updated` event's account (v1 shape) says."""
    due = tuple(str(x) for x in ((account.get("requirements") or {}).get("currently_due") or []))
    if (account.get("capabilities") or {}).get("transfers") == "active":
        return AccountStatus.ACTIVE, due
    return (AccountStatus.RESTRICTED if account.get("details_submitted") else AccountStatus.ONBOARDING), due


def _capabilities(account: dict[str, Any]) -> dict[str, Any]:
    recipient = (account.get("configuration") or {}).get("recipient") or {}
    return dict((recipient.get("capabilities") or {}).get("stripe_balance") or {})


def _status_of_v2(account: dict[str, Any], current: AccountStatus | None) -> tuple[AccountStatus, tuple[str, ...]]:
    due = tuple(str(entry.get("description")) for entry in (account.get("requirements") or {}).get("entries") or [])
    if (_capabilities(account).get("stripe_transfers") or {}).get("status") == "active":
        return AccountStatus.ACTIVE, due
    return (AccountStatus.ONBOARDING if current in (None, AccountStatus.ONBOARDING) else AccountStatus.RESTRICTED), due


def _view(account: ConnectedAccount, payouts: str | None = None) -> ConnectedAccountView:
    return ConnectedAccountView(
        id=account.account_id, display_name=account.display_name, email=account.email, country=account.country,
        currency=account.currency, status=account.status, can_receive_transfers=account.status is AccountStatus.ACTIVE,
        requirements_due=list(account.requirements_due), payouts=payouts, updated_at=account.updated_at)


def plug_view(plug: Plug) -> PlugView:
    return PlugView(id=plug.plug_id, name=plug.name, product=plug.product_id, price=plug.price_id,
                    account=plug.account_id, currency=plug.currency, unit_amount=plug.unit_amount,
                    creator_share_bp=plug.share_bp, platform_fee=plug.platform_fee,
                    creator_amount_per_unit=split_for(plug, plug.unit_amount, plug.currency).creator_amount)


def split_view(split: Split) -> SplitView:
    return SplitView(path=split.path, sale=split.sale_ref, plug=split.plug_id, account=split.account_id,
                     currency=split.currency, gross=split.gross, platform_fee=split.platform_fee,
                     creator_amount=split.creator_amount, status=split.status, payment_intent=split.payment_intent,
                     transfer=split.transfer_id, transfer_group=split.transfer_group, refunded=split.refunded,
                     reversed=split.reversed, fee_refunded=split.fee_refunded)


class ConnectService:
    EVENT_TYPES = frozenset({"account.updated", "payment_intent.succeeded", "refund.created",
                             "checkout.session.completed"})
    """The webhook events `apply_event` applies; every other type leaves Connect's tables alone."""

    def __init__(self, store: Store, mutations: StripeMutations, *, gateway: StripeGateway,
                 idempotency: IdempotencyService) -> None:
        self._store = store
        self._mutations = mutations
        self._gateway = gateway
        self._idempotency = idempotency
        self.transfers = Background()  # separate transfers of sales a webhook saw paid (transfer_sale)
        self._pending: set[tuple[str, str]] = set()  # sales `paid` left pending, transferred after COMMIT

    # --- creators -------------------------------------------------------------------------------------------------

    async def create_connected_account(
        self, *, display_name: str, email: str | None, country: str, currency: str | None,
        idempotency_key: str | None, dry_run: bool,
    ) -> ConnectedAccountResult:
        params = compact({
            "display_name": display_name, "contact_email": email, "dashboard": "express",
            "identity": {"country": country.lower()},
            "configuration": {"recipient": {"capabilities": {"stripe_balance": {"stripe_transfers": {
                "requested": True}}}}},
            "defaults": {"currency": currency} if currency else None,
            "include": INCLUDE,
        })
        recorded: dict[str, ConnectedAccount] = {}

        async def record(data: dict[str, Any]) -> None:
            status, due = _status_of_v2(data, None)
            now = utc_now()
            row = ConnectedAccount(
                data["id"], data.get("contact_email"), data.get("display_name") or display_name,
                str((data.get("identity") or {}).get("country") or country).upper(),
                str((data.get("defaults") or {}).get("currency") or currency or ""), status, due, None, now, now)
            recorded["row"] = row
            await self._store.write(lambda tx: self._store.connect.add_account(tx, row))

        def project(data: dict[str, Any]) -> dict[str, Any]:
            row = recorded.get("row") or self._store.connect.account(data["id"])
            return {"account": _view(row).model_dump() if row is not None else None}

        return await self._mutations.run(
            "create_connected_account", "/v2/core/accounts", params, ConnectedAccountResult, project,
            idempotency_key=idempotency_key, dry_run=dry_run, after=record)

    def account(self, account_id: str) -> ConnectedAccount:
        found = self._store.connect.account(account_id)
        if found is None:
            raise NotFound(f"no connected account {account_id} here: create it with create_connected_account",
                           param="account")
        return found

    async def create_account_link(
        self, *, account: str, refresh_url: str, return_url: str, update: bool, idempotency_key: str | None,
        dry_run: bool,
    ) -> AccountLinkResult:
        self.account(account)
        kind = "account_update" if update else "account_onboarding"
        params = {"account": account, "use_case": {"type": kind, kind: {
            "configurations": ["recipient"], "refresh_url": refresh_url, "return_url": return_url}}}
        return await self._mutations.run(
            "create_account_link", "/v2/core/account_links", params, AccountLinkResult,
            lambda d: {"account": d["account"], "url": d["url"], "expires_at": d["expires_at"]},
            idempotency_key=idempotency_key, dry_run=dry_run)

    async def refresh(self, account_id: str) -> tuple[ConnectedAccount, str | None]:
        """Read the account from Stripe, record its status, and return it with its payouts status."""
        current = self.account(account_id)
        data = (await self._gateway.send(StripeRequest("get", f"/v2/core/accounts/{account_id}",
                                                       {"include": INCLUDE}))).data
        status, due = _status_of_v2(data, current.status)
        if (status, due) != (current.status, current.requirements_due):  # a refusal writes nothing
            await self._store.write(lambda tx: self._store.connect.set_status(tx, account_id, status, due, None))
        payouts = (_capabilities(data).get("payouts") or {}).get("status")
        return self.account(account_id), payouts

    async def get_connected_account(self, account: str) -> ConnectedAccountView:
        row, payouts = await self.refresh(account)
        balance = (await self._gateway.send(StripeRequest("get", "/v1/balance", stripe_account=account))).data
        settings = (await self._gateway.send(StripeRequest("get", "/v1/balance_settings",
                                                           stripe_account=account))).data.get("payments") or {}
        view = _view(row, payouts)
        schedule = ((settings.get("payouts") or {}).get("schedule")) or {}
        view.payout_schedule = PayoutSchedule(
            interval=schedule.get("interval"), weekly_payout_days=schedule.get("weekly_payout_days"),
            monthly_payout_days=schedule.get("monthly_payout_days"),
            delay_days=(settings.get("settlement_timing") or {}).get("delay_days"),
            status=(settings.get("payouts") or {}).get("status"))
        view.balance = {str(a["currency"]): int(a["amount"]) for a in balance.get("available") or []}
        return view

    def list_connected_accounts(self, status: str | None, limit: int) -> ConnectedAccountList:
        wanted = AccountStatus(status) if status else None
        return ConnectedAccountList(accounts=[_view(a) for a in self._store.connect.accounts(wanted, limit)])

    async def receivable(self, account_id: str, currency: str, param: str) -> ConnectedAccount:
        """The creator's account if it can receive `currency` now (asking Stripe when our record says it cannot,
        in case an event is still on its way); else Refused naming the account and what Stripe requires."""
        account = self.account(account_id)
        if account.status is not AccountStatus.ACTIVE:
            account, _ = await self.refresh(account_id)
        if account.status is not AccountStatus.ACTIVE:
            due = ", ".join(account.requirements_due) or "nothing listed yet"
            raise Refused(f"creator account {account_id} cannot receive transfers yet ({account.status}); Stripe "
                          f"still requires: {due}. Send the creator an onboarding link (create_account_link) and "
                          "sell once they finished", param=param, account=account_id,
                          requirements_due=list(account.requirements_due))
        if currency != account.currency:
            raise Refused(f"creator account {account_id} receives {account.currency}, not {currency}: sell this plug "
                          f"in {account.currency}", param=param, account=account_id)
        return account

    # --- plugs ----------------------------------------------------------------------------------------------------

    async def create_plug(
        self, *, plug_id: str, name: str | None, price: str, account: str, creator_share_bp: int | None,
        platform_fee: int | None, idempotency_key: str | None,
    ) -> PlugResult:
        if (creator_share_bp is None) == (platform_fee is None):
            raise InvalidInput("give exactly one of creator_share_bp (the creator's share, 0-10000 basis points) or "
                               "platform_fee (the platform's fixed fee per unit)", param="creator_share_bp")
        if creator_share_bp is not None and not 0 <= creator_share_bp <= MAX_BP:
            raise InvalidInput(f"creator_share_bp is {creator_share_bp}: a share is 0 to 10000 basis points "
                               "(10000 = 100%)", param="creator_share_bp")
        if platform_fee is not None and platform_fee < 0:
            raise InvalidInput("platform_fee must be 0 or more (minor units)", param="platform_fee")
        existing = self._store.connect.plug(plug_id)
        creator = self.account(account)
        data = (await self._gateway.send(StripeRequest("get", f"/v1/prices/{price}"))).data
        if data.get("type") != "one_time" or data.get("unit_amount") is None:
            raise InvalidInput(f"price {price} is not a one-time price with a unit amount: a plug is sold once per "
                               "unit; create a one-time price with create_price", param="price")
        unit_amount, currency = int(data["unit_amount"]), str(data["currency"])
        if platform_fee is not None and platform_fee > unit_amount:
            raise InvalidInput(f"platform_fee {format_amount(platform_fee, currency)} is larger than the price "
                               f"{format_amount(unit_amount, currency)}", param="platform_fee")
        if currency != creator.currency:
            raise InvalidInput(f"price {price} is in {currency} but creator account {account} receives "
                               f"{creator.currency}: use a {creator.currency} price", param="price")
        plug = Plug(plug_id, name or plug_id, str(data["product"]), price, account, currency, unit_amount,
                    creator_share_bp, platform_fee, utc_now())
        if existing is not None:
            same = (existing.price_id, existing.account_id, existing.share_bp, existing.platform_fee) == (
                plug.price_id, plug.account_id, plug.share_bp, plug.platform_fee)
            if not same:
                raise Refused(f"plug {plug_id} is already declared with other terms: choose another id", param="plug")
            return PlugResult(plug=plug_view(existing), replayed=True)
        try:
            await self._store.write(lambda tx: self._store.connect.add_plug(tx, plug))
        except DuplicatePlug:
            raise Refused(f"price {price} already sells another plug: one price sells one plug",
                          param="price") from None
        await self._gateway.send(StripeRequest("post", f"/v1/products/{plug.product_id}", {"metadata": {
            "aims_plug": plug_id, "aims_creator_account": account}}, f"aims-plug-{plug_id}"))
        return PlugResult(plug=plug_view(plug))

    def plugs(self) -> list[PlugView]:
        return [plug_view(plug) for plug in self._store.connect.plugs()]

    # --- sales ----------------------------------------------------------------------------------------------------

    async def plan_sale(self, items: list[tuple[str, int]], total: int | None, currency: str | None, *,
                        param: str = "line_items") -> SalePlan | None:
        """The destination of a sale of `items` ((price, quantity) pairs, `total` in `currency`), or None when no
        item is a plug: one creator's plugs a destination charge, several creators' separate transfers. Refused
        (before any charge) when a creator cannot receive money."""
        plugs = self._store.connect.plugs_for_prices([price for price, _ in items])
        if not plugs:
            return None
        if total is None or currency is None:
            raise InvalidInput("a cart with a plug must be in one currency", param=param)
        lines = [(plugs[price], quantity) for price, quantity in items if price in plugs]
        return await self._plan(lines, total, currency, [param] * len(lines))

    async def _plan(self, lines: list[tuple[Plug, int]], total: int, currency: str, params: list[str]) -> SalePlan:
        """Every creator of `lines` checked once (refused before any charge when one cannot be paid)."""
        checked: set[str] = set()
        for (plug, _), param in zip(lines, params, strict=True):
            if plug.account_id not in checked:
                await self.receivable(plug.account_id, currency, param)
                checked.add(plug.account_id)
        planned = tuple((plug, split_for(plug, plug.unit_amount * quantity, currency, quantity))
                        for plug, quantity in lines)
        return SalePlan(checked.pop() if len(checked) == 1 else None, currency, total, planned)

    def plug(self, plug_id: str) -> Plug | None:
        return self._store.connect.plug(plug_id)

    async def plan_lines(self, lines: list[tuple[str, int]], total: int, currency: str) -> SalePlan | None:
        """The split of an ACP cart (("plug:<id>" or another item, quantity) lines, `total` in `currency`), or None
        when it holds no plug: a destination charge for one creator, separate transfers for several. Refused
        (InvalidInput, Refused; param `$.line_items[i]`) before any charge when a creator cannot be paid."""
        found: list[tuple[Plug, int]] = []
        params: list[str] = []
        for i, (item, quantity) in enumerate(lines):
            if not item.startswith("plug:"):
                continue
            plug = self._store.connect.plug(item.removeprefix("plug:"))
            if plug is None:
                raise NotFound(f"no plug {item.removeprefix('plug:')!r}: declare it with create_plug",
                               param=f"$.line_items[{i}]")
            found.append((plug, quantity))
            params.append(f"$.line_items[{i}]")
        return await self._plan(found, total, currency, params) if found else None

    async def plan_plug(self, item: str) -> SalePlan:
        """One unit of the plug `item` names ("plug:<id>"), sold alone (a payment session's PaymentIntent)."""
        plug = self._store.connect.plug(item.removeprefix("plug:"))
        if plug is None:
            raise NotFound(f"no plug {item.removeprefix('plug:')!r}: declare it with create_plug", param="item")
        await self.receivable(plug.account_id, plug.currency, "item")
        split = split_for(plug, plug.unit_amount, plug.currency)
        return SalePlan(plug.account_id, plug.currency, plug.unit_amount, ((plug, split),))

    async def declare(self, path: str, sale_ref: str, plan: SalePlan, *, payment_intent: str | None = None,
                      note: str | None = None) -> None:
        """Record an offered sale's splits (after Stripe accepted it): one row per plug line, `declared` (with the
        sale's transfer group when several creators are paid by separate transfers)."""
        now = utc_now()
        group = sale_group(sale_ref) if plan.account is None else None
        rows = [Split(new_id("spl"), path, sale_ref, plug.plug_id, plug.account_id, plan.currency, split.gross,
                      split.platform_fee, split.creator_amount, SplitStatus.DECLARED, payment_intent, None, group, 0,
                      0, 0, note, now, now) for plug, split in plan.lines]

        def job(tx: Tx) -> None:
            for row in rows:
                self._store.connect.add_split(tx, row)

        await self._store.write(job)

    # --- x402: the money lands in the platform's hands, a separate transfer pays the creator ----------------------

    def _resource_plug(self, resource: str) -> Plug:
        plug = self._store.connect.plug(resource.removeprefix("plug:"))
        if plug is None:
            raise NotFound(f"no plug {resource.removeprefix('plug:')!r} (resource {resource}): declare it with "
                           "create_plug", param="resource")
        return plug

    async def check_x402_plug(self, resource: str, atomic: int) -> None:
        """An x402 quote for a plug's resource ("plug:<id>") asks exactly its price, and its creator can be paid."""
        plug = self._resource_plug(resource)
        if plug.currency != "usd" or atomic != plug.unit_amount * USDC_PER_CENT:
            raise InvalidInput(f"plug {plug.plug_id} costs {format_amount(plug.unit_amount, plug.currency)}: quote "
                               "exactly that in USDC (amount_usd)", param="amount_usd")
        await self.receivable(plug.account_id, plug.currency, "resource")

    async def settle_x402(self, receipt_id: str, resource: str, atomic: int) -> None:
        """After an x402 payment for a plug was recorded (once: the receipt's UNIQUE keys): its split, then the
        transfer of the creator's share. The transfer's idempotency key and group derive from the receipt, so a retry
        (a lost answer, another process) never transfers twice; one that fails leaves the split `pending`."""
        plug = self._resource_plug(resource)
        split = split_for(plug, atomic // USDC_PER_CENT, plug.currency)
        now = utc_now()
        row = Split(new_id("spl"), "x402", receipt_id, plug.plug_id, plug.account_id, plug.currency, split.gross,
                    split.platform_fee, split.creator_amount, SplitStatus.PENDING, None, None, f"x402_{receipt_id}",
                    0, 0, 0, None, now, now)
        await self._store.write(lambda tx: self._store.connect.add_split(tx, row))
        await self.transfer_pending(receipt_id)

    async def transfer_pending(self, receipt_id: str) -> None:
        for split in self._store.connect.splits_of_sale("x402", receipt_id):
            if split.status is not SplitStatus.PENDING:
                continue
            transfer_id = None
            if split.creator_amount > 0:
                try:
                    transfer_id = (await self._gateway.send(StripeRequest(
                        "post", "/v1/transfers", {
                            "amount": split.creator_amount, "currency": split.currency,
                            "destination": split.account_id, "transfer_group": split.transfer_group,
                            "metadata": {"aims_receipt": receipt_id, "aims_plug": split.plug_id}},
                        stripe_idempotency_key("x402_split", f"{receipt_id}:{split.plug_id}")))).data["id"]
                except BillingError as exc:  # the buyer paid: the creator's transfer waits, visible as pending
                    log.warning("x402 split %s: the transfer to %s waits: %s", split.id, split.account_id, exc.message)
                    continue
            await self._store.write(functools.partial(self._transferred, split.id, transfer_id))

    def seller(self) -> Seller:
        """Registered in the fulfilment registry: after a COMMIT that left separate transfers pending, make them."""
        return Seller(after_commit=self.committed)

    def resume_transfers(self) -> None:
        """At start-up, on the server's loop: the separate transfers a previous run left pending."""
        self.transfers.bind()
        self._pending |= {(split.path, split.sale_ref) for split in self._store.connect.splits(None, None, 100_000)
                          if split.status is SplitStatus.PENDING and split.payment_intent is not None}
        self.committed()

    def committed(self) -> None:
        due, self._pending = self._pending, set()
        if not due:  # asked after every webhook: nothing queued, nothing to hand over
            return
        self.transfers.spawn((f"transfer:{path}:{sale}", functools.partial(self._transfer_later, path, sale))
                             for path, sale in sorted(due))

    async def _transfer_later(self, path: str, sale_ref: str) -> None:
        await self.transfer_sale(path, sale_ref)

    async def transfer_sale(self, path: str, sale_ref: str) -> list[str]:
        """Pay each creator of a sale paid to the platform (several creators' cart) their share: one transfer per
        creator in the sale's transfer group, from the sale's charge (`source_transaction`), its idempotency key
        derived from the sale and the creator, so a retry after a lost answer, a webhook and the buyer's own answer
        racing, or another process all get the same transfer. One that fails leaves its splits pending (retried by
        the next look). The transfers made."""
        pending = [s for s in self._store.connect.splits_of_sale(path, sale_ref) if s.status is SplitStatus.PENDING]
        if not pending or pending[0].payment_intent is None:
            return []
        pi = (await self._gateway.send(StripeRequest("get", f"/v1/payment_intents/{pending[0].payment_intent}"))).data
        by_account: dict[str, list[Split]] = {}
        for split in pending:
            by_account.setdefault(split.account_id, []).append(split)
        made = []
        for account, splits in by_account.items():
            amount = sum(split.creator_amount for split in splits)
            transfer_id = None
            if amount > 0:
                try:
                    transfer_id = str((await self._gateway.send(StripeRequest("post", "/v1/transfers", {
                        "amount": amount, "currency": splits[0].currency, "destination": account,
                        "transfer_group": splits[0].transfer_group, "source_transaction": pi["latest_charge"],
                        "metadata": {"aims_sale": sale_ref}},
                        stripe_idempotency_key(f"{path}_split", f"{sale_ref}:{account}")))).data["id"])
                except BillingError as exc:  # the buyer paid: the creator's transfer waits, visible as pending
                    log.warning("sale %s: the transfer to %s waits: %s", sale_ref, account, exc.message)
                    continue
                made.append(transfer_id)
            ids = [split.id for split in splits]
            await self._store.write(lambda tx, ids=ids, transfer_id=transfer_id: [  # type: ignore[misc]
                self._transferred(split_id, transfer_id, tx) for split_id in ids])
        return made

    def _transferred(self, split_id: str, transfer_id: str | None, tx: Tx) -> bool:
        return self._store.connect.mark_paid(tx, split_id, SplitStatus.TRANSFERRED, payment_intent=None,
                                             transfer_group=None, transfer_id=transfer_id)

    # --- Stripe's events (in the webhook's transaction) -----------------------------------------------------------

    def apply_event(self, tx: Tx, event: dict[str, Any]) -> str | None:
        """Apply `account.updated` (a creator's status) and `checkout.session.completed` (a split sale paid); a
        note for the event's record, or None when the event is not about Connect."""
        kind = event.get("type")
        if kind not in self.EVENT_TYPES:
            return None
        obj = (event.get("data") or {}).get("object") or {}
        if kind == "account.updated" and isinstance(obj.get("id"), str):
            status, due = _status_of_v1(obj)
            applied = self._store.connect.set_status(tx, obj["id"], status, due, int(event["created"]))
            return f"connected account {obj['id']}: {status}" if applied else None
        if kind == "payment_intent.succeeded" and isinstance(obj.get("id"), str):  # a payment session's
            moved = self.paid(tx, obj["id"])
            return f"{moved} split(s) paid with {obj['id']}" if moved else None
        if kind == "refund.created" and isinstance(obj.get("id"), str) and isinstance(obj.get("payment_intent"), str) \
                and obj.get("status") == "succeeded":
            return self._refunded_elsewhere(tx, obj)
        if kind == "checkout.session.completed" and isinstance(obj.get("id"), str) \
                and isinstance(obj.get("payment_intent"), str) and obj.get("payment_status") == "paid":
            return self._paid_session(tx, obj["id"], obj["payment_intent"], obj.get("payment_link"))
        return None

    def paid(self, tx: Tx, payment_intent: str) -> int:
        """A PaymentIntent carrying declared splits succeeded (in the transaction recording it): a destination
        charge's splits are transferred (with the charge), separate transfers' splits pending until
        `transfer_sale` makes them. How many splits moved (0 for a duplicate or late event)."""
        moved = 0
        for split in self._store.connect.splits_of_payment(payment_intent):
            if split.status is not SplitStatus.DECLARED:
                continue
            separate = split.transfer_group is not None
            moved += self._store.connect.mark_paid(
                tx, split.id, SplitStatus.PENDING if separate else SplitStatus.TRANSFERRED,
                payment_intent=payment_intent, transfer_group=None if separate else f"group_{payment_intent}",
                transfer_id=None)
            if separate:
                self._pending.add((split.path, split.sale_ref))
        return moved

    def _paid_session(self, tx: Tx, session: str, payment_intent: str, link: Any) -> str | None:
        """A checkout session paid: a destination charge's splits transferred (with the charge); several creators'
        pending, their transfers made after the COMMIT (`transfer_sale`). A link's session gets the link's splits."""
        group = f"group_{payment_intent}"  # Stripe's transfer group of a destination charge
        moved = 0
        for split in self._store.connect.splits_of_sale("checkout", session):
            separate = split.transfer_group is not None
            if self._store.connect.mark_paid(tx, split.id, SplitStatus.PENDING if separate else SplitStatus.TRANSFERRED,
                                             payment_intent=payment_intent, transfer_group=None if separate else group,
                                             transfer_id=None):
                moved += 1
                if separate:
                    self._pending.add(("checkout", session))
        if isinstance(link, str):
            now = utc_now()
            for template in self._store.connect.splits_of_sale("payment_link", link):
                separate = template.transfer_group is not None
                if self._store.connect.add_split(tx, Split(
                        new_id("spl"), "payment_link", session, template.plug_id, template.account_id,
                        template.currency, template.gross, template.platform_fee, template.creator_amount,
                        SplitStatus.PENDING if separate else SplitStatus.TRANSFERRED, payment_intent, None,
                        sale_group(session) if separate else group, 0, 0, 0, f"paid through {link}", now, now)):
                    moved += 1
                    if separate:
                        self._pending.add(("payment_link", session))
        return f"{moved} split(s) transferred with {payment_intent}" if moved else None

    # --- refunds --------------------------------------------------------------------------------------------------

    async def refund_sale(self, *, sale: str, amount: int, reason: str | None,
                          idempotency_key: str) -> RefundSplitResult:
        """Refund (part of) a split sale: the buyer's money back, the creator's transfer reversed and the platform's
        fee refunded in proportion (Stripe's `reverse_transfer` and `refund_application_fee`), at most what is left."""
        splits = [s for s in self._sale_splits(sale) if s.status is SplitStatus.TRANSFERRED]
        if not splits:
            raise NotFound(f"no paid split sale {sale}: give the checkout session (cs_...) or payment session (ps_...) "
                           "of a sale of a plug (get_creator_earnings lists them)", param="sale")
        separate = _separate(splits[0])
        key = f"{sale}:{idempotency_key}"
        # A destination charge whose cart held other items too: Stripe's reverse_transfer would take back the
        # creator's share of the whole charge, not of the plug lines refunded; so the transfer is reversed by
        # exactly the creator's part instead (and the platform keeps the rest of the fee it is owed).
        mixed = not separate and int((await self._gateway.send(StripeRequest(
            "get", f"/v1/payment_intents/{splits[0].payment_intent}"))).data["amount"]) != sum(s.gross for s in splits)
        explicit = separate or mixed
        params = compact({"payment_intent": splits[0].payment_intent, "amount": amount,
                          "reverse_transfer": None if explicit else True,
                          "refund_application_fee": None if explicit else True, "reason": reason,
                          "metadata": {"aims_sale": sale, "aims_refund_key": key}})
        call = self._idempotency.key_for("refund_split_sale", {"path": "/v1/refunds", "method": "post",
                                                                         **params}, key, sale)
        if (stored := self._idempotency.find(call)) is not None:  # a retry: its first answer, not a check
            return RefundSplitResult.model_validate({**stored, "replayed": True})
        prior = self._store.connect.refund_of_request(key)  # made, its answer lost, recorded from its webhook
        gross = sum(s.gross for s in splits)
        left = gross - sum(s.refunded for s in splits)
        if prior is None and (amount <= 0 or amount > left):
            raise InvalidInput(f"refund amount {amount} is more than what is left of sale {sale} ({left} of {gross} "
                               f"{splits[0].currency})" if amount > 0 else "amount must be positive (minor units)",
                               param="amount")
        shares = [] if prior is not None else self._spread(splits, amount) if separate \
            else self._allocate(splits, amount)
        reversed_total, fee_total = (prior[2], prior[3]) if prior is not None else (
            sum(r for _, (_, r, _) in shares), sum(f for _, (_, _, f) in shares))

        async def record(refund: dict[str, Any]) -> None:
            if separate and shares:  # no destination charge: each creator's transfer reversed by its part, once
                await self._reverse_transfers(shares, refund["id"], f"{call.scoped}")
            elif mixed and reversed_total:  # the destination charge's transfer, by the creator's part exactly
                await self._reverse_destination(str(splits[0].payment_intent), reversed_total, refund["id"],
                                                call.scoped)

            def job(tx: Tx) -> None:
                if not shares or not self._claim(tx, refund["id"], str(splits[0].payment_intent), shares, key):
                    return  # its refund.created webhook (another process) recorded it first: once
                for split, (refunded, reversed_, fee) in shares:
                    if not self._store.connect.add_refund(tx, split.id, refunded, reversed_, fee):
                        raise InvalidInput(f"sale {sale} was refunded meanwhile: nothing more is left to refund",
                                           param="amount")

            await self._store.write(job)

        return await self._mutations.run(
            "refund_split_sale", "/v1/refunds", params, RefundSplitResult,
            lambda d: {"refund": d["id"], "amount": amount, "reversed": reversed_total, "fee_refunded": fee_total},
            idempotency_key=key, dry_run=False, after=record, owner=sale)

    def full_refund_params(self, path: str, sale_ref: str) -> dict[str, Any]:
        """What a refund of a whole sale made elsewhere (an ACP payment its checkout could not take) adds so a
        destination charge's creator gives their part back with it: the transfer reversed, the fee refunded."""
        if any(split.payment_intent and not _separate(split) and split.status is SplitStatus.TRANSFERRED
               for split in self._store.connect.splits_of_sale(path, sale_ref)):
            return {"reverse_transfer": True, "refund_application_fee": True}
        return {}

    async def refunded_in_full(self, path: str, sale_ref: str, refund: str) -> None:
        """A sale refunded in full elsewhere: separate transfers made (if still pending) and reversed in full (one
        reversal per transfer, keyed), and every split recorded refunded."""
        await self.transfer_sale(path, sale_ref)
        shares = [(split, (split.gross - split.refunded, split.creator_amount - split.reversed,
                           split.platform_fee - split.fee_refunded))
                  for split in self._store.connect.splits_of_sale(path, sale_ref)
                  if split.status is SplitStatus.TRANSFERRED and split.gross > split.refunded]
        if not shares:
            return
        if _separate(shares[0][0]):
            await self._reverse_transfers(shares, refund, f"full:{path}:{sale_ref}")

        def job(tx: Tx) -> None:
            if self._claim(tx, refund, str(shares[0][0].payment_intent), shares, None):
                for split, (refunded, reversed_, fee) in shares:
                    self._store.connect.add_refund(tx, split.id, refunded, reversed_, fee)

        await self._store.write(job)

    def _claim(self, tx: Tx, refund: str, payment_intent: str, shares: list[tuple[Split, tuple[int, int, int]]],
               request_key: str | None) -> bool:
        """Record the Stripe refund `refund` once (whoever is first: our answer, its webhook, another process)."""
        return self._store.connect.claim_refund(tx, refund, payment_intent, sum(r for _, (r, _, _) in shares),
                                                sum(v for _, (_, v, _) in shares), sum(f for _, (_, _, f) in shares),
                                                request_key)

    def _refunded_elsewhere(self, tx: Tx, refund: dict[str, Any]) -> str | None:
        """`refund.created` for a destination-charge sale of plugs: recorded on its splits unless it is already
        (made by refund_split_sale, or seen before); the creator's part counted as taken back when the refund
        reversed the transfer (`transfer_reversal`), and the fee with it. Separate transfers are reversed only by
        refund_split_sale, which records its refunds itself."""
        found = [self._store.connect.load_split(tx, split.id)
                 for split in self._store.connect.splits_of_payment(str(refund["payment_intent"]))]
        splits = [split for split in found if split is not None and split.status is SplitStatus.TRANSFERRED]
        if not splits or _separate(splits[0]):
            return None
        shares = self._allocate(splits, int(refund.get("amount") or 0))
        request_key = (refund.get("metadata") or {}).get("aims_refund_key")
        if not refund.get("transfer_reversal") and not request_key:
            # refunded elsewhere without reverse_transfer: the creator keeps their share (refund_split_sale's own
            # refunds always take it back, with the refund or by reversing the transfer right after)
            shares = [(split, (taken, 0, 0)) for split, (taken, _, _) in shares]
        if not shares or not self._claim(tx, str(refund["id"]), str(refund["payment_intent"]), shares,
                                         str(request_key) if request_key else None):
            return None
        for split, (refunded, reversed_, fee) in shares:
            self._store.connect.add_refund(tx, split.id, refunded, reversed_, fee)
        return f"refund {refund['id']} recorded on {len(shares)} split(s)"

    async def _reverse_destination(self, payment_intent: str, amount: int, refund: str, key: str) -> None:
        found = (await self._gateway.send(StripeRequest("get", "/v1/transfers", {
            "transfer_group": f"group_{payment_intent}", "limit": 1}))).data.get("data") or []
        if not found:
            raise InvalidState(f"PaymentIntent {payment_intent} has no transfer to reverse", param="sale")
        await self._gateway.send(StripeRequest(
            "post", f"/v1/transfers/{found[0]['id']}/reversals", {"amount": amount,
                                                                  "metadata": {"aims_refund": refund}},
            stripe_idempotency_key("split_reversal", f"{key}:{found[0]['id']}")))

    async def _reverse_transfers(self, shares: list[tuple[Split, tuple[int, int, int]]], refund: str,
                                 key: str) -> None:
        by_transfer: dict[str, int] = {}
        for split, (_, reversed_, _) in shares:
            if split.transfer_id and reversed_:
                by_transfer[split.transfer_id] = by_transfer.get(split.transfer_id, 0) + reversed_
        for transfer, amount in by_transfer.items():
            await self._gateway.send(StripeRequest(
                "post", f"/v1/transfers/{transfer}/reversals", {"amount": amount, "metadata": {"aims_refund": refund}},
                stripe_idempotency_key("split_reversal", f"{key}:{transfer}")))

    @staticmethod
    def _spread(splits: list[Split], amount: int) -> list[tuple[Split, tuple[int, int, int]]]:
        """Spread a refund over several creators' splits in proportion to their gross (cumulatively: refunds adding
        up to the whole sale give back exactly each split); per split what the buyer gets back, what the creator
        gives back (their share of it) and what the platform gives back."""
        gross = sum(split.gross for split in splits)
        after = sum(split.refunded for split in splits) + amount
        takes = [max(0, min(split.gross - split.refunded,
                            (split.gross if after == gross else split.gross * after // gross) - split.refunded))
                 for split in splits]
        rest = amount - sum(takes)
        for i, split in enumerate(splits):  # the cents rounding left over, to the splits with room, in order
            extra = min(rest, split.gross - split.refunded - takes[i])
            takes[i] += extra
            rest -= extra
        out = []
        for split, take in zip(splits, takes, strict=True):
            if take > 0:
                reversed_ = _fee_share(split.creator_amount, split.gross, split.refunded, take)
                out.append((split, (take, reversed_, take - reversed_)))
        return out

    def _sale_splits(self, sale: str) -> list[Split]:
        for path in ("checkout", "payment_link", "payment_session", "acp", "x402"):
            found = self._store.connect.splits_of_sale(path, sale)
            if found:
                return found
        checkout = self._store.acp.session(sale) if sale.startswith("cs_") else None  # an ACP checkout: its payment
        if checkout is not None and checkout.payment_session_id:
            return self._store.connect.splits_of_sale("acp", checkout.payment_session_id)
        return []

    @staticmethod
    def _allocate(splits: list[Split], amount: int) -> list[tuple[Split, tuple[int, int, int]]]:
        """Spread a refund over a sale's splits (each up to what is left of it): per split, what the buyer gets back,
        what the creator gives back and what fee the platform gives back."""
        out = []
        for split in splits:
            take = min(amount, split.gross - split.refunded)
            if take <= 0:
                continue
            fee = _fee_share(split.platform_fee, split.gross, split.refunded, take)
            out.append((split, (take, take - fee, fee)))
            amount -= take
        return out

    # --- reconciliation -------------------------------------------------------------------------------------------

    async def check_splits(self) -> tuple[int, list[str]]:
        """Every paid split sale against Stripe: one transfer to the creator's account in the sale's transfer group,
        an application fee of the sale less the creators' shares, and what refunds took back on both sides equal to
        what we recorded. Returns (sales checked, one line per mismatch)."""
        sales: dict[str, list[Split]] = {}
        separate: list[Split] = []
        for split in self._store.connect.splits(None, None, 1_000_000):
            if split.status is SplitStatus.TRANSFERRED and split.payment_intent:
                sales.setdefault(split.payment_intent, []).append(split)
            elif split.status is SplitStatus.TRANSFERRED and split.path == "x402":
                separate.append(split)
        problems: list[str] = []
        for pi_id, splits in sales.items():
            check = self._check_separate if _separate(splits[0]) else self._check_sale
            problems += [f"{pi_id:32} {p}" for p in await check(pi_id, splits)]
        for split in separate:  # an x402 sale: one transfer of the creator's share in the receipt's group
            found = (await self._gateway.send(StripeRequest("get", "/v1/transfers", {
                "transfer_group": split.transfer_group, "limit": 100}))).data.get("data") or []
            want = [(split.transfer_id, split.account_id, split.creator_amount, split.reversed)]
            got = [(t.get("id"), t.get("destination"), t.get("amount"), t.get("amount_reversed")) for t in found]
            if got != want and not (split.creator_amount == 0 and not got):
                problems.append(f"{split.sale_ref:32} expected transfer {want}, Stripe has {got}")
        return len(sales) + len(separate), problems

    async def _check_separate(self, pi_id: str, splits: list[Split]) -> list[str]:
        """A sale paid to the platform: one transfer per creator in its group, of their shares, reversed as recorded
        (and no application fee)."""
        found = (await self._gateway.send(StripeRequest("get", "/v1/transfers", {
            "transfer_group": splits[0].transfer_group, "limit": 100}))).data.get("data") or []
        want: dict[str, tuple[int, int]] = {}
        for split in splits:
            amount, reversed_ = want.get(split.account_id, (0, 0))
            want[split.account_id] = (amount + split.creator_amount, reversed_ + split.reversed)
        expected = sorted((account, a, r) for account, (a, r) in want.items() if a > 0)
        got = sorted((str(t.get("destination")), int(t.get("amount") or 0), int(t.get("amount_reversed") or 0))
                     for t in found)
        return [] if got == expected else [f"expected transfers {expected}, Stripe has {got}"]

    async def _check_sale(self, pi_id: str, splits: list[Split]) -> list[str]:
        get = self._gateway.send
        pi = (await get(StripeRequest("get", f"/v1/payment_intents/{pi_id}"))).data
        account = splits[0].account_id
        transfers = (await get(StripeRequest("get", "/v1/transfers", {"transfer_group": f"group_{pi_id}",
                                                                       "limit": 100}))).data.get("data") or []
        fees = (await get(StripeRequest("get", "/v1/application_fees", {"charge": pi.get("latest_charge"),
                                                                         "limit": 100}))).data.get("data") or []
        if len(transfers) != 1 or transfers[0].get("destination") != account:
            return [f"expected one transfer to {account}, Stripe has "
                    f"{[(t.get('id'), t.get('destination')) for t in transfers]}"]
        transfer, fee = transfers[0], (fees[0] if fees else {"amount": 0, "amount_refunded": 0})
        creators = sum(s.creator_amount for s in splits)
        out = []
        if int(fee["amount"]) != int(pi["amount"]) - creators:
            out.append(f"application fee {fee['amount']} != sale {pi['amount']} - creators' shares {creators}")
        stripe_net = (int(transfer["amount"]) - int(transfer["amount_reversed"]) - int(fee["amount"])
                      + int(fee["amount_refunded"]))
        ours = creators - sum(s.reversed for s in splits)
        if stripe_net != ours:
            out.append(f"creator {account} holds {stripe_net} from this sale at Stripe, we recorded {ours}")
        only_plugs = sum(s.gross for s in splits) == int(pi["amount"])  # else the fee covers other lines too
        if only_plugs and int(fee["amount_refunded"]) != sum(s.fee_refunded for s in splits):
            out.append(f"fee refunded {fee['amount_refunded']} at Stripe, we recorded "
                       f"{sum(s.fee_refunded for s in splits)}")
        return out

    # --- reporting ------------------------------------------------------------------------------------------------

    def earnings(self, account: str | None, since: str | None, limit: int = 50) -> EarningsReport:
        if account is not None:
            self.account(account)
        rows = self._store.connect.earnings(account, since)
        return EarningsReport(
            earnings=[CreatorEarnings(account=e.account_id, currency=e.currency, sales=e.sales, gross=e.gross,
                                      platform_fees=e.platform_fees, transferred=e.transferred, reversed=e.reversed,
                                      fee_refunded=e.fee_refunded, pending=e.pending,
                                      net_to_creator=e.transferred - e.reversed) for e in rows],
            splits=[split_view(s) for s in self._store.connect.splits(account, since, limit)
                    if s.status is not SplitStatus.DECLARED])



def _separate(split: Split) -> bool:
    """A sale paid to the platform and transferred to its creators separately (not a destination charge)."""
    return split.payment_intent is not None and (split.transfer_group or "").startswith("sale_")


def _fee_share(fee: int, gross: int, refunded_before: int, refunded_now: int) -> int:
    """The part of an application fee a refund gives back, as Stripe computes it: in proportion, cumulatively (so
    refunds adding up to the whole sale give back exactly the whole fee)."""
    return fee * (refunded_before + refunded_now) // gross - fee * refunded_before // gross
