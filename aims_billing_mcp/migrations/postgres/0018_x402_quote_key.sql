-- PostgreSQL mirror of ../0018_x402_quote_key.sql: the same table, the same number in both histories.
-- The x402 challenge-token key (services/x402.py): one row, shared by every process and instance on this database
-- (a challenge signed by one is verified by another). Made on first use by INSERT ... ON CONFLICT DO NOTHING and
-- read back, so instances starting at once agree on the first one written. Never printed.
CREATE TABLE x402_quote_key (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    key TEXT NOT NULL,  -- 32 random bytes, hex
    created_at TEXT NOT NULL
);
