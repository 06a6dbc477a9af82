-- Cash-out (issue 12): two-factor secrets, withdrawals, their transitions, payout events, and the
-- key space of host-side diamond movements made in SQL.
--
-- A host's TOTP (RFC 6238) enrolment, one row per user. secret: the active base32 secret (NULL
-- until a code confirms one); pending_secret: enrolled, not confirmed yet (a new enrolment
-- replaces it). The secrets are credentials kept as text in this table, readable by whoever
-- reads the ledger database, like the webhook and token secrets kept in the data dir; the server
-- never logs them and shows one only in the enrolment answer. last_step: the last TOTP time step
-- (unix s / 30) whose code was accepted; a code is accepted only for a later step, so no code is
-- good twice. failures: code checks counted since failures_since_ms (a window of 15 minutes);
-- past settings.totp_max_failures every check is refused until the window ends.
CREATE TABLE IF NOT EXISTS twofactor (
    user_id TEXT PRIMARY KEY,
    secret TEXT,
    pending_secret TEXT,
    last_step BIGINT NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    failures_since_ms BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- A host's request to cash out whole diamonds, keyed by the host's idempotency key. Its diamonds
-- are reserved (host_earnings.reserved_units) from the request until the payout provider says
-- paid (-> paid_units) or failed (back to available). status: pending, paid or failed.
CREATE TABLE IF NOT EXISTS withdrawals (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    diamonds BIGINT NOT NULL CHECK (diamonds > 0),
    amount_cents BIGINT NOT NULL,
    status TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    failure_reason TEXT,
    UNIQUE (host_id, idempotency_key)
);
-- GET /v1/me/withdrawals (newest first, by cursor) and the UTC day's total a request checks.
CREATE INDEX IF NOT EXISTS withdrawals_host_created ON withdrawals (host_id, created_ms, id);

-- Each status a withdrawal reached, once: keyed (withdrawal, status), so no delivery or order of
-- payout events can pay or return a withdrawal twice. ledger_seq: the ledger movement (part -1)
-- that moved its diamonds; event_id: the payout event that made it (NULL for the request).
CREATE TABLE IF NOT EXISTS withdrawal_transitions (
    withdrawal_id TEXT NOT NULL,
    status TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    event_id TEXT,
    ledger_seq BIGINT NOT NULL,
    PRIMARY KEY (withdrawal_id, status)
);

-- Every payout webhook event received with a good signature, keyed by the provider's event id: a
-- redelivery is a duplicate. outcome: applied (it moved the withdrawal on) or ignored (the
-- withdrawal was past it: a late `failed` after `paid`).
CREATE TABLE IF NOT EXISTS payout_events (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    type TEXT NOT NULL,
    withdrawal_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    body TEXT NOT NULL
);

-- The ledger is keyed (part, seq, leg). Movements from the outbox own part >= 0, numbered by
-- their partition's Lua script. A movement of host diamonds made in SQL (a withdrawal's reserve,
-- payout or return) takes part -1, "host side, made in SQL", and its seq from this counter, in
-- the transaction that makes it (server/store/host_ledger.py).
CREATE TABLE IF NOT EXISTS ledger_sequences (
    part INTEGER PRIMARY KEY,
    seq BIGINT NOT NULL
);
INSERT INTO ledger_sequences (part, seq) VALUES (-1, 0)
