"""Catalog and checkout: products, prices, customers, payment links, checkout and portal sessions, invoices, balance.

Plain logic over the gateway: build the Stripe request, enforce the amount ceiling, run it once through the
idempotency service (or describe it for a dry run), and project Stripe's object to the small model a tool returns
(the result models are here, beside the code that makes them; amounts are integer minor units with a display
string beside them).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..errors import InvalidInput
from ..models import LineItem, MutationMeta, Recurring, format_amount
from ..stripe_gateway import StripeGateway, StripeRequest
from .ceiling import Ceiling
from .connect import ConnectService, SalePlan
from .mutations import StripeMutations, compact

# --- what the catalog tools return (projections of Stripe's objects; amounts in minor units) ------------------------


class Product(BaseModel):
    id: str
    name: str
    description: str | None = None
    active: bool
    default_price: str | None = None


class Price(BaseModel):
    id: str
    product: str
    currency: str
    unit_amount: int | None
    unit_amount_display: str | None
    type: str
    recurring: Recurring | None = None
    lookup_key: str | None = None
    nickname: str | None = None
    active: bool


class Customer(BaseModel):
    id: str
    email: str | None = None
    name: str | None = None
    description: str | None = None


class PaymentLink(BaseModel):
    id: str
    url: str
    active: bool
    line_items: list[LineItem]
    amount_total: int | None = Field(default=None, description="Sum of the line items in minor units, if one currency")
    currency: str | None = None


class CheckoutSession(BaseModel):
    id: str
    url: str | None
    mode: str
    status: str | None
    payment_status: str
    customer: str | None = None
    customer_email: str | None = None
    amount_total: int | None = None
    currency: str | None = None
    expires_at: int | None = None


class PortalSession(BaseModel):
    id: str
    url: str
    customer: str
    return_url: str | None = None


class ProductResult(MutationMeta):
    product: Product | None = None


class PriceResult(MutationMeta):
    price: Price | None = None


class CustomerResult(MutationMeta):
    customer: Customer | None = None


class PaymentLinkResult(MutationMeta):
    payment_link: PaymentLink | None = None


class CheckoutSessionResult(MutationMeta):
    checkout_session: CheckoutSession | None = None


class PortalSessionResult(MutationMeta):
    portal_session: PortalSession | None = None


class Invoice(BaseModel):
    id: str
    number: str | None = None
    customer: str | None
    status: str | None
    currency: str
    amount_due: int
    amount_paid: int
    amount_remaining: int
    total: int
    total_display: str
    hosted_invoice_url: str | None = None
    subscription: str | None = None
    created: int


class InvoiceList(BaseModel):
    invoices: list[Invoice]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as starting_after to get the next page; null on the last page")


class BalanceAmount(BaseModel):
    currency: str
    amount: int
    display: str


class Balance(BaseModel):
    mode: str = Field(description="sandbox, test or live: which Stripe this balance is from")
    available: list[BalanceAmount]
    pending: list[BalanceAmount]


class CatalogService:
    def __init__(self, mutations: StripeMutations, *, gateway: StripeGateway, ceiling: Ceiling | None = None,
                 connect: ConnectService | None = None) -> None:
        self._connect = connect  # sells plugs as destination charges (services/connect.py)
        self._mutations = mutations
        self._gateway = gateway
        self._ceiling = ceiling or Ceiling()
        self._mutate = mutations.run

    async def _line_item_total(self, line_items: list[LineItem]) -> tuple[int | None, str | None]:
        """Look up each price once: a clear error for a missing one, and the total (tiered prices at their
        quantity) held against the ceiling per currency."""
        if not line_items:
            raise InvalidInput("line_items is empty: pass at least one {price, quantity}", param="line_items")
        totals = await self._ceiling.check_line_items(self._gateway, [item.model_dump() for item in line_items])
        if len(totals) == 1:
            ((currency, amount),) = totals.items()
            return amount, currency
        return None, None

    async def _plan(self, line_items: list[LineItem], total: int | None, currency: str | None, *,
                    mode: str = "payment") -> SalePlan | None:
        """A cart with a plug is a destination charge to its creator, or with several creators' plugs the
        platform's charge then a transfer to each (refused here when one cannot be paid)."""
        if self._connect is None:
            return None
        plan = await self._connect.plan_sale([(i.price, i.quantity) for i in line_items], total, currency)
        if plan is not None and mode != "payment":
            raise InvalidInput("plugs are sold once (mode payment): remove the plug or use mode=payment", param="mode")
        return plan

    def _declare(self, path: str, plan: SalePlan | None) -> Any:
        if plan is None or self._connect is None:
            return None
        connect = self._connect
        return lambda d: connect.declare(path, d["id"], plan)

    # --- mutations --------------------------------------------------------------------------------------------------

    async def create_product(
        self, *, name: str, description: str | None, metadata: dict[str, str] | None,
        idempotency_key: str | None, dry_run: bool,
    ) -> ProductResult:
        params = compact({"name": name, "description": description, "metadata": metadata})
        return await self._mutate(
            "create_product", "/v1/products", params, ProductResult, lambda d: {"product": project_product(d)},
            idempotency_key=idempotency_key, dry_run=dry_run,
        )

    async def create_price(
        self, *, product: str, currency: str, unit_amount: int, recurring: Recurring | None,
        lookup_key: str | None, nickname: str | None, metadata: dict[str, str] | None,
        idempotency_key: str | None, dry_run: bool,
    ) -> PriceResult:
        self._ceiling.check(unit_amount, currency, "unit_amount")
        params = compact({
            "product": product, "currency": currency, "unit_amount": unit_amount,
            "recurring": recurring.model_dump() if recurring else None,
            "lookup_key": lookup_key, "nickname": nickname, "metadata": metadata,
        })
        return await self._mutate(
            "create_price", "/v1/prices", params, PriceResult, lambda d: {"price": project_price(d)},
            idempotency_key=idempotency_key, dry_run=dry_run,
        )

    async def create_customer(
        self, *, email: str | None, name: str | None, description: str | None, metadata: dict[str, str] | None,
        idempotency_key: str | None, dry_run: bool,
    ) -> CustomerResult:
        if not (email or name):
            raise InvalidInput("give at least one of email or name, so the customer can be found again",
                               param="email")
        params = compact({"email": email, "name": name, "description": description, "metadata": metadata})
        return await self._mutate(
            "create_customer", "/v1/customers", params, CustomerResult, lambda d: {"customer": project_customer(d)},
            idempotency_key=idempotency_key, dry_run=dry_run,
        )

    async def create_payment_link(
        self, *, line_items: list[LineItem], after_completion_url: str | None, metadata: dict[str, str] | None,
        idempotency_key: str | None, dry_run: bool,
    ) -> PaymentLinkResult:
        total, currency = await self._line_item_total(line_items)
        plan = await self._plan(line_items, total, currency)
        params = compact({
            "line_items": [item.model_dump() for item in line_items],
            "after_completion": {"type": "redirect", "redirect": {"url": after_completion_url}}
            if after_completion_url else None,
            "metadata": metadata, **(plan.destination() if plan else {}),  # several creators: transfers when paid
        })
        return await self._mutate(
            "create_payment_link", "/v1/payment_links", params, PaymentLinkResult,
            lambda d: {"payment_link": project_payment_link(d, line_items, total, currency)},
            idempotency_key=idempotency_key, dry_run=dry_run, after=self._declare("payment_link", plan),
        )

    async def create_checkout_session(
        self, *, mode: str, line_items: list[LineItem], success_url: str | None, cancel_url: str | None,
        customer: str | None, customer_email: str | None, client_reference_id: str | None,
        metadata: dict[str, str] | None, idempotency_key: str | None, dry_run: bool,
    ) -> CheckoutSessionResult:
        if customer and customer_email:
            raise InvalidInput("give customer or customer_email, not both: Stripe uses the customer's own email",
                               param="customer_email")
        total, currency = await self._line_item_total(line_items)
        plan = await self._plan(line_items, total, currency, mode=mode)
        params = compact({
            "mode": mode, "line_items": [item.model_dump() for item in line_items],
            "success_url": success_url, "cancel_url": cancel_url, "customer": customer,
            "customer_email": customer_email, "client_reference_id": client_reference_id, "metadata": metadata,
            "payment_intent_data": (plan.destination() if plan else None) or None,
        })
        return await self._mutate(
            "create_checkout_session", "/v1/checkout/sessions", params, CheckoutSessionResult,
            lambda d: {"checkout_session": project_checkout_session(d)},
            idempotency_key=idempotency_key, dry_run=dry_run, owner=customer, after=self._declare("checkout", plan),
        )

    async def create_billing_portal_session(
        self, *, customer: str, return_url: str | None, idempotency_key: str | None, dry_run: bool,
    ) -> PortalSessionResult:
        params = compact({"customer": customer, "return_url": return_url})
        return await self._mutate(
            "create_billing_portal_session", "/v1/billing_portal/sessions", params, PortalSessionResult,
            lambda d: {"portal_session": project_portal_session(d)},
            idempotency_key=idempotency_key, dry_run=dry_run, owner=customer,
        )

    # --- reads --------------------------------------------------------------------------------------------------

    async def list_invoices(
        self, *, customer: str | None, status: str | None, subscription: str | None, limit: int,
        starting_after: str | None,
    ) -> InvoiceList:
        params = compact({"customer": customer, "status": status, "subscription": subscription, "limit": limit,
                          "starting_after": starting_after})
        page = (await self._gateway.send(StripeRequest("get", "/v1/invoices", params))).data
        invoices = [project_invoice(item) for item in page.get("data", [])]
        has_more = bool(page.get("has_more"))
        return InvoiceList(invoices=invoices, has_more=has_more,
                           next_cursor=invoices[-1].id if has_more and invoices else None)

    async def retrieve_balance(self) -> Balance:
        data = (await self._gateway.send(StripeRequest("get", "/v1/balance"))).data

        def amounts(key: str) -> list[BalanceAmount]:
            return [
                BalanceAmount(currency=a["currency"], amount=int(a["amount"]),
                              display=format_amount(int(a["amount"]), a["currency"]))
                for a in data.get(key) or []
            ]

        return Balance(mode=self._gateway.mode.value, available=amounts("available"), pending=amounts("pending"))


# --- projections: Stripe object -> the small dict a tool returns ---------------------------------------------------


def _pick(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    return {name: data.get(name) for name in model.model_fields if name in data}


def project_product(d: dict[str, Any]) -> dict[str, Any]:
    return _pick(Product, d)


def project_price(d: dict[str, Any]) -> dict[str, Any]:
    out = _pick(Price, d)
    recurring = d.get("recurring")
    out["recurring"] = (
        {"interval": recurring["interval"], "interval_count": recurring.get("interval_count", 1)} if recurring else None
    )
    amount = d.get("unit_amount")
    out["unit_amount_display"] = format_amount(int(amount), d["currency"]) if amount is not None else None
    return out


def project_customer(d: dict[str, Any]) -> dict[str, Any]:
    return _pick(Customer, d)


def project_payment_link(
    d: dict[str, Any], line_items: list[LineItem], total: int | None, currency: str | None
) -> dict[str, Any]:
    return {"id": d["id"], "url": d["url"], "active": d.get("active", True),
            "line_items": [item.model_dump() for item in line_items], "amount_total": total, "currency": currency}


def project_checkout_session(d: dict[str, Any]) -> dict[str, Any]:
    return _pick(CheckoutSession, d)


def project_portal_session(d: dict[str, Any]) -> dict[str, Any]:
    return _pick(PortalSession, d)


def project_invoice(d: dict[str, Any]) -> Invoice:
    out = _pick(Invoice, d)
    out["total_display"] = format_amount(int(d.get("total") or 0), d["currency"])
    subscription = d.get("subscription") or ((d.get("parent") or {}).get("subscription_details") or {}).get(
        "subscription"
    )
    out["subscription"] = subscription
    return Invoice.model_validate(out)
