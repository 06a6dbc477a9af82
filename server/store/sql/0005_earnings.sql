-- A host's earnings (issue 12): diamonds per UTC day, and the holds a refund or a dispute puts
-- on the diamonds its coins earned.
--
-- GET /v1/me/earnings shows a host's diamonds per day. Summing a host's gifts per request would
-- read every gift of the window (a big host receives millions); settlement adds each batch's
-- gifts to this aggregate instead, one upsert per (host, day) per batch. day is the UTC day of
-- the gift's sent_ms as days since 1970-01-01 (sent_ms / 86400000, integer division on both
-- backends).
CREATE TABLE IF NOT EXISTS host_days (
    host_id TEXT NOT NULL,
    day BIGINT NOT NULL,
    diamond_units BIGINT NOT NULL,
    gifts BIGINT NOT NULL,
    PRIMARY KEY (host_id, day)
);
INSERT INTO host_days (host_id, day, diamond_units, gifts)
    SELECT host_id, sent_ms / 86400000, SUM(diamond_units), COUNT(*) FROM gifts
    GROUP BY host_id, sent_ms / 86400000;

-- The share of one gift held because the coins that paid for it were refunded or disputed
-- (server/store/holds.py says which gifts a refund's coins paid for). Keyed (gift, order, kind):
-- a redelivered refund holds nothing twice, and a refund after a won dispute of the same order
-- may hold again what the dispute released. coins: the gift's coins the order paid for;
-- diamond_units: coins * the gift's share_bp. part, seq: the movement that made the hold.
-- released_ms: when a won dispute (its DISPUTE_REVERSAL movement) gave the diamonds back;
-- NULL while held. host_earnings.held_units is the host's sum of unreleased holds.
CREATE TABLE IF NOT EXISTS gift_holds (
    gift_id TEXT NOT NULL,
    order_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    host_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    seq BIGINT NOT NULL,
    coins BIGINT NOT NULL,
    diamond_units BIGINT NOT NULL,
    held_ms BIGINT NOT NULL,
    released_ms BIGINT,
    PRIMARY KEY (gift_id, order_id, kind)
);
-- A won dispute releases its order's holds.
CREATE INDEX IF NOT EXISTS gift_holds_order ON gift_holds (order_id, kind);
