-- gift_replay.lua: the first result of a gift id that was already charged, without charging.
-- Used when a gift is refused at the gateway (rate limit, room ended) so a retry of a gift
-- that went through still learns its result. Read-only.
-- KEYS[1] idempotency key (same as send_gift.lua KEYS[2])
-- ARGV[1] fingerprint (room|gift|count)
-- Returns false (never charged), {"ok", gift_id, balance, 1, debit ms} or
-- {"err", "idempotency_conflict"}.
local seen = redis.call('GET', KEYS[1])
if not seen then return false end
local fp, gift_id, balance, at = string.match(seen, '^(.-)\n(.-)\n([^\n]*)\n(%d+)$')
if fp ~= ARGV[1] then return {'err', 'idempotency_conflict'} end
return {'ok', gift_id, tonumber(balance), 1, tonumber(at)}
