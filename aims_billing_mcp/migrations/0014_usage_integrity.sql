-- Usage integrity (issue 18 items 2-5 and 8, issue 12 item 2).
-- A task slot belongs to whoever took it: the SHA-256 of the lease `acquire_task_slot` answered with. Renewing or
-- releasing the slot needs the lease; slots taken before this migration have none and free themselves on expiry.
ALTER TABLE task_slots ADD COLUMN lease_hash TEXT;
-- A meter event identifier is scoped to its customer: UNIQUE (identifier, customer_id), so one customer's identifier
-- never blocks or replays another's (the identifier first in the key: an index led by the customer scatters each
-- commit's entries, see 0005). Stripe deduplicates identifiers across the whole account, so each event carries the
-- identifier it is sent to Stripe under (`stripe_identifier`, unique per customer and identifier); events recorded
-- before this migration keep the identifier they were (or will be) sent with. SQLite cannot drop a column's UNIQUE:
-- the table is rebuilt, ids kept.
CREATE TABLE meter_events_scoped (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identifier TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    event_name TEXT NOT NULL,
    operation TEXT,
    raw_units INTEGER NOT NULL CHECK (raw_units >= 0),
    multiplier_milli INTEGER NOT NULL,
    weighted_units INTEGER NOT NULL,
    agent_id TEXT,
    timestamp INTEGER NOT NULL,
    metadata TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at TEXT,
    created_at TEXT NOT NULL,
    tier TEXT,
    period_start INTEGER,
    period_end INTEGER,
    period_units_after INTEGER,
    allowance INTEGER,
    overage_rate INTEGER,
    overage_units INTEGER NOT NULL DEFAULT 0 CHECK (overage_units >= 0),
    cost_cents INTEGER NOT NULL DEFAULT 0 CHECK (cost_cents >= 0),
    failed_at INTEGER,
    stripe_identifier TEXT NOT NULL,
    UNIQUE (identifier, customer_id)
);
INSERT INTO meter_events_scoped (id, identifier, customer_id, event_name, operation, raw_units, multiplier_milli,
    weighted_units, agent_id, timestamp, metadata, status, attempts, last_error, sent_at, created_at, tier,
    period_start, period_end, period_units_after, allowance, overage_rate, overage_units, cost_cents, failed_at,
    stripe_identifier)
SELECT id, identifier, customer_id, event_name, operation, raw_units, multiplier_milli, weighted_units, agent_id,
    timestamp, metadata, status, attempts, last_error, sent_at, created_at, tier, period_start, period_end,
    period_units_after, allowance, overage_rate, overage_units, cost_cents, failed_at, identifier
FROM meter_events;
DROP TABLE meter_events;
ALTER TABLE meter_events_scoped RENAME TO meter_events;
CREATE INDEX meter_events_pending ON meter_events (status, id);
CREATE INDEX meter_events_time ON meter_events (timestamp);
-- The subscription's current period start and when it ended, so a meter event's period is the subscription period
-- that contains its timestamp (a 9mo trial is one period of three months, not the last month of it).
ALTER TABLE billing_provisions ADD COLUMN current_period_start INTEGER;
ALTER TABLE billing_provisions ADD COLUMN ended_at INTEGER;
-- A usage period's terms, fixed when its first event is recorded (the tier at the period's start, its allowance and
-- rate; a trial's rate is 0), and, for a P2P period, the invoice that billed it.
ALTER TABLE meter_usage_totals ADD COLUMN tier TEXT;
ALTER TABLE meter_usage_totals ADD COLUMN allowance INTEGER;
ALTER TABLE meter_usage_totals ADD COLUMN overage_rate INTEGER;
ALTER TABLE meter_usage_totals ADD COLUMN invoice_id TEXT;
ALTER TABLE meter_usage_totals ADD COLUMN invoiced_at INTEGER;
-- P2P periods waiting for their invoice once they end (few rows: the partial index stays small).
CREATE INDEX meter_usage_totals_p2p_open ON meter_usage_totals (period_end) WHERE tier = 'p2p' AND invoiced_at IS NULL;
