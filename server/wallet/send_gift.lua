-- send_gift.lua: debit a gift from the sender's wallet, exactly once per client id.
-- All keys share the sender's partition tag {p<k>}.
-- KEYS[1] wallet hash      (coins, credited, spent, gifts, restricted, budget, budget_next, budget_from,
--                          m:<YYYY-MM>)
-- KEYS[2] the partition's gift id records, a hash: field ARGV[9] -> "<seq>\n<balance>\n<debit ms>\n
--         <fingerprint digest>", the field expiring ARGV[4] s after the debit
-- KEYS[3] partition totals (seq, credited, spent)
-- KEYS[4] partition outbox stream
-- KEYS[5] optional, while records of the layout before 2026-11-30 may live (Wallet.start): the
--         gift id's string key, "<fingerprint>\n<gift_id>\n<balance>\n<debit ms>"
-- ARGV[1] fingerprint digest (8 bytes of room|gift|count)   ARGV[2] coins to debit
-- ARGV[3] month YYYY-MM   ARGV[4] the record's lifetime s (settings.idempotency_ttl_s)
-- ARGV[5] gift id prefix (movement.gift_id_prefix: the id is it + seq)
-- ARGV[6] now ms (the debit's time: a replay returns the first one's, to publish it late)
-- ARGV[7] the movement's kind code, ARGV[8] its body: the outbox entry the settler reads, built
--         by server/movement.py (gift_body)
-- ARGV[9] the gift id's field (keys.UserKeys.gift_id_field: 16 bytes of user and gift id)
-- ARGV[10] with KEYS[5]: the fingerprint itself, as the old record holds it
-- Returns {"ok", gift_id, balance, replayed 0|1, debit ms} or {"err", code}. Every check
-- precedes the first write.
--
-- A record keeps what a replay answers and no more: the gift's number (the id is the prefix and
-- it), the balance after it, its time, and a digest of what was sent, to tell a retry from a
-- different gift under the same id. A field of one hash per partition rather than a key each:
-- ~98 bytes a gift rather than ~156, with the same two calls (docs/benchmarks.md).
--
-- Each write reaches the AOF (appendfsync always) as its own command, so the counters are
-- read once and written back with one HSET per hash rather than one HINCRBY per field, and
-- the outbox entry is one JSON field rather than a field per attribute: about half the AOF
-- bytes per gift of the first version.
local seen = redis.call('HGET', KEYS[2], ARGV[9])
if seen then
  local seq, balance, at, fp = string.match(seen, '^(%d+)\n(%-?%d+)\n(%d+)\n(.*)$')
  if fp ~= ARGV[1] then return {'err', 'idempotency_conflict'} end
  return {'ok', ARGV[5] .. seq, tonumber(balance), 1, tonumber(at)}
end
if KEYS[5] then
  local old = redis.call('GET', KEYS[5])
  if old then
    local fp, gift_id, balance, at = string.match(old, '^(.-)\n(.-)\n([^\n]*)\n(%d+)$')
    if fp ~= ARGV[10] then return {'err', 'idempotency_conflict'} end
    return {'ok', gift_id, tonumber(balance), 1, tonumber(at)}
  end
end
local month = 'm:' .. ARGV[3]
local w = redis.call('HMGET', KEYS[1], 'coins', 'restricted', 'budget', month, 'spent', 'gifts', 'budget_next',
  'budget_from')
local coins = tonumber(w[1] or '0')
local cost = tonumber(ARGV[2])
local month_spent = tonumber(w[4] or '0')
-- A raised or removed budget (set_budget.lua) applies from budget_from on; 'none' removes it.
local budget = w[3]
if w[8] and tonumber(ARGV[6]) >= tonumber(w[8]) then budget = w[7] ~= 'none' and w[7] or false end
if w[2] == '1' or coins < 0 then return {'err', 'account_restricted'} end
if coins < cost then return {'err', 'insufficient_funds'} end
if budget and month_spent + cost > tonumber(budget) then return {'err', 'budget_exceeded'} end

-- '%d': a Lua number handed to redis.call as is may be written in exponent form when large.
-- Lua numbers are doubles: sums stay exact below 2^53 coins (9e15), past any real total.
local function int(n) return string.format('%d', n) end
local balance = coins - cost
redis.call('HSET', KEYS[1], 'coins', int(balance), 'spent', int(tonumber(w[5] or '0') + cost),
  'gifts', int(tonumber(w[6] or '0') + 1), month, int(month_spent + cost))
local t = redis.call('HMGET', KEYS[3], 'seq', 'spent')
local seq = int(tonumber(t[1] or '0') + 1)
redis.call('HSET', KEYS[3], 'seq', seq, 'spent', int(tonumber(t[2] or '0') + cost))
local gift_id = ARGV[5] .. seq
redis.call('XADD', KEYS[4], '*', 'k', ARGV[7], 'seq', seq, 'j', ARGV[8])
redis.call('HSETEX', KEYS[2], 'EX', ARGV[4], 'FIELDS', 1, ARGV[9],
  seq .. '\n' .. int(balance) .. '\n' .. ARGV[6] .. '\n' .. ARGV[1])
return {'ok', gift_id, balance, 0, tonumber(ARGV[6])}
