-- PostgreSQL mirror of ../0003_provisions_and_webhooks.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- provisions and webhooks: what the subscription lifecycle needs beyond the core tables
ALTER TABLE billing_provisions ADD COLUMN cancel_at BIGINT;
ALTER TABLE billing_provisions ADD COLUMN last_event_type TEXT;
ALTER TABLE webhook_events ADD COLUMN customer_id TEXT;
CREATE INDEX webhook_events_customer ON webhook_events (customer_id, created);
CREATE INDEX webhook_events_unprocessed ON webhook_events (processed, received_at);
