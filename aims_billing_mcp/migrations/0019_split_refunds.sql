-- Refunds of split sales (issue 17), one row per Stripe refund: a refund is applied to its sale's splits once,
-- whoever records it first (refund_split_sale's answer, Stripe's refund.created webhook, another process).
CREATE TABLE split_refunds (
    refund_id TEXT PRIMARY KEY,  -- re_... (or the sale's own key when Stripe answered no refund)
    payment_intent TEXT NOT NULL,
    amount INTEGER NOT NULL,  -- refunded to the buyer, of the sale's plug lines
    reversed INTEGER NOT NULL,  -- taken back from the creators
    fee_refunded INTEGER NOT NULL,  -- given back by the platform
    request_key TEXT,  -- refund_split_sale's key (the refund's metadata.aims_refund_key): its retry finds it
    created_at TEXT NOT NULL
);
CREATE INDEX split_refunds_request_key ON split_refunds (request_key);
