-- room_publish.lua: append an event to a room's capped stream and publish it.
-- All keys share the room tag {r:<room_id>}.
-- KEYS[1] room state hash (host, live, epoch, coins_total, ...)   KEYS[2] room event stream
-- KEYS[3] session leaderboard zset (user -> coins)   KEYS[4] combo hash ("<user>:<gift>" -> "<n>:<ms>")
-- ARGV[1] kind (gift|ended)   ARGV[2] event payload (msgpack, without offset and combo)
-- ARGV[3] now ms   ARGV[4] stream max length   ARGV[5] oldest id to keep (ms)
-- ARGV[6] combo field   ARGV[7] combo window ms   ARGV[8] sender id   ARGV[9] coins
-- KEYS[5] display names of gifters (user -> name)
-- ARGV[10] pub/sub channel   ARGV[11] sender name
-- Returns {offset, combo}. The published message is "<offset>|<combo>|<payload>".
if redis.call('EXISTS', KEYS[1]) == 0 then return {false, 0} end
local now = tonumber(ARGV[3])
local combo = 0
if ARGV[1] == 'gift' then
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
  if redis.call('HGET', KEYS[1], 'live') == '0' then return {false, 0} end
  redis.call('HSET', KEYS[1], 'live', '0', 'ended_at', ARGV[3])
end
local offset = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[2], 'c', combo)
redis.call('XTRIM', KEYS[2], 'MINID', '~', ARGV[5])
redis.call('PUBLISH', ARGV[10], offset .. '|' .. combo .. '|' .. ARGV[2])
return {offset, combo}
