-- gift_replay.lua: the first result of a gift id that was already charged, without charging.
-- Used when a gift is refused at the gateway (rate limit, room ended) so a retry of a gift
-- that went through still learns its result. Read-only.
-- KEYS[1] the partition's gift id records (same as send_gift.lua KEYS[2])
-- KEYS[2] optional: the gift id's record of the layout before 2026-11-30 (send_gift.lua KEYS[5])
-- ARGV[1] the gift id's field   ARGV[2] fingerprint digest   ARGV[3] gift id prefix
-- ARGV[4] with KEYS[2]: the fingerprint itself
-- Returns false (never charged), {"ok", gift_id, balance, 1, debit ms} or
-- {"err", "idempotency_conflict"}.
local seen = redis.call('HGET', KEYS[1], ARGV[1])
if seen then
  local seq, balance, at, fp = string.match(seen, '^(%d+)\n(%-?%d+)\n(%d+)\n(.*)$')
  if fp ~= ARGV[2] then return {'err', 'idempotency_conflict'} end
  return {'ok', ARGV[3] .. seq, tonumber(balance), 1, tonumber(at)}
end
if not KEYS[2] then return false end
seen = redis.call('GET', KEYS[2])
if not seen then return false end
local fp, gift_id, balance, at = string.match(seen, '^(.-)\n(.-)\n([^\n]*)\n(%d+)$')
if fp ~= ARGV[4] then return {'err', 'idempotency_conflict'} end
return {'ok', gift_id, tonumber(balance), 1, tonumber(at)}
