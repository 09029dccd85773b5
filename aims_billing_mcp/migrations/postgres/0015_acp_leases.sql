-- PostgreSQL mirror of ../0015_acp_leases.sql: the same columns, the same number in both histories.
-- ACP outbox leases (issue 15, part 5): a sender takes an order event or a refund due until `leased_until` (epoch
-- seconds) under a fresh token, and records its outcome only under that token (in the same UPDATE): a sender paused
-- past its lease records nothing once another has taken the row over.
ALTER TABLE acp_order_events ADD COLUMN lease_token TEXT;
ALTER TABLE acp_order_events ADD COLUMN leased_until DOUBLE PRECISION;
ALTER TABLE acp_payments ADD COLUMN refund_lease_token TEXT;
ALTER TABLE acp_payments ADD COLUMN refund_leased_until DOUBLE PRECISION;
