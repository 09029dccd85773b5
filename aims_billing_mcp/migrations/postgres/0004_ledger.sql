-- PostgreSQL mirror of ../0004_ledger.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- ledger: holds, spend-cap counters, per-operation idempotency
-- A wallet's `held` is the sum of its active holds; the CHECK makes available (balance - held) never negative.
ALTER TABLE agent_wallets ADD COLUMN held BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0 AND held <= balance);
-- Daily spend cap over the calendar UTC day: `spend_day` is the day number (epoch seconds // 86400) that
-- `spent_today` counts; a wallet whose spend_day is not today has spent nothing today.
ALTER TABLE agent_wallets ADD COLUMN spend_day BIGINT NOT NULL DEFAULT 0;
ALTER TABLE agent_wallets ADD COLUMN spent_today BIGINT NOT NULL DEFAULT 0 CHECK (spent_today >= 0);
-- `pending` is an entry's change to the account's held amount (two-phase holds); `amount` stays the posted change.
ALTER TABLE agent_transactions ADD COLUMN pending BIGINT NOT NULL DEFAULT 0;
ALTER TABLE agent_transactions ADD COLUMN hold_id TEXT;
CREATE INDEX agent_transactions_hold ON agent_transactions (hold_id) WHERE hold_id IS NOT NULL;
CREATE TABLE ledger_holds (
    id TEXT PRIMARY KEY,
    wallet_id TEXT NOT NULL REFERENCES agent_wallets (id),
    amount BIGINT NOT NULL CHECK (amount > 0),
    status TEXT NOT NULL CHECK (status IN ('active', 'captured', 'released', 'expired')),
    captured BIGINT NOT NULL DEFAULT 0 CHECK (captured >= 0 AND captured <= amount),
    expires_at TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    resolved_txn_id TEXT UNIQUE,
    resolved_at TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX ledger_holds_active ON ledger_holds (wallet_id, expires_at) WHERE status = 'active';
CREATE INDEX ledger_holds_expiring ON ledger_holds (expires_at) WHERE status = 'active';
-- One row per ledger operation that took effect: (operation, key) is the idempotency key, written in the same
-- transaction as the effect; `response` is the first result, returned again to a retry with the same arguments.
CREATE TABLE ledger_requests (
    operation TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    txn_id TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (operation, idempotency_key)
);
