-- Meters beyond LUC tokens (issue 16 part 3): every event names its meter, and a usage period's running totals and
-- per-operation counters are kept per meter (existing rows are LUC's). `last_at`: the timestamp of the value a
-- `last` meter's total holds. See the SQLite migration of the same number.
ALTER TABLE meter_events ADD COLUMN meter TEXT NOT NULL DEFAULT 'luc_tokens';
ALTER TABLE meter_usage_totals ADD COLUMN meter TEXT NOT NULL DEFAULT 'luc_tokens';
ALTER TABLE meter_usage_totals ADD COLUMN last_at BIGINT;
ALTER TABLE meter_usage_totals DROP CONSTRAINT meter_usage_totals_pkey;
ALTER TABLE meter_usage_totals ADD PRIMARY KEY (customer_id, period_start, meter);
ALTER TABLE meter_usage_by_operation ADD COLUMN meter TEXT NOT NULL DEFAULT 'luc_tokens';
ALTER TABLE meter_usage_by_operation DROP CONSTRAINT meter_usage_by_operation_pkey;
ALTER TABLE meter_usage_by_operation ADD PRIMARY KEY (customer_id, period_start, meter, operation);
