-- Prepaid outbox leases: several instances work one outbox. A worker takes a row until `leased_until` (epoch seconds)
-- under a fresh `lease_token`, renewing it in the transaction of each step it records and before each Stripe call;
-- another worker takes the row only once that time has passed, with a new token. A worker paused past its lease
-- finds its token gone and records nothing, sends nothing more (the token is the fence).
ALTER TABLE prepaid_subscriptions ADD COLUMN lease_token TEXT;
ALTER TABLE prepaid_subscriptions ADD COLUMN leased_until REAL;
