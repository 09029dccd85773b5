-- PostgreSQL mirror of ../0010_prepaid_subscriptions.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- prepaid tier subscriptions (issue 8, part 1): a paid tier item's fulfilment, written in the transaction that
-- records the payment (an outbox), then carried out against Stripe step by step:
--   pending -> claimed (this row holds the customer's one subscription) -> credited (the customer balance credit)
--   -> subscribed (the subscription) -> started (its end set at the commitment end; the provision recorded)
-- or failed (with last_error; retried by `start-subscriptions --failed`), or refused (the customer already had a
-- subscription: the payment is to be refunded; only retried when named), and either may end refunded
-- (`refund-prepaid`: refunding while the credit is reversed and the payment refunded, then refunded). Each step's result is kept, so a retry after a
-- crash resumes where it stopped.
CREATE TABLE prepaid_subscriptions (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL CHECK (source IN ('payment_session', 'acp')),
    source_id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    payment_intent_id TEXT,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'claimed', 'credited', 'subscribed', 'started', 'failed', 'refused',
                          'refunding', 'refunded')),
    starts_at BIGINT,
    ends_at BIGINT,
    balance_transaction_id TEXT,
    subscription_id TEXT,
    refund_id TEXT,
    refunded_amount BIGINT,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX prepaid_subscriptions_status ON prepaid_subscriptions (status);
CREATE INDEX prepaid_subscriptions_customer ON prepaid_subscriptions (customer_id, status);
