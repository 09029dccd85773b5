-- Usage deltas (issue 16, performance): a batch of meter events no longer reads and rewrites its periods' running
-- totals and per-operation counters row by row. It appends what it adds, one row per (customer, period, meter,
-- operation), to `meter_usage_deltas`, in the transaction that inserts its events; the writer folds the deltas into
-- `meter_usage_totals` and `meter_usage_by_operation` once they are many (one aggregated upsert, then DELETE, in one
-- transaction), and every read adds the deltas not folded yet. So a period's counted usage is always its totals row
-- plus its deltas, each acknowledged event in exactly one of them. No index: the table stays small (the fold empties
-- it) and an append to the end of one b-tree is the cheapest write there is. `last` meters (a value, not a sum)
-- keep writing their totals directly and never have deltas.
CREATE TABLE meter_usage_deltas (
    customer_id TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    meter TEXT NOT NULL,
    operation TEXT NOT NULL,
    events INTEGER NOT NULL,
    raw_units INTEGER NOT NULL,
    weighted_units INTEGER NOT NULL,
    overage_units INTEGER NOT NULL,
    cost_cents INTEGER NOT NULL
);
-- Bumped by every transaction that appends deltas: the writer keeps the totals it wrote in memory and trusts them
-- only while this number (and SQLite's data_version: no other connection committed) is what it left, so a rolled
-- back transaction or another process's write makes it read the totals again.
CREATE TABLE meter_usage_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO meter_usage_version (id, version) VALUES (1, 0);
