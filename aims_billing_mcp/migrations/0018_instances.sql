-- The x402 challenge-token key (services/x402.py): one row, shared by every process and instance on this database
-- (a challenge signed by one is verified by another). Made on first use by INSERT ... ON CONFLICT DO NOTHING and
-- read back, so instances starting at once agree on the first one written; a key file an older release kept beside
-- the SQLite database is imported as that first key, so challenges it signed stay payable. Never printed.
CREATE TABLE x402_quote_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    key TEXT NOT NULL,  -- 32 random bytes, hex
    created_at TEXT NOT NULL
);
-- Prepaid outbox leases: several instances work one outbox. A worker takes a row until `leased_until` (epoch seconds)
-- under a fresh `lease_token`, renewing it in the transaction of each step it records and before each Stripe call;
-- another worker takes the row only once that time has passed, with a new token. A worker paused past its lease
-- finds its token gone and records nothing, sends nothing more (the token is the fence).
ALTER TABLE prepaid_subscriptions ADD COLUMN lease_token TEXT;
ALTER TABLE prepaid_subscriptions ADD COLUMN leased_until REAL;
