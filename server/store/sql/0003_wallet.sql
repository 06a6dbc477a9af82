-- The coin economy (issue 11): reward points beside coins, and a user's statement.
--
-- Keyed movements (refunds, disputes, reversals, rewards, adjustments, check-ins, points grants)
-- carry a signed points change beside their signed coin change; gifts and credits carry none.
ALTER TABLE movements ADD COLUMN points BIGINT NOT NULL DEFAULT 0;

-- GET /v1/wallet/transactions reads one user's movements newest first, a page at a time after a
-- cursor: a user's movements all share one partition, so their sequence number orders them
-- (WHERE user_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?). The one index settlement pays for:
-- a B-tree insert per movement on a random key (see 0001_init.sql for what five of them cost).
CREATE INDEX IF NOT EXISTS movements_user_seq ON movements (user_id, seq);
