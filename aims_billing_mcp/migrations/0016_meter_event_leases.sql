-- Meter event leases (issue 15 part 5): a flusher sharing the database with other instances leases the pending
-- events it is about to send (`lease_owner`: the instance; `lease_until`: the database clock in epoch milliseconds),
-- so each is sent by one instance at a time; an expired lease may be taken over, and only the lease's owner may mark
-- the events afterwards. The SQLite backend (one instance) leaves both NULL.
ALTER TABLE meter_events ADD COLUMN lease_owner TEXT;
ALTER TABLE meter_events ADD COLUMN lease_until INTEGER;
