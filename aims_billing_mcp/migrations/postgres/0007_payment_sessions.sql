-- PostgreSQL mirror of ../0007_payment_sessions.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- payment sessions (issue 8): what the PaymentIntent last said, and what fulfilment did
ALTER TABLE payment_sessions ADD COLUMN amount_received BIGINT NOT NULL DEFAULT 0;
ALTER TABLE payment_sessions ADD COLUMN fulfilment TEXT;
CREATE INDEX payment_sessions_agent ON payment_sessions (agent_id, created_at);
