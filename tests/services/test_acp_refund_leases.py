"""ACP refunds of payments a checkout could not take, with several instances on one database: a refund one
instance's sender is making (it holds the refund's lease) is not sent again by another instance's sender."""

from __future__ import annotations

import anyio
import pytest

from tests.security.test_commerce_money import KEY, Seller, hold, shop  # noqa: F401  (shop: a fixture)
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)

pytestmark = pytest.mark.anyio


async def test_a_refund_one_instance_is_making_is_not_sent_by_a_second_instance(shop: Seller) -> None:  # noqa: F811
    _, session = await shop.canceled_then_paid()
    gate = hold(shop.sandbox, "/v1/refunds", mode="before")  # the first instance's refund, held at Stripe

    await shop.stack.payments.get_session(session.id)  # the success is seen: refund due, its sender started
    with anyio.fail_after(20):
        await gate.reached.wait()
    tripwire = shop.sandbox.faults.inject(status=503, path_prefix="/v1/refunds")  # consumed by any other refund call
    second = shop.stack.seller({KEY}, clock=shop.clock, public_url="https://seller.test")  # another instance
    with anyio.fail_after(20):  # (a second sender would wait at the gate, or fail at the tripwire)
        second.resume_refunds()  # what its start-up does: send every refund due
        await second.drain()

    assert tripwire in shop.sandbox.faults.active()  # the second instance never called Stripe's /v1/refunds
    shop.sandbox.faults.clear()
    gate.release()
    await shop.acp.drain()
    assert await shop.charges() == [(1000, 1000)]
    assert shop.stack.store.acp.refunds_due() == []
