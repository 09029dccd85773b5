"""Two things the x402 tests share, in the one helper file they may use:

- `Payer`: a generated eth-account key that signs EIP-3009 TransferWithAuthorization payments (typed data for the
  network's USDC EIP-712 domain) for a quote, as an x402 client would, in v2 or v1 form, and its payer registration;
- a worker process for tests/services/test_x402_processes.py:

    python tests/support/x402_worker.py DB QUOTE_ID PAYMENT
        opens the store, prints `ready`, waits for a line on stdin (so all workers present at once), presents
        PAYMENT (a header value) for QUOTE_ID and prints `accepted <receipt_id>` or `rejected <reason code>`.
"""


from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from typing import Any

from eth_account import Account

from aims_billing_mcp.services.x402 import CAIP_TO_NAME, NETWORKS

TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}


class Payer:
    def __init__(self, key: bytes | None = None) -> None:
        self.account = Account.from_key(key or os.urandom(32))
        self.address: str = self.account.address

    def authorization(self, requirements: dict[str, Any], **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        auth = {"from": self.address, "to": requirements["payTo"],
                "value": requirements.get("amount") or requirements["maxAmountRequired"],
                "validAfter": str(now - 60), "validBefore": str(now + 300), "nonce": "0x" + os.urandom(32).hex()}
        auth.update(overrides)
        return auth

    def sign(self, auth: dict[str, Any], network: str, *, key: Any = None) -> str:
        caip = network if network.startswith("eip155:") else NETWORKS[network][0]
        _c, chain_id, asset, name, version = NETWORKS[CAIP_TO_NAME[caip]]
        domain = {"name": name, "version": version, "chainId": chain_id, "verifyingContract": asset}
        message = {"from": auth["from"], "to": auth["to"], "value": int(auth["value"]),
                   "validAfter": int(auth["validAfter"]), "validBefore": int(auth["validBefore"]),
                   "nonce": bytes.fromhex(auth["nonce"][2:])}
        signed = Account.sign_typed_data(key or self.account.key, domain, TYPES, message)
        return "0x" + bytes(signed.signature).hex()

    def register(self, agent_id: str, pay_to: str) -> str:
        """The EIP-191 signature that registers this address as a payer of `agent_id`'s wallet (register_x402_payer)."""
        from eth_account.messages import encode_defunct

        from aims_billing_mcp.services.x402 import payer_registration_message

        message = encode_defunct(text=payer_registration_message(agent_id, self.address, pay_to))
        return "0x" + bytes(self.account.sign_message(message).signature).hex()

    def pay(self, required: dict[str, Any], *, version: int | None = None, sign_overrides: dict[str, Any] | None = None,
            **overrides: Any) -> dict[str, Any]:
        """A payment for the first accepted requirements of `required` (a PaymentRequired's wire JSON)."""
        requirements = required["accepts"][0]
        version = version or required["x402Version"]
        auth = self.authorization(requirements, **overrides)
        signature = self.sign({**auth, **(sign_overrides or {})}, requirements["network"])
        if version == 1:
            network = requirements["network"]
            return {"x402Version": 1, "scheme": "exact", "network": network if not network.startswith("eip155:")
                    else CAIP_TO_NAME[network], "payload": {"authorization": auth, "signature": signature}}
        accepted = dict(requirements)
        if "maxAmountRequired" in accepted:  # a v2 payment for v1 requirements: translate
            accepted = {"scheme": "exact", "network": NETWORKS[accepted["network"]][0], "asset": accepted["asset"],
                        "amount": accepted["maxAmountRequired"], "payTo": accepted["payTo"],
                        "maxTimeoutSeconds": accepted["maxTimeoutSeconds"], "extra": accepted.get("extra") or {}}
        return {"x402Version": 2, "accepted": accepted, "payload": {"authorization": auth, "signature": signature},
                "resource": required.get("resource")}


def header(obj: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


async def present(db: str, quote_id: str, payment: str) -> None:
    from aims_billing_mcp.errors import PaymentRejected
    from aims_billing_mcp.services.ledger import LedgerService
    from aims_billing_mcp.services.tiers import Pricing
    from aims_billing_mcp.services.x402 import X402Service
    from aims_billing_mcp.store import Store

    store = Store(db)
    pricing = Pricing.load()
    ledger = LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None)
    service = X402Service(store, ledger, None, pricing)
    service._scheme(NETWORKS[service.network][0])  # the SDK imported before the start line, not after
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    try:
        receipt = await service.verify_and_settle(payment, quote_id=quote_id)
        sys.stdout.write(f"accepted {receipt.receipt_id}\n")
    except PaymentRejected as exc:
        sys.stdout.write(f"rejected {exc.code}\n")
    finally:
        store.close()


if __name__ == "__main__":
    asyncio.run(present(sys.argv[1], sys.argv[2], sys.argv[3]))
