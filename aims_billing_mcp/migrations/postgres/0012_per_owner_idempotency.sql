-- PostgreSQL mirror of ../0012_per_owner_idempotency.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- Idempotency keys belong to their owner (design.md section 3): one party's key never blocks or replays another's.
-- Wallet operations: (owner, operation, key), the owner being the wallet's agent id (a transfer's: the source
-- wallet; a hold's capture or release: the hold's wallet). Rows written before take the agent their response names.
CREATE TABLE ledger_requests_by_owner (
    owner TEXT NOT NULL,
    operation TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    txn_id TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (operation, idempotency_key, owner)  -- the key first: concurrent inserts share pages (group commit)
);
INSERT INTO ledger_requests_by_owner (owner, operation, idempotency_key, request_hash, response, txn_id, created_at)
    SELECT COALESCE((response::jsonb ->> 'agent_id'), (response::jsonb ->> 'from_agent'), ''), operation,
           idempotency_key, request_hash, response, txn_id, created_at
      FROM ledger_requests;
DROP TABLE ledger_requests;
ALTER TABLE ledger_requests_by_owner RENAME TO ledger_requests;
-- A ledger key is unique per account: entry 0 of every transaction is the owning wallet's side.
DROP INDEX agent_transactions_idempotency;
CREATE UNIQUE INDEX agent_transactions_idempotency ON agent_transactions (idempotency_key, account)
    WHERE entry = 0 AND idempotency_key IS NOT NULL;
-- Stripe-mutating tools: (tool, owner, key), the owner being the customer a call acts for ('' for the operator's
-- own catalog calls, which name no customer).
CREATE TABLE idempotency_keys_by_owner (
    tool TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    request_id TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (tool, key, owner)
);
INSERT INTO idempotency_keys_by_owner (tool, owner, key, request_hash, response, request_id, created_at)
    SELECT tool, '', key, request_hash, response, request_id, created_at FROM idempotency_keys;
DROP TABLE idempotency_keys;
ALTER TABLE idempotency_keys_by_owner RENAME TO idempotency_keys;
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
