-- Room lifecycle and session summaries (issue 12, server/rooms/lifecycle.py).
--
-- A host has one live room at a time. Before this migration nothing stopped a host opening
-- several, so a host's older live rooms are ended first, each at the start of the host's next
-- room (the moment it stopped being the host's LIVE), with the reason 'superseded'. The newest
-- live room of each host stays live. The test is "a newer room of the same host exists", which
-- reads the same whatever order the rows are updated in (SQLite sees its own updates, PostgreSQL
-- does not): the newest room is never touched.
ALTER TABLE rooms ADD COLUMN end_reason TEXT;

UPDATE rooms SET end_reason = 'superseded',
    ended_ms = (SELECT MIN(n.created_ms) FROM rooms n WHERE n.host_id = rooms.host_id
                AND (n.created_ms > rooms.created_ms OR (n.created_ms = rooms.created_ms AND n.id > rooms.id)))
WHERE ended_ms IS NULL AND EXISTS (
    SELECT 1 FROM rooms n WHERE n.host_id = rooms.host_id AND n.ended_ms IS NULL
    AND (n.created_ms > rooms.created_ms OR (n.created_ms = rooms.created_ms AND n.id > rooms.id)));

-- One live room per host, held by the database itself: of ten concurrent POST /v1/rooms by one
-- host exactly one row goes in, on any number of gateways.
CREATE UNIQUE INDEX IF NOT EXISTS rooms_one_live ON rooms (host_id) WHERE ended_ms IS NULL;
-- The LIVE-now list (newest first) and the idle sweep (oldest first) read live rooms only, in
-- start order; the recently-ended list reads ended rooms in end order. Both partial, so each
-- stays the size of what it lists.
CREATE INDEX IF NOT EXISTS rooms_live ON rooms (created_ms, id) WHERE ended_ms IS NULL;
CREATE INDEX IF NOT EXISTS rooms_ended ON rooms (ended_ms, id) WHERE ended_ms IS NOT NULL;

-- The session's figures that only Redis knew, kept when the room ends: the most viewers it had
-- at once, whether its LIVE goal was reached (0/1), and the gifts and coins the room
-- acknowledged (room state gifts_total / coins_total), which the settled ledger must reach for
-- the summary to be complete. NULL for rooms ended before this migration.
ALTER TABLE rooms ADD COLUMN peak_viewers BIGINT;
ALTER TABLE rooms ADD COLUMN goal_reached INTEGER;
ALTER TABLE rooms ADD COLUMN acked_gifts BIGINT;
ALTER TABLE rooms ADD COLUMN acked_coins BIGINT
