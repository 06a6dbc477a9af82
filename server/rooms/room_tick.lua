-- room_tick.lua: refresh this node's viewer count for a room, return the room's viewers and
-- its top gifters, in one call per room per presence interval; with no node id, only read
-- them (GET /v1/rooms/{id}, resume_failed). All keys share {r:<room_id>}.
-- KEYS[1] presence hash (node id -> "<count>:<expires ms>")
-- KEYS[2] session leaderboard zset (user -> coins)   KEYS[3] display names (user -> name)
-- KEYS[4] room event stream
-- KEYS[5], KEYS[6] this and the previous minute's published-gift records (room_publish.lua)
-- ARGV[1] node id, or "" to write nothing   ARGV[2] "<count>:<expires ms>", or "" to withdraw
-- ARGV[3] now ms   ARGV[4] how many top gifters (0: none)   ARGV[5] oldest stream id to keep (ms)
-- ARGV[6] the record's lifetime ms
-- LIVE goal (a tick that writes only): KEYS[7] room state hash   ARGV[7] pub/sub channel
-- ARGV[8] stream max length   ARGV[9] goal event interval ms
-- Sessions (a tick that writes only; KEYS[7] as above): ARGV[10] "1" when this node has a socket
-- of the room's host in the room, else ""   ARGV[11] how old host_seen may get before it is rewritten (ms)
-- Returns {viewers, {user, coins, name, user, coins, name, ...}}.
-- The event stream is trimmed by age here, once per tick, rather than on every publish, and its
-- newest event is always kept: an emptied stream would make `welcome` offsets "0-0" and hide
-- from a resume that events were trimmed after its `since`. The
-- published-gift records of this minute and the last get their expiry here when they have none
-- (the previous one too: its last gifts may have come after its last tick).
if ARGV[1] == '' then
  -- read only
elseif ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  local minid = ARGV[5]
  local newest = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1]
  if newest and tonumber(string.match(newest[1], '^(%d+)')) < tonumber(minid) then minid = newest[1] end
  redis.call('XTRIM', KEYS[4], 'MINID', '~', minid)
  for i = 5, 6 do
    if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
  end
end
local now = tonumber(ARGV[3])
-- LIVE goal: a progress that room_publish.lua held back (its last goal event was younger than the
-- interval) goes out here once the interval has passed, so the last gifts of a burst are shown.
-- One HMGET per room a second; several nodes ticking the room emit it once (goal_event_ms).
if KEYS[7] and ARGV[1] ~= '' and ARGV[2] ~= '' then
  local g = redis.call('HMGET', KEYS[7], 'goal_target', 'goal_done', 'goal_progress', 'goal_sent',
    'goal_event_ms', 'goal_gift', 'goal_id')
  if g[1] and g[2] ~= '1' and g[3] ~= g[4] and now >= tonumber(g[5] or '0') + tonumber(ARGV[9]) then
    local event = {type = 'goal', goal_id = g[7], target = tonumber(g[1]), progress = tonumber(g[3] or '0'),
      done = false, ts = now}
    if (g[6] or '') ~= '' then event.gift = g[6] end
    redis.call('HSET', KEYS[7], 'goal_event_ms', ARGV[3], 'goal_sent', g[3] or '0')
    local payload = cmsgpack.pack(event)
    local offset = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'e', payload, 'c', 0)
    redis.call('PUBLISH', ARGV[7], offset .. '|0|' .. payload)
  end
end
local viewers = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 2, #entries, 2 do
  local count, expires = string.match(entries[i], '^(%d+):(%d+)$')
  if expires and tonumber(expires) >= now then viewers = viewers + tonumber(count) end
end
-- Sessions (rooms/lifecycle.py): the most viewers the room had at once (its summary's
-- peak_viewers), and when a node last had the host's socket in it (the idle end), kept in the
-- state of a live room only. One HMGET per room a tick; a write only when the peak grows or
-- host_seen is ARGV[11] old, not an AOF record per room a second.
if KEYS[7] and ARGV[1] ~= '' and ARGV[10] then
  local s = redis.call('HMGET', KEYS[7], 'live', 'peak_viewers', 'host_seen')
  if s[1] == '1' then
    if viewers > tonumber(s[2] or '0') then redis.call('HSET', KEYS[7], 'peak_viewers', viewers) end
    if ARGV[10] == '1' and now >= tonumber(s[3] or '0') + tonumber(ARGV[11]) then
      redis.call('HSET', KEYS[7], 'host_seen', ARGV[3])
    end
  end
end
local top = {}
local n = tonumber(ARGV[4])
if n > 0 then
  local ranked = redis.call('ZREVRANGE', KEYS[2], 0, n - 1, 'WITHSCORES')
  for i = 1, #ranked, 2 do
    top[#top + 1] = ranked[i]
    top[#top + 1] = ranked[i + 1]
    top[#top + 1] = redis.call('HGET', KEYS[3], ranked[i]) or ranked[i]
  end
end
return {viewers, top}
