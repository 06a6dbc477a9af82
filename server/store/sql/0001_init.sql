-- Giftstream durable ledger, version 1. Portable across SQLite and PostgreSQL.
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    package_id TEXT NOT NULL,
    coins BIGINT NOT NULL CHECK (coins > 0),
    price_cents BIGINT NOT NULL,
    currency TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS orders_status ON orders (status);

CREATE TABLE IF NOT EXISTS rooms (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS rooms_host ON rooms (host_id);

-- Every coin movement made in Redis, keyed by its partition sequence number.
CREATE TABLE IF NOT EXISTS movements (
    part INTEGER NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    user_id TEXT NOT NULL,
    coins BIGINT NOT NULL,
    ref TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (part, seq)
);
CREATE INDEX IF NOT EXISTS movements_user ON movements (user_id);

CREATE TABLE IF NOT EXISTS gifts (
    id TEXT PRIMARY KEY,
    part INTEGER NOT NULL,
    seq BIGINT NOT NULL,
    sender_id TEXT NOT NULL,
    sender_name TEXT NOT NULL,
    host_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    gift TEXT NOT NULL,
    count INTEGER NOT NULL,
    coins BIGINT NOT NULL,
    share_bp INTEGER NOT NULL,
    diamond_units BIGINT NOT NULL,
    client_id TEXT NOT NULL,
    sent_at DOUBLE PRECISION NOT NULL,
    settled_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS gifts_host ON gifts (host_id);
CREATE INDEX IF NOT EXISTS gifts_room ON gifts (room_id);
CREATE INDEX IF NOT EXISTS gifts_sender ON gifts (sender_id);

-- Double entry: the entries of one movement sum to zero per unit.
CREATE TABLE IF NOT EXISTS ledger (
    part INTEGER NOT NULL,
    seq BIGINT NOT NULL,
    leg INTEGER NOT NULL,
    account TEXT NOT NULL,
    unit TEXT NOT NULL,
    delta BIGINT NOT NULL,
    PRIMARY KEY (part, seq, leg)
);
CREATE INDEX IF NOT EXISTS ledger_account ON ledger (account);

-- Diamonds in units of 1/10000, so no host share is ever rounded away.
CREATE TABLE IF NOT EXISTS host_earnings (
    host_id TEXT PRIMARY KEY,
    diamond_units BIGINT NOT NULL,
    gifts_received BIGINT NOT NULL
);
