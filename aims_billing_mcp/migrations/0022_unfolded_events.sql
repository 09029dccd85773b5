-- Unfolded events (issue 16, performance; replaces 0021's deltas). A batch of meter events no longer appends a delta
-- row per (customer, period, meter, operation) beside its events: the events themselves are what is not folded yet.
-- `folded_upto` is the newest event id whose usage is in `meter_usage_totals` and `meter_usage_by_operation`. Every
-- counted event of a sum or count meter with a higher id is counted by adding it to its rows (a range of the events'
-- primary key, which the fold keeps short), and the writer folds them (the sums it kept in memory, or one GROUP BY
-- of that range) and moves `folded_upto` on, in one transaction. `last` meters write their totals directly, as
-- before: their events are never added. First the deltas left by 0021 are folded as its writer folded them.
ALTER TABLE meter_usage_version ADD COLUMN folded_upto INTEGER NOT NULL DEFAULT 0;
INSERT INTO meter_usage_by_operation (customer_id, period_start, meter, operation, events, raw_units, weighted_units,
    overage_units, cost_cents)
SELECT customer_id, period_start, meter, operation, SUM(events), SUM(raw_units), SUM(weighted_units),
    SUM(overage_units), SUM(cost_cents) FROM meter_usage_deltas WHERE true
GROUP BY customer_id, period_start, meter, operation
ON CONFLICT (customer_id, period_start, meter, operation) DO UPDATE SET
    events = meter_usage_by_operation.events + excluded.events,
    raw_units = meter_usage_by_operation.raw_units + excluded.raw_units,
    weighted_units = meter_usage_by_operation.weighted_units + excluded.weighted_units,
    overage_units = meter_usage_by_operation.overage_units + excluded.overage_units,
    cost_cents = meter_usage_by_operation.cost_cents + excluded.cost_cents;
UPDATE meter_usage_totals SET events = meter_usage_totals.events + d.events,
    raw_units = meter_usage_totals.raw_units + d.raw_units,
    weighted_units = meter_usage_totals.weighted_units + d.weighted_units
FROM (SELECT customer_id, period_start, meter, SUM(events) AS events, SUM(raw_units) AS raw_units,
    SUM(weighted_units) AS weighted_units FROM meter_usage_deltas GROUP BY customer_id, period_start, meter) AS d
WHERE meter_usage_totals.customer_id = d.customer_id AND meter_usage_totals.period_start = d.period_start
    AND meter_usage_totals.meter = d.meter;
DROP TABLE meter_usage_deltas;
UPDATE meter_usage_version SET version = version + 1, folded_upto = COALESCE((SELECT MAX(id) FROM meter_events), 0);
