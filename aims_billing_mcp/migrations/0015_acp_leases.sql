-- ACP outbox leases (issue 15, part 5): several instances work the order-webhook outbox and the refunds due of one
-- database. A sender takes a row until `leased_until` (epoch seconds) under a fresh token; another takes it only
-- once that time has passed, under a new token, and an outcome is recorded only under the token it was taken with
-- (in the same UPDATE): a sender paused past its lease finds its token gone and records nothing.
ALTER TABLE acp_order_events ADD COLUMN lease_token TEXT;
ALTER TABLE acp_order_events ADD COLUMN leased_until REAL;
ALTER TABLE acp_payments ADD COLUMN refund_lease_token TEXT;
ALTER TABLE acp_payments ADD COLUMN refund_leased_until REAL;
