-- The creator side (issue 12): what a host's diamonds are doing.
--
-- host_earnings.diamond_units is a host's lifetime share of settled gifts (units of 1/10000
-- diamond). It splits four ways, exactly, per host (`giftstream audit` checks it):
--   lifetime = available + held + reserved + paid
-- held:     shares of gifts whose coins were refunded or are under dispute (gift_holds);
-- reserved: diamonds of withdrawals asked for and not yet paid or failed (withdrawals);
-- paid:     diamonds of paid withdrawals.
-- available is what is left; a hold on diamonds already paid out can make it negative (the host
-- owes them back from later earnings, and cannot withdraw until it is positive again).
ALTER TABLE host_earnings ADD COLUMN held_units BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host_earnings ADD COLUMN reserved_units BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host_earnings ADD COLUMN paid_units BIGINT NOT NULL DEFAULT 0;

-- GET /v1/me/gifts lists a host's received gifts newest first, and a room's (or a video's)
-- session summary and gift list read its gifts. Both arrive in time order per key, so each insert
-- lands at the right edge of its key's range, not on a random page (0001_init.sql says what
-- random-key indexes cost settlement).
CREATE INDEX IF NOT EXISTS gifts_host_sent ON gifts (host_id, sent_ms, id);
CREATE INDEX IF NOT EXISTS gifts_room_sent ON gifts (room_id, sent_ms, id);
