-- room_publish.lua: append an event to a room's capped stream and publish it.
-- All keys share the room tag {r:<room_id>}.
-- KEYS[1] room state hash (host, live, epoch, coins_total, ...)   KEYS[2] room event stream
-- KEYS[3] session leaderboard zset (user -> coins)   KEYS[4] combo hash ("<user>:<gift>" -> "<n>:<ms>")
-- KEYS[5] display names of gifters (user -> name)
-- KEYS[6] gifts published in the minute of the gift's debit (gift id -> "<offset>|<combo>")
-- ARGV[1] kind (gift|ended)   ARGV[2] event payload (msgpack, without offset and combo)
-- ARGV[3] now ms   ARGV[4] stream max length   ARGV[5] oldest id to keep (ms)
-- ARGV[6] combo field   ARGV[7] combo window ms   ARGV[8] sender id   ARGV[9] coins
-- ARGV[10] pub/sub channel   ARGV[11] sender name
-- ARGV[12] gift id   ARGV[13] the gift's debit ms   ARGV[14] republish window ms
-- Returns {offset, combo, 0} when published, {offset, combo, 1} when this gift was published
-- before (nothing is written), {false, 0, 0} when the room is unknown (or, for 'ended', has
-- ended already), and
-- {false, 0, 2} when the gift was debited longer than the window ago (it cannot be told
-- apart from a gift already published whose record expired: it is not published).
-- The published message is "<offset>|<combo>|<payload>".
--
-- A gift is published once however often it is asked: after a gateway died between the debit
-- and this call, the sender's retry (same client id, replayed debit) publishes it, and a
-- publish retried after a Redis error cannot show it twice or count it twice.
if redis.call('EXISTS', KEYS[1]) == 0 then return {false, 0, 0} end
local now = tonumber(ARGV[3])
local combo = 0
if ARGV[1] == 'gift' then
  if tonumber(ARGV[13]) < now - tonumber(ARGV[14]) then return {false, 0, 2} end
  local before = redis.call('HGET', KEYS[6], ARGV[12])
  if before then
    local offset, n = string.match(before, '^(.-)|(.-)$')
    return {offset, tonumber(n), 1}
  end
  local prev = redis.call('HGET', KEYS[4], ARGV[6])
  combo = 1
  if prev then
    local n, at = string.match(prev, '^(%d+):(%d+)$')
    if tonumber(at) >= now - tonumber(ARGV[7]) then combo = tonumber(n) + 1 end
  end
  redis.call('HSET', KEYS[4], ARGV[6], combo .. ':' .. now)
  -- Writes reach the AOF: refresh the combos' expiry only once it is below two windows, and a
  -- sender's display name only when it changed. Either way a streak outlives its window.
  if redis.call('PTTL', KEYS[4]) < tonumber(ARGV[7]) * 2 then
    redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[7]) * 4)
  end
  redis.call('ZINCRBY', KEYS[3], ARGV[9], ARGV[8])
  if redis.call('HGET', KEYS[5], ARGV[8]) ~= ARGV[11] then
    redis.call('HSET', KEYS[5], ARGV[8], ARGV[11])
  end
  -- One HSET for both totals: each write is a command in the AOF.
  local totals = redis.call('HMGET', KEYS[1], 'coins_total', 'gifts_total')
  redis.call('HSET', KEYS[1], 'coins_total', string.format('%d', tonumber(totals[1] or '0') + tonumber(ARGV[9])),
    'gifts_total', string.format('%d', tonumber(totals[2] or '0') + 1))
elseif ARGV[1] == 'ended' then
  if redis.call('HGET', KEYS[1], 'live') == '0' then return {false, 0, 0} end
  redis.call('HSET', KEYS[1], 'live', '0', 'ended_at', ARGV[3])
end
local offset = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[2], 'c', combo)
redis.call('XTRIM', KEYS[2], 'MINID', '~', ARGV[5])
redis.call('PUBLISH', ARGV[10], offset .. '|' .. combo .. '|' .. ARGV[2])
if ARGV[1] == 'gift' then
  redis.call('HSET', KEYS[6], ARGV[12], offset .. '|' .. combo)
  -- Kept two minutes past the window, counted from its first gift: any publish the window
  -- admits still finds the record of its minute.
  if redis.call('PTTL', KEYS[6]) < 0 then redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[14]) + 120000) end
end
return {offset, combo, 0}
