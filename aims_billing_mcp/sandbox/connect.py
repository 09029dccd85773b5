"""Stripe Connect: v2 accounts (``/v2/core/accounts``) and account links, transfers and their reversals,
application fees and their refunds, destination charges, and a balance per connected account.

Accounts are Accounts v2 (``v2.core.account``): a connected account receives money through its ``recipient``
configuration's ``stripe_balance.stripe_transfers`` capability. A new account's capability is ``restricted`` with
requirements ``currently_due`` until onboarding is completed, which the sandbox does on request
(``POST /_sandbox/accounts/{id}/complete_onboarding``, like completing a checkout) and announces with an
``account.updated`` Event carrying the account as v1 renders it (``capabilities.transfers``,
``requirements.currently_due``). ``.../restrict`` makes it restricted again (Stripe asking for more information).

Money moves as Stripe moves it, on running balances (the platform's and one per account, ``Stripe-Account``
reads the latter from ``/v1/balance``):
- a transfer takes from the platform's available balance (or from the charge named by ``source_transaction``)
  and adds to the destination's; its reversal moves money back;
- a destination charge (``transfer_data[destination]`` on a PaymentIntent, a Checkout Session's
  ``payment_intent_data`` or a Payment Link) transfers the charge (or ``transfer_data[amount]``) to the destination
  with ``transfer_group=group_<pi>`` when it succeeds, and the ``application_fee_amount`` comes back to the
  platform as an application fee;
- a refund with ``reverse_transfer`` / ``refund_application_fee`` reverses the transfer and refunds the fee in
  proportion to what was refunded (cumulatively, so partial refunds adding up to the whole return exactly all).

An account can receive transfers in its default currency only (``defaults.currency``, else its country's).

Balance settings (``/v1/balance_settings`` with ``Stripe-Account``, as Stripe's ``balance_settings`` object): a
connected account's payout schedule (``payments.payouts.schedule``: ``interval`` daily, weekly with
``weekly_payout_days``, monthly with ``monthly_payout_days``, or manual; daily by default), its payouts ``status``
(enabled once its payouts capability is active) and ``settlement_timing.delay_days`` (2).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from .core import LIST_PARAMS, Ctx, Obj, Route, embedded_list, list_page, public
from .errors import StripeError, invalid, missing, no_such
from .ids import new_id, random_base62
from .params import Params

COUNTRY_CURRENCY = {
    "us": "usd", "gb": "gbp", "ca": "cad", "au": "aud", "jp": "jpy", "nz": "nzd", "sg": "sgd", "ch": "chf",
    "fr": "eur", "de": "eur", "ie": "eur", "es": "eur", "it": "eur", "nl": "eur", "be": "eur", "at": "eur",
    "pt": "eur", "fi": "eur",
}
ONBOARDING_DUE = ("identity.individual.first_name", "identity.individual.last_name",
                  "identity.individual.dob", "configuration.recipient.default_outbound_destination",
                  "identity.attestations.terms_of_service.account")
INCLUDABLE = ("configuration.customer", "configuration.merchant", "configuration.recipient", "defaults",
              "future_requirements", "identity", "requirements")
LINK_TTL = 300
APPLICATION = "ca_sandboxplatform"


def _rfc3339(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# -- accounts (v2) ------------------------------------------------------------------------------------------------

def _requirements(due: bool) -> Obj:
    entries = [{
        "awaiting_action_from": "user",
        "description": field,
        "errors": [],
        "impact": {"restricts_capabilities": [{"capability": "stripe_balance.stripe_transfers",
                                               "configuration": "recipient",
                                               "deadline": {"status": "currently_due"}}]},
        "minimum_deadline": {"status": "currently_due"},
        "reference": None,
        "requested_reasons": [{"code": "routine_onboarding"}],
    } for field in (ONBOARDING_DUE if due else ())]
    return {"entries": entries,
            "summary": {"minimum_deadline": {"status": "currently_due", "time": None} if due else None}}


def _capability(active: bool) -> Obj:
    if active:
        return {"status": "active", "status_details": []}
    return {"status": "restricted", "status_details": [{"code": "requirements_past_due", "resolution": "provide_info"}]}


def create_account(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("contact_email", "contact_phone", "display_name", "dashboard", "identity", "configuration",
             "defaults", "metadata", "include"))
    identity = p.sub("identity")
    country = None
    entity_type = None
    if identity is not None:
        identity.allow(("country", "entity_type", "business_details", "individual"))
        country = identity.string("country")
        entity_type = identity.string("entity_type", choices=("company", "government_entity", "individual",
                                                               "non_profit"))
    if country is not None and country.lower() not in COUNTRY_CURRENCY:
        raise invalid("identity.country", f"Country {country!r} is not supported for connected accounts.")
    defaults = p.sub("defaults")
    currency = None
    if defaults is not None:
        defaults.allow(("currency", "locales", "profile", "responsibilities"))
        currency = defaults.currency()
    currency = currency or (COUNTRY_CURRENCY[country.lower()] if country else None)
    recipient_requested = False
    configuration = p.sub("configuration")
    if configuration is not None:
        configuration.allow(("recipient", "customer", "merchant"))
        recipient = configuration.sub("recipient")
        if recipient is not None:
            balance = ((recipient.sub("capabilities") or Params({})).sub("stripe_balance") or Params({}))
            transfers = balance.sub("stripe_transfers")
            recipient_requested = bool(transfers and transfers.boolean("requested"))
    account: Obj = {
        "id": new_id("acct_", 16),
        "object": "v2.core.account",
        "applied_configurations": ["recipient"] if recipient_requested else [],
        "closed": False,
        "configuration": {
            "customer": None, "merchant": None,
            "recipient": {"applied": True, "capabilities": {"stripe_balance": {
                "payouts": _capability(False), "stripe_transfers": _capability(False)}}}
            if recipient_requested else None,
        },
        "contact_email": p.string("contact_email"),
        "contact_phone": p.string("contact_phone"),
        "created": _rfc3339(ctx.now),
        "dashboard": p.string("dashboard", choices=("express", "full", "none")) or "none",
        "defaults": {"currency": currency, "locales": ["en-US"],
                     "profile": {"business_url": None, "doing_business_as": None, "product_description": None},
                     "responsibilities": {"fees_collector": "application", "losses_collector": "application",
                                          "requirements_collector": "stripe"}},
        "display_name": p.string("display_name"),
        "future_requirements": None,
        "identity": {"attestations": None, "business_details": None, "country": country.upper() if country else None,
                     "entity_type": entity_type, "individual": None},
        "livemode": False,
        "metadata": p.metadata(),
        "requirements": _requirements(True),
        "_onboarded": False,
    }
    ctx.store.insert(account)
    return render_account(account, p.strings("include"))


def v2_shape(value: object) -> object:
    """A v2 object as the API sends it: an unset field is left out, not null."""
    if isinstance(value, dict):
        return {k: v2_shape(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [v2_shape(v) for v in value]
    return value


def render_account(account: Obj, include: list[str]) -> Obj:
    """The account as v2 answers: the includable parts are left out unless asked for with ``include``."""
    for value in include:
        if value not in INCLUDABLE:
            raise invalid("include", f"Invalid include value {value!r}: one of {', '.join(INCLUDABLE)}")
    out = public(account)
    configs = [value.split(".", 1)[1] for value in include if value.startswith("configuration.")]
    out["configuration"] = ({name: (account["configuration"] or {}).get(name) for name in
                             ("customer", "merchant", "recipient") if name in configs} if configs else None)
    for key in ("defaults", "future_requirements", "identity", "requirements"):
        if key not in include:
            out[key] = None
    shaped: Obj = v2_shape(out)  # type: ignore[assignment]
    return shaped


def _account(ctx: Ctx, account_id: str | None, param: str) -> Obj:
    found = ctx.store.get(account_id, "v2.core.account") if account_id else None
    if found is None:
        raise no_such("account", account_id or "", param)
    return found


def retrieve_account(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("include",))
    return render_account(_account(ctx, args["id"], "id"), p.strings("include"))


def update_account(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("contact_email", "display_name", "metadata", "include"))
    account = _account(ctx, args["id"], "id")
    for key in ("contact_email", "display_name"):
        if p.has(key):
            account[key] = p.string(key)
    account["metadata"] = p.metadata(account["metadata"])
    ctx.store.update(account)
    return render_account(account, p.strings("include"))


def list_accounts(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("limit", "page", "applied_configurations"))
    page = Params({k: v for k, v in p.data.items() if k == "limit"})
    listed = list_page(ctx, page, "v2.core.account", "/v2/core/accounts")
    return {"data": [render_account(a, []) for a in listed["data"]], "next_page_url": None,
            "previous_page_url": None}


def create_account_link(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("account", "use_case"))
    account = _account(ctx, p.req_str("account"), "account")
    use_case = p.sub("use_case", required=True)
    assert use_case is not None
    use_case.allow(("type", "account_onboarding", "account_update"))
    kind = use_case.req_str("type", choices=("account_onboarding", "account_update"))
    detail = use_case.sub(kind, required=True)
    assert detail is not None
    detail.allow(("configurations", "refresh_url", "return_url", "collection_options"))
    configurations = detail.strings("configurations")
    if not configurations:
        raise missing(detail.name("configurations"))
    refresh_url = detail.url("refresh_url", required=True)
    return_url = detail.url("return_url")
    link: Obj = {
        "id": new_id("acctlink_"),
        "object": "v2.core.account_link",
        "account": account["id"],
        "created": _rfc3339(ctx.now),
        "expires_at": _rfc3339(ctx.now + LINK_TTL),
        "livemode": False,
        "url": f"https://connect.sandbox.aims.invalid/setup/{account['id']}/{random_base62(24)}",
        "use_case": {"type": kind, "account_onboarding": None, "account_update": None,
                     kind: {"collection_options": None, "configurations": configurations,
                            "refresh_url": refresh_url, "return_url": return_url}},
    }
    ctx.store.insert(link)
    out = public(link)
    out.pop("id")
    shaped: Obj = v2_shape(out)  # type: ignore[assignment]
    return shaped


def can_receive(account: Obj) -> bool:
    """Whether the account's recipient configuration can receive transfers now."""
    recipient = (account.get("configuration") or {}).get("recipient") or {}
    transfers = ((recipient.get("capabilities") or {}).get("stripe_balance") or {}).get("stripe_transfers") or {}
    return bool(recipient.get("applied")) and transfers.get("status") == "active"


def currency_of(account: Obj) -> str | None:
    return (account.get("defaults") or {}).get("currency")


def v1_view(account: Obj) -> Obj:
    """The account as v1 (and the ``account.updated`` Event) renders it."""
    active = can_receive(account)
    due = [entry["description"] for entry in (account.get("requirements") or {}).get("entries") or []]
    country = (account.get("identity") or {}).get("country")
    return {
        "id": account["id"],
        "object": "account",
        "business_profile": {"mcc": None, "minority_owned_business_designation": None,
                             "name": account.get("display_name"), "support_address": None, "support_email": None,
                             "support_phone": None, "support_url": None, "url": None},
        "capabilities": {"transfers": "active" if active else "inactive"},
        "charges_enabled": False,
        "country": country,
        "default_currency": currency_of(account),
        "details_submitted": bool(account.get("_onboarded")),
        "email": account.get("contact_email"),
        "metadata": account.get("metadata") or {},
        "payouts_enabled": active,
        "requirements": {"alternatives": [], "current_deadline": None, "currently_due": due,
                         "eventually_due": due, "past_due": [],
                         "pending_verification": [], "errors": [],
                         "disabled_reason": None if active else "requirements.past_due"},
        "type": "custom",
    }


def set_onboarded(ctx: Ctx, account_id: str, onboarded: bool) -> Obj:
    """Complete onboarding (or ask for more: restricted again) and announce it with ``account.updated``."""
    account = _account(ctx, account_id, "id")
    before = v1_view(account)
    recipient = (account.get("configuration") or {}).get("recipient")
    if recipient is None:
        raise StripeError(400, f"Account {account_id} has no recipient configuration: request "
                          "configuration.recipient.capabilities.stripe_balance.stripe_transfers.", param="id")
    recipient["capabilities"]["stripe_balance"] = {"payouts": _capability(onboarded),
                                                   "stripe_transfers": _capability(onboarded)}
    account["requirements"] = _requirements(not onboarded)
    account["_onboarded"] = bool(account.get("_onboarded")) or onboarded  # details stay submitted
    ctx.store.update(account)
    after = v1_view(account)
    previous = {key: before[key] for key in ("capabilities", "requirements", "payouts_enabled", "details_submitted")
                if before[key] != after[key]}
    ctx.record_event("account.updated", after, previous)
    return after


# -- transfers ----------------------------------------------------------------------------------------------------

def _receivable(ctx: Ctx, destination: str | None, currency: str, param: str = "destination") -> Obj:
    """The destination account if it can receive `currency` now; else Stripe's error."""
    if destination is None:
        raise missing(param)
    account = ctx.store.get(destination, "v2.core.account")
    if account is None:
        raise StripeError(400, f"No such destination: '{destination}'", code="resource_missing", param=param)
    if not can_receive(account):
        raise StripeError(400, "Your destination account needs to have at least one of the following capabilities "
                          "enabled: transfers, crypto_transfers, legacy_payments",
                          code="insufficient_capabilities_for_transfer", param=param)
    if currency != currency_of(account):
        raise invalid("currency", f"Account {destination} cannot receive transfers in {currency}: it receives "
                      f"{currency_of(account)}.", code="transfers_not_allowed")
    return account


def new_transfer(ctx: Ctx, *, amount: int, currency: str, destination: str, transfer_group: str | None,
                 source_transaction: str | None, metadata: dict[str, str], description: str | None = None) -> Obj:
    transfer_id = new_id("tr_")
    transfer: Obj = {
        "id": transfer_id,
        "object": "transfer",
        "amount": amount,
        "amount_reversed": 0,
        "balance_transaction": new_id("txn_"),
        "created": ctx.now,
        "currency": currency,
        "description": description,
        "destination": destination,
        "destination_payment": new_id("py_"),
        "livemode": False,
        "metadata": metadata,
        "reversals": embedded_list([], f"/v1/transfers/{transfer_id}/reversals"),
        "reversed": False,
        "source_transaction": source_transaction,
        "source_type": "card",
        "transfer_group": transfer_group,
    }
    ctx.store.insert(transfer)
    ctx.store.balance_adjust(currency, -amount)
    ctx.store.account_balance_add(destination, currency, amount)
    ctx.record_event("transfer.created", transfer)
    return transfer


def create_transfer(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("amount", "currency", "destination", "transfer_group", "source_transaction", "metadata",
             "description", "source_type"))
    amount = p.integer("amount", required=True, minimum=1)
    currency = p.currency(required=True)
    assert amount is not None and currency is not None
    destination = p.string("destination", required=True)
    _receivable(ctx, destination, currency)
    assert destination is not None
    source = p.string("source_transaction")
    if source is not None:
        pi = ctx.store.find_one("payment_intent", "latest_charge", source)
        if pi is None or pi["status"] != "succeeded":
            raise StripeError(400, f"No such charge: '{source}'", code="resource_missing",
                              param="source_transaction")
        if pi["currency"] != currency:
            raise invalid("currency", f"The currency of source_transaction's balance transaction ({pi['currency']}) "
                          f"must be the same as the transfer currency ({currency})")
    else:
        available = dict((c, a) for c, a, _ in ctx.store.balance_rows()).get(currency, 0)
        if available < amount:
            raise StripeError(400, "You have insufficient available funds in your Stripe account. Try adding funds "
                              "directly to your available balance by creating Charges using the "
                              "4000000000000077 test card.", code="balance_insufficient", param="amount")
    return new_transfer(ctx, amount=amount, currency=currency, destination=destination,
                        transfer_group=p.string("transfer_group"), source_transaction=source,
                        metadata=p.metadata(), description=p.string("description"))


def retrieve_transfer(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("transfer", args["id"], "transfer", "id")


def list_transfers(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "destination", "transfer_group"))
    return list_page(ctx, p, "transfer", "/v1/transfers",
                     {**p.string_filter("destination"), **p.string_filter("transfer_group")})


def reverse(ctx: Ctx, transfer: Obj, amount: int, *, metadata: dict[str, str], source_refund: str | None) -> Obj:
    left = int(transfer["amount"]) - int(transfer["amount_reversed"])
    if amount > left:
        raise invalid("amount", f"Amount ({amount}) is greater than unreversed amount on transfer ({left})",
                      code="amount_too_large")
    reversal: Obj = {
        "id": new_id("trr_"),
        "object": "transfer_reversal",
        "amount": amount,
        "balance_transaction": new_id("txn_"),
        "created": ctx.now,
        "currency": transfer["currency"],
        "destination_payment_refund": new_id("pyr_"),
        "metadata": metadata,
        "source_refund": source_refund,
        "transfer": transfer["id"],
        "_parent": transfer["id"],
    }
    ctx.store.insert(reversal)
    transfer["amount_reversed"] = int(transfer["amount_reversed"]) + amount
    transfer["reversed"] = transfer["amount_reversed"] == transfer["amount"]
    transfer["reversals"]["data"] = [public(reversal), *transfer["reversals"]["data"]]
    transfer["reversals"]["total_count"] = len(transfer["reversals"]["data"])
    ctx.store.update(transfer)
    ctx.store.balance_adjust(transfer["currency"], amount)
    ctx.store.account_balance_add(transfer["destination"], transfer["currency"], -amount)
    ctx.record_event("transfer.reversed", transfer)
    return reversal


def create_reversal(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("amount", "metadata", "description", "refund_application_fee"))
    transfer = ctx.fetch("transfer", args["id"], "transfer", "id")
    left = int(transfer["amount"]) - int(transfer["amount_reversed"])
    if left <= 0:
        raise StripeError(400, f"Transfer {transfer['id']} has already been fully reversed.",
                          code="transfer_already_reversed")
    amount = p.integer("amount", minimum=1)
    return reverse(ctx, transfer, left if amount is None else amount, metadata=p.metadata(), source_refund=None)


def list_reversals(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(LIST_PARAMS)
    transfer = ctx.fetch("transfer", args["id"], "transfer", "id")
    return list_page(ctx, p, "transfer_reversal", f"/v1/transfers/{transfer['id']}/reversals",
                     {"_parent": transfer["id"]})


# -- application fees ---------------------------------------------------------------------------------------------

def new_application_fee(ctx: Ctx, *, amount: int, currency: str, account: str, charge: str) -> Obj:
    fee_id = new_id("fee_")
    fee: Obj = {
        "id": fee_id,
        "object": "application_fee",
        "account": account,
        "amount": amount,
        "amount_refunded": 0,
        "application": APPLICATION,
        "balance_transaction": new_id("txn_"),
        "charge": charge,
        "created": ctx.now,
        "currency": currency,
        "fee_source": {"charge": charge, "type": "charge"},
        "livemode": False,
        "originating_transaction": None,
        "refunded": False,
        "refunds": embedded_list([], f"/v1/application_fees/{fee_id}/refunds"),
    }
    ctx.store.insert(fee)
    ctx.store.balance_adjust(currency, amount)
    ctx.store.account_balance_add(account, currency, -amount)
    ctx.record_event("application_fee.created", fee)
    return fee


def refund_fee(ctx: Ctx, fee: Obj, amount: int, *, metadata: dict[str, str]) -> Obj:
    left = int(fee["amount"]) - int(fee["amount_refunded"])
    if amount > left:
        raise invalid("amount", f"Refund amount ({amount}) is greater than unrefunded amount on fee ({left})",
                      code="amount_too_large")
    refund: Obj = {
        "id": new_id("fr_"),
        "object": "fee_refund",
        "amount": amount,
        "balance_transaction": new_id("txn_"),
        "created": ctx.now,
        "currency": fee["currency"],
        "fee": fee["id"],
        "metadata": metadata,
        "_parent": fee["id"],
    }
    ctx.store.insert(refund)
    fee["amount_refunded"] = int(fee["amount_refunded"]) + amount
    fee["refunded"] = fee["amount_refunded"] == fee["amount"]
    fee["refunds"]["data"] = [public(refund), *fee["refunds"]["data"]]
    fee["refunds"]["total_count"] = len(fee["refunds"]["data"])
    ctx.store.update(fee)
    ctx.store.balance_adjust(fee["currency"], -amount)
    ctx.store.account_balance_add(fee["account"], fee["currency"], amount)
    ctx.record_event("application_fee.refunded", fee)
    return refund


def create_fee_refund(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("amount", "metadata"))
    fee = ctx.fetch("application_fee", args["id"], "application fee", "id")
    left = int(fee["amount"]) - int(fee["amount_refunded"])
    if left <= 0:
        raise StripeError(400, f"Application fee {fee['id']} has already been refunded.",
                          code="charge_already_refunded")
    amount = p.integer("amount", minimum=1)
    return refund_fee(ctx, fee, left if amount is None else amount, metadata=p.metadata())


def retrieve_fee(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("application_fee", args["id"], "application fee", "id")


def list_fees(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "charge"))
    return list_page(ctx, p, "application_fee", "/v1/application_fees", p.string_filter("charge"))


def list_fee_refunds(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(LIST_PARAMS)
    fee = ctx.fetch("application_fee", args["id"], "application fee", "id")
    return list_page(ctx, p, "fee_refund", f"/v1/application_fees/{fee['id']}/refunds", {"_parent": fee["id"]})


# -- destination charges ------------------------------------------------------------------------------------------

def destination_params(ctx: Ctx, p: Params, amount: int | None, currency: str | None) -> Obj | None:
    """Validate ``transfer_data`` / ``application_fee_amount`` / ``transfer_group`` (of a PaymentIntent, a session's
    ``payment_intent_data`` or a payment link) into what the PaymentIntent keeps; None when there is no
    destination."""
    data = p.sub("transfer_data")
    fee = p.integer("application_fee_amount", minimum=0)
    group = p.string("transfer_group") if p.has("transfer_group") else None
    if data is None:
        if fee is not None:
            raise invalid(p.name("application_fee_amount"), "Can only apply an application_fee_amount when the "
                          "PaymentIntent is attempting a direct payment (using an OAuth key or Stripe-Account "
                          "header) or destination payment (using `transfer_data[destination]`).")
        return {"transfer_group": group} if group else None
    data.allow(("destination", "amount"))
    destination = data.string("destination", required=True)
    transfer_amount = data.integer("amount", minimum=1)
    if transfer_amount is not None and fee is not None:
        raise invalid(p.name("application_fee_amount"),
                      "You may only specify one of these parameters: application_fee_amount, transfer_data[amount].")
    if currency is not None:
        _receivable(ctx, destination, currency, data.name("destination"))
    elif ctx.store.get(destination or "", "v2.core.account") is None:
        raise StripeError(400, f"No such destination: '{destination}'", code="resource_missing",
                          param=data.name("destination"))
    if amount is not None:
        for name, value in ((p.name("application_fee_amount"), fee), (data.name("amount"), transfer_amount)):
            if value is not None and value > amount:
                raise invalid(name, f"{name} ({value}) must be less than or equal to the amount ({amount}).")
    return {"transfer_data": {"destination": destination, "amount": transfer_amount},
            "application_fee_amount": fee, "transfer_group": group}


def apply_destination(pi: Obj, destination: Obj | None) -> None:
    """Put validated destination parameters on a PaymentIntent being created."""
    if destination:
        data = destination.get("transfer_data")  # a PaymentIntent leaves out an unset amount (a link shows null)
        pi["transfer_data"] = {k: v for k, v in data.items() if v is not None} if data else None
        pi["application_fee_amount"] = destination.get("application_fee_amount")
        pi["transfer_group"] = destination.get("transfer_group")


def settle_destination(ctx: Ctx, pi: Obj) -> None:
    """A succeeded PaymentIntent with ``transfer_data``: the transfer to its destination and the application fee."""
    data = pi.get("transfer_data")
    if not data:
        return
    _receivable(ctx, data["destination"], pi["currency"], "transfer_data[destination]")
    pi["transfer_group"] = pi.get("transfer_group") or f"group_{pi['id']}"
    amount = int(data.get("amount") or pi["amount"])
    transfer = new_transfer(ctx, amount=amount, currency=pi["currency"], destination=data["destination"],
                            transfer_group=pi["transfer_group"], source_transaction=pi["latest_charge"], metadata={})
    pi["_transfer"] = transfer["id"]
    if pi.get("application_fee_amount"):
        fee = new_application_fee(ctx, amount=int(pi["application_fee_amount"]), currency=pi["currency"],
                                  account=data["destination"], charge=pi["latest_charge"])
        pi["_application_fee"] = fee["id"]


def _share(total: int, refunded_before: int, refunded_now: int, charged: int) -> int:
    """The part of `total` that `refunded_now` (after `refunded_before`) of `charged` takes back: cumulative, so
    refunds adding up to the whole charge take back exactly `total`."""
    return total * (refunded_before + refunded_now) // charged - total * refunded_before // charged


def refund_destination(ctx: Ctx, pi: Obj, refund: Obj, refunded_before: int, *, reverse_transfer: bool,
                       refund_application_fee: bool) -> None:
    """A refund of a destination charge: reverse the transfer and refund the fee in proportion."""
    charged = int(pi["amount_received"])
    amount = int(refund["amount"])
    if reverse_transfer and pi.get("_transfer"):
        transfer = ctx.store.get(pi["_transfer"], "transfer")
        assert transfer is not None
        part = min(_share(int(transfer["amount"]), refunded_before, amount, charged),
                   int(transfer["amount"]) - int(transfer["amount_reversed"]))
        if part > 0:
            reversal = reverse(ctx, transfer, part, metadata={}, source_refund=refund["id"])
            refund["transfer_reversal"] = reversal["id"]
    if refund_application_fee and pi.get("_application_fee"):
        fee = ctx.store.get(pi["_application_fee"], "application_fee")
        assert fee is not None
        part = min(_share(int(fee["amount"]), refunded_before, amount, charged),
                   int(fee["amount"]) - int(fee["amount_refunded"]))
        if part > 0:
            refund_fee(ctx, fee, part, metadata={})


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday")
SETTLEMENT_DELAY_DAYS = 2


def _payouts_active(account: Obj) -> bool:
    recipient = (account.get("configuration") or {}).get("recipient") or {}
    payouts = ((recipient.get("capabilities") or {}).get("stripe_balance") or {}).get("payouts") or {}
    return payouts.get("status") == "active"


def render_balance_settings(account: Obj) -> Obj:
    settings = account.get("_balance_settings") or {}
    interval = settings.get("interval", "daily")
    return {
        "object": "balance_settings",
        "payments": {
            "debit_negative_balances": bool(settings.get("debit_negative_balances", False)),
            "payouts": {
                "minimum_balance_by_currency": None,
                "schedule": {
                    "interval": interval,
                    **({"monthly_payout_days": settings.get("monthly_payout_days") or [1]}
                       if interval == "monthly" else {}),
                    **({"weekly_payout_days": settings.get("weekly_payout_days") or ["monday"]}
                       if interval == "weekly" else {}),
                },
                "statement_descriptor": settings.get("statement_descriptor"),
                "status": "enabled" if _payouts_active(account) else "disabled",
            },
            "settlement_timing": {"delay_days": settings.get("delay_days_override") or SETTLEMENT_DELAY_DAYS,
                                  **({"delay_days_override": settings["delay_days_override"]}
                                     if settings.get("delay_days_override") else {})},
        },
    }


def _settings_account(ctx: Ctx) -> Obj:
    if ctx.account is None:
        raise StripeError(400, "Balance settings are read and updated for a connected account: send the "
                          "Stripe-Account header.", param="Stripe-Account")
    return _account(ctx, ctx.account, "Stripe-Account")


def retrieve_balance_settings(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(())
    return render_balance_settings(_settings_account(ctx))


def update_balance_settings(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("payments",))
    account = _settings_account(ctx)
    settings = dict(account.get("_balance_settings") or {})
    payments = p.sub("payments")
    if payments is not None:
        payments.allow(("debit_negative_balances", "payouts", "settlement_timing"))
        if (debit := payments.boolean("debit_negative_balances")) is not None:
            settings["debit_negative_balances"] = debit
        timing = payments.sub("settlement_timing")
        if timing is not None:
            timing.allow(("delay_days_override",))
            settings["delay_days_override"] = timing.integer("delay_days_override", minimum=1)
        payouts = payments.sub("payouts")
        if payouts is not None:
            payouts.allow(("minimum_balance_by_currency", "schedule", "statement_descriptor"))
            if payouts.has("statement_descriptor"):
                settings["statement_descriptor"] = payouts.string("statement_descriptor")
            schedule = payouts.sub("schedule")
            if schedule is not None:
                schedule.allow(("interval", "monthly_payout_days", "weekly_payout_days"))
                interval = schedule.string("interval", choices=("daily", "manual", "monthly", "weekly"))
                interval = interval or settings.get("interval", "daily")
                days = schedule.strings("weekly_payout_days")
                for day in days:
                    if day not in WEEKDAYS:
                        raise invalid(schedule.name("weekly_payout_days"), f"Invalid weekly_payout_days: {day!r} is "
                                      f"not one of {', '.join(WEEKDAYS)}")
                monthly = []
                for value in schedule.strings("monthly_payout_days"):
                    if not value.isdigit() or not 1 <= int(value) <= 31:
                        raise invalid(schedule.name("monthly_payout_days"), "Invalid monthly_payout_days: each is "
                                      "a day of the month, 1 to 31")
                    monthly.append(int(value))
                if (days and interval != "weekly") or (monthly and interval != "monthly"):
                    raise invalid(schedule.name("interval"), "weekly_payout_days needs interval weekly and "
                                  "monthly_payout_days interval monthly")
                settings.update(interval=interval, weekly_payout_days=days or None, monthly_payout_days=monthly or None)
    account["_balance_settings"] = settings
    ctx.store.update(account)
    return render_balance_settings(account)


def connected_balance(ctx: Ctx, account_id: str) -> Obj:
    rows = ctx.store.account_balance_rows(account_id) or [("usd", 0)]
    return {
        "object": "balance",
        "available": [{"amount": a, "currency": c, "source_types": {"card": a}} for c, a in rows],
        "pending": [{"amount": 0, "currency": c, "source_types": {"card": 0}} for c, _ in rows],
        "livemode": False,
    }


def check_account_header(ctx: Ctx, account_id: str) -> None:
    """Stripe-Account must name an account of this platform."""
    if ctx.store.get(account_id, "v2.core.account") is None:
        raise StripeError(403, f"The provided key does not have access to account '{account_id}' (or that account "
                          "does not exist). Application access may have been revoked.", type="invalid_request_error",
                          code="account_invalid")


ROUTES = [
    Route("POST", "/v2/core/accounts", create_account),
    Route("GET", "/v2/core/accounts", list_accounts),
    Route("GET", "/v2/core/accounts/{id}", retrieve_account),
    Route("POST", "/v2/core/accounts/{id}", update_account),
    Route("POST", "/v2/core/account_links", create_account_link),
    Route("GET", "/v1/balance_settings", retrieve_balance_settings),
    Route("POST", "/v1/balance_settings", update_balance_settings),
    Route("POST", "/v1/transfers", create_transfer),
    Route("GET", "/v1/transfers", list_transfers),
    Route("GET", "/v1/transfers/{id}", retrieve_transfer),
    Route("POST", "/v1/transfers/{id}/reversals", create_reversal),
    Route("GET", "/v1/transfers/{id}/reversals", list_reversals),
    Route("GET", "/v1/application_fees", list_fees),
    Route("GET", "/v1/application_fees/{id}", retrieve_fee),
    Route("POST", "/v1/application_fees/{id}/refunds", create_fee_refund),
    Route("GET", "/v1/application_fees/{id}/refunds", list_fee_refunds),
]
