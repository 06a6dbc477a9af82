-- move.lua: a keyed movement (claw-back, reversal, reward redemption, adjustment, points), exactly
-- once per (kind, user, ref). All keys share the user's partition tag {p<k>}.
-- KEYS[1] wallet hash   KEYS[2] this kind's done hash ("<user>\n<ref>" -> "<seq>\n<fingerprint>")
-- KEYS[3] partition totals (seq; c:<code> and q:<code>, the coin and point changes per kind)
-- KEYS[4] partition outbox stream
-- ARGV[1] "<user>\n<ref>"   ARGV[2] coin change (signed)   ARGV[3] points change (signed)
-- ARGV[4] fingerprint (a repeat with another one is an idempotency_conflict)
-- ARGV[5] the kind's code   ARGV[6] the outbox body (movement.keyed_body)
-- ARGV[7] wallet coin counter field or ''   ARGV[8] its increment
-- ARGV[9] wallet points counter field or ''  ARGV[10] its increment
-- The coin balance may go negative (a claw-back); points never do.
-- Returns {"ok", coins, points, seq, replayed 0|1} or {"err", code}. Every check precedes the
-- first write.
local done = redis.call('HGET', KEYS[2], ARGV[1])
local w = redis.call('HMGET', KEYS[1], 'coins', 'points')
local coins, points = tonumber(w[1] or '0'), tonumber(w[2] or '0')
if done then
  local seq, fp = string.match(done, '^(%d+)\n(.*)$')
  if fp ~= ARGV[4] then return {'err', 'idempotency_conflict'} end
  return {'ok', coins, points, tonumber(seq), 1}
end
local dc, dp = tonumber(ARGV[2]), tonumber(ARGV[3])
if dc == nil or dp == nil then return redis.error_reply('coin and point changes must be integers') end
if points + dp < 0 then return {'err', 'insufficient_points'} end

local function int(n) return string.format('%d', n) end
coins, points = coins + dc, points + dp
redis.call('HSET', KEYS[1], 'coins', int(coins), 'points', int(points))
if ARGV[7] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[7], ARGV[8]) end
if ARGV[9] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[9], ARGV[10]) end
local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
if dc ~= 0 then redis.call('HINCRBY', KEYS[3], 'c:' .. ARGV[5], ARGV[2]) end
if dp ~= 0 then redis.call('HINCRBY', KEYS[3], 'q:' .. ARGV[5], ARGV[3]) end
redis.call('HSET', KEYS[2], ARGV[1], seq .. '\n' .. ARGV[4])
redis.call('XADD', KEYS[4], '*', 'k', ARGV[5], 'seq', seq, 'j', ARGV[6])
return {'ok', coins, points, seq, 0}
