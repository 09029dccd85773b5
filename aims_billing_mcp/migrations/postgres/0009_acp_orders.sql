-- PostgreSQL mirror of ../0009_acp_orders.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- ACP order webhooks (issue 8, part 5): every order_create / order_update event for the agent platform, written in
-- the transaction that changed the order (an outbox), delivered after COMMIT, with its delivery record
CREATE TABLE acp_order_events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    order_id TEXT NOT NULL,
    checkout_session_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    delivered BIGINT NOT NULL DEFAULT 0,
    gave_up BIGINT NOT NULL DEFAULT 0,
    last_status BIGINT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    delivered_at TEXT
);
CREATE INDEX acp_order_events_order ON acp_order_events (order_id);
CREATE INDEX acp_order_events_pending ON acp_order_events (delivered, gave_up);
