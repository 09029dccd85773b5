-- PostgreSQL mirror of ../0011_commerce_money.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- agentic commerce money paths (issue 12): a confirm in flight is marked before Stripe is asked, so a start-up
-- after a crash re-reads exactly those PaymentIntents; an ACP completion claims its checkout before charging
-- (no cancel or update while it runs); every payment an ACP checkout made is kept with the lines it was made for
-- (delivery is computed from what was paid), and one that cannot be delivered is refunded in full (an outbox).
ALTER TABLE payment_sessions ADD COLUMN confirming_since TEXT;
-- a refund-prepaid run holds its row while it reverses and refunds (a second run never reads a half-done reversal)
ALTER TABLE prepaid_subscriptions ADD COLUMN refund_claimed_at DOUBLE PRECISION;
ALTER TABLE acp_checkout_sessions ADD COLUMN completing_since DOUBLE PRECISION;
CREATE TABLE acp_payments (
    payment_session_id TEXT PRIMARY KEY,
    checkout_session_id TEXT NOT NULL,
    lines TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    refund_status TEXT CHECK (refund_status IN ('due', 'succeeded')),
    refund_id TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX acp_payments_checkout ON acp_payments (checkout_session_id);
CREATE INDEX acp_payments_refund ON acp_payments (refund_status);
