-- send_gift.lua: debit a gift from the sender's wallet, exactly once per client id.
-- All keys share the sender's partition tag {p<k>}.
-- KEYS[1] wallet hash      (coins, credited, spent, gifts, restricted, budget, m:<YYYY-MM>)
-- KEYS[2] idempotency key  ("<fingerprint>\n<gift_id>\n<balance>", expires after ARGV[4] s)
-- KEYS[3] partition totals (seq, credited, spent)
-- KEYS[4] partition outbox stream
-- ARGV[1] fingerprint (room|gift|count)   ARGV[2] coins to debit   ARGV[3] month YYYY-MM
-- ARGV[4] idempotency ttl s   ARGV[5] partition   ARGV[6] sender id   ARGV[7] sender name
-- ARGV[8] host id   ARGV[9] room id   ARGV[10] gift   ARGV[11] count   ARGV[12] host share bp
-- ARGV[13] now ms   ARGV[14] client id
-- Returns {"ok", gift_id, balance, replayed 0|1} or {"err", code}. Every check precedes the first write.
local seen = redis.call('GET', KEYS[2])
if seen then
  local fp, gift_id, balance = string.match(seen, '^(.-)\n(.-)\n(.-)$')
  if fp ~= ARGV[1] then return {'err', 'idempotency_conflict'} end
  return {'ok', gift_id, tonumber(balance), 1}
end
local w = redis.call('HMGET', KEYS[1], 'coins', 'restricted', 'budget', 'm:' .. ARGV[3])
local coins = tonumber(w[1] or '0')
local cost = tonumber(ARGV[2])
if w[2] == '1' or coins < 0 then return {'err', 'account_restricted'} end
if coins < cost then return {'err', 'insufficient_funds'} end
if w[3] and tonumber(w[4] or '0') + cost > tonumber(w[3]) then return {'err', 'budget_exceeded'} end

local balance = redis.call('HINCRBY', KEYS[1], 'coins', -cost)
redis.call('HINCRBY', KEYS[1], 'spent', cost)
redis.call('HINCRBY', KEYS[1], 'gifts', 1)
redis.call('HINCRBY', KEYS[1], 'm:' .. ARGV[3], cost)
local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
redis.call('HINCRBY', KEYS[3], 'spent', cost)
local gift_id = 'g' .. ARGV[5] .. '-' .. seq
redis.call('XADD', KEYS[4], '*', 'k', 'g', 'p', ARGV[5], 'seq', seq, 'uid', ARGV[6], 'name', ARGV[7],
  'host', ARGV[8], 'room', ARGV[9], 'gift', ARGV[10], 'n', ARGV[11], 'c', cost, 'bp', ARGV[12],
  'ts', ARGV[13], 'cid', ARGV[14], 'id', gift_id)
redis.call('SET', KEYS[2], ARGV[1] .. '\n' .. gift_id .. '\n' .. balance, 'EX', ARGV[4])
return {'ok', gift_id, balance, 0}
