-- metering: what each event was told, running totals per usage period, verified customers, task slots, flushes
-- Each meter event keeps the numbers its answer was computed from (tier, period, the period's total after it, the
-- allowance and rate then, its own overage and cost), so a replay returns the first answer and a summary is a sum.
ALTER TABLE meter_events ADD COLUMN tier TEXT;
ALTER TABLE meter_events ADD COLUMN period_start INTEGER;
ALTER TABLE meter_events ADD COLUMN period_end INTEGER;
ALTER TABLE meter_events ADD COLUMN period_units_after INTEGER;
ALTER TABLE meter_events ADD COLUMN allowance INTEGER;
ALTER TABLE meter_events ADD COLUMN overage_rate INTEGER;
ALTER TABLE meter_events ADD COLUMN overage_units INTEGER NOT NULL DEFAULT 0 CHECK (overage_units >= 0);
ALTER TABLE meter_events ADD COLUMN cost_cents INTEGER NOT NULL DEFAULT 0 CHECK (cost_cents >= 0);
-- When the flusher gave up on the event (epoch seconds); `last_error` says why.
ALTER TABLE meter_events ADD COLUMN failed_at INTEGER;
-- The running total of one customer's usage period [period_start, period_end), updated in the transaction that
-- inserts each event: the hot path reads one row instead of summing the period's events.
CREATE TABLE meter_usage_totals (
    customer_id TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    period_end INTEGER NOT NULL,
    events INTEGER NOT NULL DEFAULT 0 CHECK (events >= 0),
    raw_units INTEGER NOT NULL DEFAULT 0 CHECK (raw_units >= 0),
    weighted_units INTEGER NOT NULL DEFAULT 0 CHECK (weighted_units >= 0),
    PRIMARY KEY (customer_id, period_start)
) WITHOUT ROWID;
-- The same period by operation type (`custom` for explicit multipliers), added to in the same transaction and never
-- read by the hot path: the current period's summary is these rows.
CREATE TABLE meter_usage_by_operation (
    customer_id TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    operation TEXT NOT NULL,
    events INTEGER NOT NULL DEFAULT 0 CHECK (events >= 0),
    raw_units INTEGER NOT NULL DEFAULT 0 CHECK (raw_units >= 0),
    weighted_units INTEGER NOT NULL DEFAULT 0 CHECK (weighted_units >= 0),
    overage_units INTEGER NOT NULL DEFAULT 0 CHECK (overage_units >= 0),
    cost_cents INTEGER NOT NULL DEFAULT 0 CHECK (cost_cents >= 0),
    PRIMARY KEY (customer_id, period_start, operation)
) WITHOUT ROWID;
-- Events by time alone, not by customer: an index with the customer in its key puts each batch's entries on as many
-- pages as the batch has customers, which made COMMIT five times dearer (bench/metering.py). Per-customer reads use
-- the totals above; a calendar month's summary scans this index.
DROP INDEX meter_events_customer_time;
CREATE INDEX meter_events_time ON meter_events (timestamp);
-- Customers Stripe confirmed to exist, so usage for them never asks Stripe again.
CREATE TABLE meter_customers (
    customer_id TEXT PRIMARY KEY,
    verified_at INTEGER NOT NULL
) WITHOUT ROWID;
-- Concurrency slots: one row per running task; a slot whose expires_at has passed is free.
CREATE TABLE task_slots (
    customer_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    acquired_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (customer_id, task_id)
) WITHOUT ROWID;
-- The flusher's recent runs (the last 100), for operators.
CREATE TABLE meter_flushes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    sent INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    pending_after INTEGER NOT NULL,
    transport TEXT,
    error TEXT
);
