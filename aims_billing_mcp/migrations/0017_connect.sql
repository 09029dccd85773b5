-- Stripe Connect marketplace splits (issue 17): creators' connected accounts, plugs (a price sold for a creator,
-- with the creator's share), and one split row per sale of a plug (what the creator gets, what the platform keeps,
-- the Stripe ids that moved it, and what refunds took back).
CREATE TABLE connected_accounts (
    account_id TEXT PRIMARY KEY,  -- acct_... (Accounts v2)
    email TEXT,
    display_name TEXT NOT NULL,
    country TEXT NOT NULL,  -- ISO 3166-1 alpha-2, upper case
    currency TEXT NOT NULL,  -- what the account receives transfers in
    status TEXT NOT NULL,  -- store/connect.py AccountStatus: onboarding, active, restricted
    requirements_due TEXT NOT NULL DEFAULT '[]',  -- JSON list of what Stripe still requires
    last_event_created INTEGER,  -- the newest account event applied: an older one arriving late changes nothing
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE plugs (
    plug_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    product_id TEXT NOT NULL,
    price_id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL REFERENCES connected_accounts (account_id),
    currency TEXT NOT NULL,
    unit_amount INTEGER NOT NULL CHECK (unit_amount > 0),
    share_bp INTEGER CHECK (share_bp BETWEEN 0 AND 10000),  -- the creator's share of each sale, in basis points
    platform_fee INTEGER CHECK (platform_fee >= 0 AND platform_fee <= unit_amount),  -- or the platform's fixed fee
    created_at TEXT NOT NULL,
    CHECK ((share_bp IS NULL) <> (platform_fee IS NULL))
);
CREATE TABLE splits (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,  -- how it was sold: checkout, payment_link, payment_session, acp, x402
    sale_ref TEXT NOT NULL,  -- the sale on that path: cs_..., plink_..., the payment session, the x402 receipt
    plug_id TEXT NOT NULL REFERENCES plugs (plug_id),
    account_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    gross INTEGER NOT NULL,  -- what the buyer pays for the sale
    platform_fee INTEGER NOT NULL,  -- what the platform keeps (the application fee)
    creator_amount INTEGER NOT NULL,  -- gross - platform_fee
    status TEXT NOT NULL,  -- store/connect.py SplitStatus
    payment_intent TEXT,
    transfer_id TEXT,
    transfer_group TEXT,
    reversed INTEGER NOT NULL DEFAULT 0,  -- of creator_amount, taken back by refunds
    fee_refunded INTEGER NOT NULL DEFAULT 0,  -- of platform_fee, given back by refunds
    refunded INTEGER NOT NULL DEFAULT 0,  -- of gross, refunded to the buyer
    note TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (path, sale_ref, plug_id),
    CHECK (creator_amount + platform_fee = gross)
);
CREATE INDEX splits_account ON splits (account_id, created_at);
CREATE INDEX splits_payment_intent ON splits (payment_intent);
