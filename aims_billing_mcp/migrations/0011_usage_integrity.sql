-- Usage integrity (issue 18 items 2-5 and 8, issue 12 item 2).
-- A task slot belongs to whoever took it: the SHA-256 of the lease `acquire_task_slot` answered with. Renewing or
-- releasing the slot needs the lease; slots taken before this migration have none and free themselves on expiry.
ALTER TABLE task_slots ADD COLUMN lease_hash TEXT;
