-- payment sessions (issue 8): what the PaymentIntent last said, and what fulfilment did
ALTER TABLE payment_sessions ADD COLUMN amount_received INTEGER NOT NULL DEFAULT 0;
ALTER TABLE payment_sessions ADD COLUMN fulfilment TEXT;
CREATE INDEX payment_sessions_agent ON payment_sessions (agent_id, created_at);
