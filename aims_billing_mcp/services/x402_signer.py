"""An offline `FacilitatorEvmSigner`: runs the x402 SDK's exact-EVM facilitator checks with no chain.

Imported lazily (by `X402Service` when it first verifies a payment), since the SDK's EVM stack costs half a second.

What each chain call answers here:
- `get_code`: empty for any account (payers are EOAs, verified by ecrecover: smart-wallet EIP-1271/6492 signatures
  need a chain and are refused as invalid signatures), non-empty for the USDC contracts we accept.
- `verify_typed_data`: eth-account typed-data recovery against the expected address.
- `read_contract`: `balanceOf` answers OFFLINE_BALANCE (a large balance: offline, we cannot see the payer's funds,
  which is the risk local mode accepts); `authorizationState(payer, nonce)` answers from our receipts table (true
  once a receipt records that nonce); a simulated `transferWithAuthorization` reverts with "authorization is used"
  for such a nonce and succeeds otherwise; `name`/`version` answer the network's EIP-712 domain.
- `write_contract` (the settlement): no transaction is sent; its hash is keccak256 of the authorization's fields
  (chain id, token, from, to, value, validAfter, validBefore, nonce), so the same authorization always "settles"
  to the same hash, which the receipts table keeps UNIQUE. `wait_for_transaction_receipt` answers success.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak  # type: ignore[attr-defined]
from x402.mechanisms.evm.types import TransactionReceipt

OFFLINE_BALANCE = 10**30  # atomic units: "enough" for any payment; the offline facilitator cannot read balances
CONTRACT_CODE = b"\x60\x80"  # a stand-in bytecode: "this address is a deployed contract"
FACILITATOR_ADDRESS = "0x0000000000000000000000000000000000000402"


class OfflineFacilitatorSigner:
    """`nonce_used(payer, nonce_hex)` answers authorizationState from the store; `tokens` maps each accepted USDC
    address (lowercase) to its EIP-712 (name, version); `chain_id` is the network's."""

    def __init__(self, *, chain_id: int, tokens: dict[str, tuple[str, str]],
                 nonce_used: Callable[[str, str, str], bool]) -> None:
        self.chain_id = chain_id
        self.tokens = {address.lower(): domain for address, domain in tokens.items()}
        self.nonce_used = nonce_used
        self.settled: list[str] = []

    def get_addresses(self) -> list[str]:
        return [FACILITATOR_ADDRESS]

    def get_chain_id(self) -> int:
        return self.chain_id

    def get_code(self, address: str) -> bytes:
        return CONTRACT_CODE if address.lower() in self.tokens else b""

    def get_balance(self, address: str, token_address: str) -> int:
        return OFFLINE_BALANCE

    def verify_typed_data(self, address: str, domain: Any, types: dict[str, Any], primary_type: str,
                          message: dict[str, Any], signature: bytes) -> bool:
        domain_dict = domain if isinstance(domain, dict) else {
            k: v for k, v in (("name", domain.name), ("version", domain.version), ("chainId", domain.chain_id),
                              ("verifyingContract", domain.verifying_contract)) if v}
        plain_types = {name: [f if isinstance(f, dict) else {"name": f.name, "type": f.type} for f in fields]
                       for name, fields in types.items()}
        try:
            signable = encode_typed_data(domain_dict, plain_types, message)
            recovered = Account.recover_message(signable, signature=signature)
        except Exception:
            return False
        return bool(recovered.lower() == address.lower())

    def read_contract(self, address: str, abi: list[dict[str, Any]], function_name: str, *args: Any) -> Any:
        token = address.lower()
        if function_name == "balanceOf":
            return OFFLINE_BALANCE
        if function_name == "authorizationState":
            payer, nonce = args[0], args[1]
            return self.nonce_used(token, str(payer), _hex(nonce))
        if function_name == "transferWithAuthorization":
            payer, nonce = args[0], args[5]
            if self.nonce_used(token, str(payer), _hex(nonce)):
                raise RuntimeError("execution reverted: FiatTokenV2: authorization is used or canceled")
            return None
        if function_name in ("name", "version") and token in self.tokens:
            name, version = self.tokens[token]
            return name if function_name == "name" else version
        raise RuntimeError(f"offline facilitator: no chain to call {function_name} on {address}")

    def write_contract(self, address: str, abi: list[dict[str, Any]], function_name: str, *args: Any,
                       data_suffix: str | None = None) -> str:
        if function_name != "transferWithAuthorization":
            raise RuntimeError(f"offline facilitator: cannot send {function_name}")
        tx_hash = simulated_tx_hash(self.chain_id, address, *args[:6])
        self.settled.append(tx_hash)
        return tx_hash

    def send_transaction(self, to: str, data: bytes) -> str:
        raise RuntimeError("offline facilitator: cannot deploy smart wallets (no chain)")

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        return TransactionReceipt(status=1, block_number=0, tx_hash=tx_hash, logs=None)


def simulated_tx_hash(chain_id: int, token: str, payer: str, to: str, value: int, valid_after: int,
                      valid_before: int, nonce: bytes | str) -> str:
    """keccak256 over the authorization's fields, each fixed-width: one authorization, one hash."""
    parts = [
        int(chain_id).to_bytes(32, "big"),
        bytes.fromhex(token[2:]),
        bytes.fromhex(payer[2:]),
        bytes.fromhex(to[2:]),
        int(value).to_bytes(32, "big"),
        int(valid_after).to_bytes(32, "big"),
        int(valid_before).to_bytes(32, "big"),
        bytes.fromhex(_hex(nonce)[2:]),
    ]
    return "0x" + keccak(b"".join(parts)).hex()


def _hex(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    text = str(value).lower()
    return text if text.startswith("0x") else "0x" + text
