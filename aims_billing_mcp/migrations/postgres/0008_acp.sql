-- PostgreSQL mirror of ../0008_acp.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- Agentic Commerce Protocol seller (issue 8, part 3): checkout sessions, and the Idempotency-Key record of every
-- ACP POST (scoped to the caller's identity and the endpoint: ACP's rules, not our tools' idempotency_keys)
CREATE TABLE acp_checkout_sessions (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    currency TEXT NOT NULL,
    agent_id TEXT,
    state TEXT NOT NULL,
    payment_session_id TEXT UNIQUE,
    order_id TEXT UNIQUE,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE acp_idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    status BIGINT,
    response TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, key)
);
