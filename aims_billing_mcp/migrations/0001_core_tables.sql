-- core tables
CREATE TABLE billing_provisions (
    customer_id TEXT PRIMARY KEY,
    tier TEXT NOT NULL DEFAULT 'p2p',
    status TEXT NOT NULL DEFAULT 'none',
    subscription_id TEXT UNIQUE,
    price_id TEXT,
    current_period_end INTEGER,
    commitment_end INTEGER,
    cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
    last_event_id TEXT,
    last_event_created INTEGER,
    updated_at TEXT NOT NULL
);
CREATE TABLE payment_sessions (
    id TEXT PRIMARY KEY,
    customer_id TEXT,
    agent_id TEXT,
    item_id TEXT,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    description TEXT,
    status TEXT NOT NULL,
    payment_intent_id TEXT UNIQUE,
    idempotency_key TEXT UNIQUE,
    last_error TEXT,
    fulfilled_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE x402_receipts (
    id TEXT PRIMARY KEY,
    quote_id TEXT,
    network TEXT NOT NULL,
    asset TEXT NOT NULL,
    payer TEXT NOT NULL,
    pay_to TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    nonce TEXT NOT NULL,
    tx_hash TEXT UNIQUE,
    agent_id TEXT,
    luc_credited INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    UNIQUE (network, asset, payer, nonce)
);
CREATE TABLE agent_wallets (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    balance INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),
    daily_cap INTEGER CHECK (daily_cap IS NULL OR daily_cap > 0),
    frozen INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE agent_transactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    txn_id TEXT NOT NULL,
    entry INTEGER NOT NULL,
    account TEXT NOT NULL,
    wallet_id TEXT REFERENCES agent_wallets (id),
    kind TEXT NOT NULL,
    amount INTEGER NOT NULL,
    balance_after INTEGER,
    idempotency_key TEXT,
    reason TEXT,
    reference TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (txn_id, entry)
);
CREATE TABLE meter_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identifier TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    event_name TEXT NOT NULL,
    operation TEXT,
    raw_units INTEGER NOT NULL CHECK (raw_units >= 0),
    multiplier_milli INTEGER NOT NULL,
    weighted_units INTEGER NOT NULL,
    agent_id TEXT,
    timestamp INTEGER NOT NULL,
    metadata TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE webhook_events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    created INTEGER NOT NULL,
    payload TEXT NOT NULL,
    processed INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    received_at TEXT NOT NULL,
    processed_at TEXT
);
CREATE TABLE idempotency_keys (
    tool TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    request_id TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (tool, key)
);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    tool TEXT NOT NULL,
    caller TEXT,
    arguments TEXT NOT NULL,
    outcome TEXT NOT NULL,
    error_code TEXT,
    duration_ms REAL NOT NULL,
    request_id TEXT
);
