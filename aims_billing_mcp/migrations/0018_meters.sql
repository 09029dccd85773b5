-- Meters beyond LUC tokens (issue 16 part 3): every event names its meter (pricing.toml `[meters.<id>]`), and a
-- usage period's running totals and per-operation counters are kept per meter, each with its own allowance and
-- rate. Existing rows are LUC's. `last_at` is the timestamp of the value a `last` meter's total holds (the period's
-- latest event: what Stripe's `last` aggregation bills); sum and count meters leave it NULL. SQLite cannot change
-- a primary key: the two WITHOUT ROWID tables are rebuilt, rows kept.
ALTER TABLE meter_events ADD COLUMN meter TEXT NOT NULL DEFAULT 'luc_tokens';
CREATE TABLE meter_usage_totals_by_meter (
    customer_id TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    meter TEXT NOT NULL DEFAULT 'luc_tokens',
    period_end INTEGER NOT NULL,
    events INTEGER NOT NULL DEFAULT 0 CHECK (events >= 0),
    raw_units INTEGER NOT NULL DEFAULT 0 CHECK (raw_units >= 0),
    weighted_units INTEGER NOT NULL DEFAULT 0 CHECK (weighted_units >= 0),
    tier TEXT,
    allowance INTEGER,
    overage_rate INTEGER,
    invoice_id TEXT,
    invoiced_at INTEGER,
    last_at INTEGER,
    PRIMARY KEY (customer_id, period_start, meter)
) WITHOUT ROWID;
INSERT INTO meter_usage_totals_by_meter (customer_id, period_start, period_end, events, raw_units, weighted_units,
    tier, allowance, overage_rate, invoice_id, invoiced_at)
SELECT customer_id, period_start, period_end, events, raw_units, weighted_units, tier, allowance, overage_rate,
    invoice_id, invoiced_at FROM meter_usage_totals;
DROP TABLE meter_usage_totals;
ALTER TABLE meter_usage_totals_by_meter RENAME TO meter_usage_totals;
CREATE INDEX meter_usage_totals_p2p_open ON meter_usage_totals (period_end) WHERE tier = 'p2p' AND invoiced_at IS NULL;
CREATE TABLE meter_usage_by_operation_by_meter (
    customer_id TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    meter TEXT NOT NULL DEFAULT 'luc_tokens',
    operation TEXT NOT NULL,
    events INTEGER NOT NULL DEFAULT 0 CHECK (events >= 0),
    raw_units INTEGER NOT NULL DEFAULT 0 CHECK (raw_units >= 0),
    weighted_units INTEGER NOT NULL DEFAULT 0 CHECK (weighted_units >= 0),
    overage_units INTEGER NOT NULL DEFAULT 0 CHECK (overage_units >= 0),
    cost_cents INTEGER NOT NULL DEFAULT 0 CHECK (cost_cents >= 0),
    PRIMARY KEY (customer_id, period_start, meter, operation)
) WITHOUT ROWID;
INSERT INTO meter_usage_by_operation_by_meter (customer_id, period_start, operation, events, raw_units,
    weighted_units, overage_units, cost_cents)
SELECT customer_id, period_start, operation, events, raw_units, weighted_units, overage_units, cost_cents
FROM meter_usage_by_operation;
DROP TABLE meter_usage_by_operation;
ALTER TABLE meter_usage_by_operation_by_meter RENAME TO meter_usage_by_operation;
