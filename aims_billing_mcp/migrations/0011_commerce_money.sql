-- agentic commerce money paths (issue 12): a confirm in flight is marked before Stripe is asked, so a start-up
-- after a crash re-reads exactly those PaymentIntents; an ACP completion claims its checkout before charging
-- (no cancel or update while it runs); every payment an ACP checkout made is kept with the lines it was made for
-- (delivery is computed from what was paid), and one that cannot be delivered is refunded in full (an outbox).
ALTER TABLE payment_sessions ADD COLUMN confirming_since TEXT;
-- a refund-prepaid run holds its row while it reverses and refunds (a second run never reads a half-done reversal)
ALTER TABLE prepaid_subscriptions ADD COLUMN refund_claimed_at REAL;
ALTER TABLE acp_checkout_sessions ADD COLUMN completing_since REAL;
CREATE TABLE acp_payments (
    payment_session_id TEXT PRIMARY KEY,
    checkout_session_id TEXT NOT NULL,
    lines TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    refund_status TEXT CHECK (refund_status IN ('due', 'succeeded')),
    refund_id TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX acp_payments_checkout ON acp_payments (checkout_session_id);
CREATE INDEX acp_payments_refund ON acp_payments (refund_status);
