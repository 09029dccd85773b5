-- PostgreSQL mirror of ../0019_split_refunds.sql (money BIGINT).
CREATE TABLE split_refunds (
    refund_id TEXT PRIMARY KEY,  -- re_... (or the sale's own key when Stripe answered no refund)
    payment_intent TEXT NOT NULL,
    amount BIGINT NOT NULL,  -- refunded to the buyer, of the sale's plug lines
    reversed BIGINT NOT NULL,  -- taken back from the creators
    fee_refunded BIGINT NOT NULL,  -- given back by the platform
    request_key TEXT,  -- refund_split_sale's key (the refund's metadata.aims_refund_key): its retry finds it
    created_at TEXT NOT NULL
);
CREATE INDEX split_refunds_request_key ON split_refunds (request_key);
