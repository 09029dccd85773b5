-- PostgreSQL mirror of ../0006_x402.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- x402: the quotes a 402 challenge stands for, and what a receipt records beyond 0001's table
-- A quote is the server's side of a PaymentRequired: the amount (atomic USDC, 6 decimals), network (CAIP-2), asset,
-- pay-to, and the agent wallet and LUC a payment for it credits. It is paid at most once: `receipt_id` is UNIQUE and
-- so is x402_receipts.quote_id, both written in the transaction that records the receipt and credits the wallet.
CREATE TABLE x402_quotes (
    id TEXT PRIMARY KEY,
    network TEXT NOT NULL,
    asset TEXT NOT NULL,
    pay_to TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    agent_id TEXT,
    luc BIGINT NOT NULL DEFAULT 0 CHECK (luc >= 0),
    description TEXT NOT NULL,
    resource TEXT NOT NULL,
    x402_version BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'paid')),
    expires_at BIGINT NOT NULL,
    receipt_id TEXT UNIQUE,
    created_at TEXT NOT NULL,
    paid_at TEXT
);
CREATE INDEX x402_quotes_open ON x402_quotes (expires_at) WHERE status = 'open';
-- Stripe mode: the PaymentIntent reconciled, used once (NULL for on-chain receipts).
ALTER TABLE x402_receipts ADD COLUMN payment_intent TEXT;
CREATE UNIQUE INDEX x402_receipts_payment_intent ON x402_receipts (payment_intent) WHERE payment_intent IS NOT NULL;
CREATE UNIQUE INDEX x402_receipts_quote ON x402_receipts (quote_id) WHERE quote_id IS NOT NULL;
ALTER TABLE x402_receipts ADD COLUMN mode TEXT NOT NULL DEFAULT 'local';
ALTER TABLE x402_receipts ADD COLUMN x402_version BIGINT NOT NULL DEFAULT 2;
-- The settlement response (JSON) returned as PAYMENT-RESPONSE.
ALTER TABLE x402_receipts ADD COLUMN settlement TEXT;
CREATE INDEX x402_receipts_created ON x402_receipts (created_at);
