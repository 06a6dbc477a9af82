-- set_budget.lua: a user's monthly spending budget. Lowering (or setting one where there was none)
-- applies at once; raising or removing applies `delay` later, as card spending limits do.
-- KEYS[1] wallet hash (budget; budget_next and budget_from: the pending change, 'none' = remove)
-- ARGV[1] the new budget in coins, or '' for none   ARGV[2] now ms   ARGV[3] delay ms
-- Returns {budget or '', pending budget or '' ('none' = removal pending), pending from ms or ''}.
local w = redis.call('HMGET', KEYS[1], 'budget', 'budget_next', 'budget_from')
local now = tonumber(ARGV[2])
local current = w[1]
if w[3] and now >= tonumber(w[3]) then current = w[2] ~= 'none' and w[2] or false end
local new = ARGV[1] ~= '' and ARGV[1] or false
if new and (not current or tonumber(new) <= tonumber(current)) then
  redis.call('HSET', KEYS[1], 'budget', new)
  redis.call('HDEL', KEYS[1], 'budget_next', 'budget_from')
  return {new, '', ''}
end
-- A due pending change is made current before anything else.
if current then redis.call('HSET', KEYS[1], 'budget', current) else redis.call('HDEL', KEYS[1], 'budget') end
if not new and not current then
  redis.call('HDEL', KEYS[1], 'budget_next', 'budget_from')
  return {'', '', ''}
end
local from = string.format('%d', now + tonumber(ARGV[3]))
local next = new or 'none'
redis.call('HSET', KEYS[1], 'budget_next', next, 'budget_from', from)
return {current, next, from}
