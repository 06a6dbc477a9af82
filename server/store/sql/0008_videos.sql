-- Videos (issue 12): a creator's recorded video, which viewers gift over HTTP
-- (POST /v1/videos/{id}/gifts). A video's gifts are ordinary gifts: their movement's room_id is
-- the video's id ("v-..."; a room id never has a hyphen), so they settle, credit the owner and
-- audit as a room's do, and GET /v1/videos/{id}/gifts reads them through gifts_room_sent
-- (0004_creators.sql). The owner's name is read from users, as the rest of the ledger's is.
-- A video is read by its id only: no secondary index (an index comes with the query that needs it).
CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
