-- credit.lua: credit coins for a paid order (or an admin grant), exactly once per order id.
-- All keys share the user's partition tag {p<k>}.
-- KEYS[1] wallet hash   KEYS[2] credited orders hash (order id -> movement seq)
-- KEYS[3] partition totals   KEYS[4] partition outbox stream
-- ARGV[1] order id   ARGV[2] coins
-- ARGV[3] the movement's kind code, ARGV[4] its body: the outbox entry the settler reads,
--         built by server/movement.py (credit_body: partition, user, coins, now ms, order, kind)
-- Returns {"ok", balance, seq} or {"dup", balance, seq} when this order was credited before.
local done = redis.call('HGET', KEYS[2], ARGV[1])
if done then
  return {'dup', tonumber(redis.call('HGET', KEYS[1], 'coins') or '0'), tonumber(done)}
end
local amount = tonumber(ARGV[2])
if amount == nil or amount <= 0 then return redis.error_reply('credit amount must be positive') end
local balance = redis.call('HINCRBY', KEYS[1], 'coins', amount)
redis.call('HINCRBY', KEYS[1], 'credited', amount)
local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
redis.call('HINCRBY', KEYS[3], 'credited', amount)
redis.call('HSET', KEYS[2], ARGV[1], seq)
redis.call('XADD', KEYS[4], '*', 'k', ARGV[3], 'seq', seq, 'j', ARGV[4])
return {'ok', balance, seq}
