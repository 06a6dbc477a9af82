-- Giftstream durable ledger, version 1. Portable across SQLite and PostgreSQL.
-- Every time is integer milliseconds since the Unix epoch (BIGINT), never float seconds: a
-- redelivered movement is compared column by column with the settled one.
--
-- Settlement writes every gift as a movement, a gift and four ledger rows, so the settled
-- tables carry no secondary index. Each one on a random key (user, host, room, account) adds a
-- B-tree insert on a page of its own per gift, and a batch dirties more of those pages the larger
-- the ledger grows. With five of them (movements.user_id, gifts.host_id, gifts.room_id,
-- gifts.sender_id, ledger.account), a settlement batch of 1,000 gifts took 12 ms (SQLite, CPU)
-- on an empty ledger and 60 ms at 270,000 gifts, 27 ms rising to 36 ms at 300,000 on PostgreSQL
-- (wall); without them, 9-11 ms and 17-18 ms, flat. No query read them. An index comes with the
-- query that needs it (a host's session summary, a user's statement).
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_ms BIGINT NOT NULL
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
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS orders_status ON orders (status);

CREATE TABLE IF NOT EXISTS rooms (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    ended_ms BIGINT
);
CREATE INDEX IF NOT EXISTS rooms_host ON rooms (host_id);

-- Every coin movement made in Redis, keyed by its partition sequence number; kind is
-- server.movement.Kind's value, ref the gift id or the credited order's id.
CREATE TABLE IF NOT EXISTS movements (
    part INTEGER NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    user_id TEXT NOT NULL,
    coins BIGINT NOT NULL,
    ref TEXT NOT NULL,
    ts_ms BIGINT NOT NULL,
    PRIMARY KEY (part, seq)
);

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
    sent_ms BIGINT NOT NULL,
    settled_ms BIGINT NOT NULL
);

-- Double entry: the entries of one movement sum to zero per unit (`giftstream audit` checks it
-- per movement).
CREATE TABLE IF NOT EXISTS ledger (
    part INTEGER NOT NULL,
    seq BIGINT NOT NULL,
    leg INTEGER NOT NULL,
    account TEXT NOT NULL,
    unit TEXT NOT NULL,
    delta BIGINT NOT NULL,
    PRIMARY KEY (part, seq, leg)
);

-- Diamonds in units of 1/10000, so no host share is ever rounded away.
CREATE TABLE IF NOT EXISTS host_earnings (
    host_id TEXT PRIMARY KEY,
    diamond_units BIGINT NOT NULL,
    gifts_received BIGINT NOT NULL
);
