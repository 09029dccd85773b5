-- PostgreSQL mirror of ../0002_lookup_indexes.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- lookup indexes
CREATE INDEX meter_events_pending ON meter_events (status, id);
CREATE INDEX meter_events_customer_time ON meter_events (customer_id, timestamp);
CREATE INDEX agent_transactions_wallet ON agent_transactions (wallet_id, id);
CREATE UNIQUE INDEX agent_transactions_idempotency ON agent_transactions (idempotency_key, entry)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX agent_wallets_customer ON agent_wallets (customer_id);
CREATE INDEX audit_log_tool_at ON audit_log (tool, at);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
