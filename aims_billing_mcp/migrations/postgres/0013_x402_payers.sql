-- PostgreSQL mirror of ../0013_x402_payers.sql: the same tables, columns, keys and UNIQUE constraints (money and
-- counters BIGINT: SQLite's INTEGER is 64-bit, PostgreSQL's is 32), the same number in both histories.
-- x402 payer registration: the addresses an agent wallet pays from, each proven by the address's own signature.
-- A wallet with registered payers accepts payments for its quotes only from them, and a registered address pays only
-- its wallets' quotes: an intercepted payment header cannot be redirected to another wallet's quote.
CREATE TABLE x402_payers (
    address TEXT NOT NULL,  -- lowercase 0x address
    agent_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (address, agent_id)
);
CREATE INDEX x402_payers_agent ON x402_payers (agent_id);
