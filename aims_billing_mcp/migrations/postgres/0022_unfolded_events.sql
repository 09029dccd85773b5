-- Unfolded events (issue 16, performance): see the SQLite migration of the same number. The PostgreSQL store counts
-- every event in its totals and counters in the transaction that inserts it, so no event is ever unfolded:
-- `folded_upto` is the largest id there is, and the shared reads' `id > folded_upto` finds no event (an empty range
-- of the primary key). Its deltas table was always empty.
ALTER TABLE meter_usage_version ADD COLUMN folded_upto BIGINT NOT NULL DEFAULT 9223372036854775807;
DROP TABLE meter_usage_deltas;
