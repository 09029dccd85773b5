-- Usage deltas (issue 16, performance): see the SQLite migration of the same number. The PostgreSQL store keeps
-- writing its totals and counters directly (array upserts under its per-customer locks) and never appends deltas;
-- the tables exist so both backends have one schema and the shared reads (totals plus deltas) run unchanged.
CREATE TABLE meter_usage_deltas (
    customer_id TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    meter TEXT NOT NULL,
    operation TEXT NOT NULL,
    events BIGINT NOT NULL,
    raw_units BIGINT NOT NULL,
    weighted_units BIGINT NOT NULL,
    overage_units BIGINT NOT NULL,
    cost_cents BIGINT NOT NULL
);
CREATE TABLE meter_usage_version (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO meter_usage_version (id, version) VALUES (1, 0);
