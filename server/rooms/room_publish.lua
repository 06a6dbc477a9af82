-- room_publish.lua: append an event to a room's capped stream and publish it.
-- All keys share the room tag {r:<room_id>}.
-- KEYS[1] room state hash (host, live, epoch, coins_total, gifts_total, combo_exp, ...)
-- KEYS[2] room event stream   KEYS[3] session leaderboard zset (user -> coins)
-- KEYS[4] combo hash ("<user>:<gift>" -> "<n>:<ms>")   KEYS[5] display names of gifters (user -> name)
-- KEYS[6] gifts published in the minute of the gift's debit (gift id -> publish ms)
-- ARGV[1] kind (gift|ended)   ARGV[2] event payload (msgpack, without offset and combo)
-- ARGV[3] now ms   ARGV[4] stream max length   ARGV[5] pub/sub channel
-- gifts only:
-- ARGV[6] combo field   ARGV[7] combo window ms   ARGV[8] sender id   ARGV[9] coins
-- ARGV[10] sender name to record, or "" when this gateway recorded it already
-- ARGV[11] gift id   ARGV[12] the gift's debit ms   ARGV[13] republish window ms
-- ARGV[14] gift (catalog id)   ARGV[15] count   ARGV[16] goal event interval ms
-- Returns {offset, combo, 0} when published, {false, 0, 1} when this gift was published before
-- (nothing is written), {false, 0, 0} when the room is unknown (or, for 'ended', has ended
-- already), and {false, 0, 2} when the gift was debited longer than the window ago (it cannot
-- be told apart from a gift published already whose record expired: it is not published).
-- The published message is "<offset>|<combo>|<payload>".
--
-- A gift is published once however often it is asked: after a gateway died between the debit
-- and this call, the sender's retry (same client id, replayed debit) publishes it, and a
-- publish retried after a Redis error cannot show it twice or count it twice.
--
-- Every redis.call costs about as much as the command it runs, and every write is a command in
-- the AOF: the common path is eight calls. The stream is trimmed by age in room_tick.lua, once
-- a second, not here.
--
-- LIVE goal (creators/goals.py, room_goal.lua): a gift the room's goal counts adds to its
-- progress in the totals' HSET (its fields come with the HMGET: a room without a goal, or with
-- one done, pays nothing). A `goal` event is appended and published after the gift's when the
-- gift reaches the target (at once, exactly once: later gifts do not count) or when the last
-- goal event is goal_event_interval_ms old; a change held back goes out from room_tick.lua.
local now = tonumber(ARGV[3])
if ARGV[1] == 'ended' then
  local live = redis.call('HGET', KEYS[1], 'live')
  if not live or live == '0' then return {false, 0, 0} end
  redis.call('HSET', KEYS[1], 'live', '0', 'ended_at', ARGV[3])
  local offset = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[2], 'c', 0)
  redis.call('PUBLISH', ARGV[5], offset .. '|0|' .. ARGV[2])
  return {offset, 0, 0}
end

local state = redis.call('HMGET', KEYS[1], 'host', 'coins_total', 'gifts_total', 'combo_exp',
  'goal_target', 'goal_done', 'goal_gift', 'goal_progress', 'goal_event_ms', 'goal_id')
if not state[1] then return {false, 0, 0} end
local window = tonumber(ARGV[13])
if tonumber(ARGV[12]) < now - window then return {false, 0, 2} end
if redis.call('HSETNX', KEYS[6], ARGV[11], ARGV[3]) == 0 then return {false, 0, 1} end
-- The record lives two minutes past the window, so any publish the window admits still finds
-- its minute's. room_tick.lua gives the current and the previous minute's record that expiry
-- once a tick; a publish into an earlier minute than now's (a retry, a replay) sets it here.
if math.floor(tonumber(ARGV[12]) / 60000) < math.floor(now / 60000) then
  redis.call('PEXPIRE', KEYS[6], window + 120000)
end

local combo_window = tonumber(ARGV[7])
local prev = redis.call('HGET', KEYS[4], ARGV[6])
local combo = 1
if prev then
  local n, at = string.match(prev, '^(%d+):(%d+)$')
  if tonumber(at) >= now - combo_window then combo = tonumber(n) + 1 end
end
redis.call('HSET', KEYS[4], ARGV[6], combo .. ':' .. now)
redis.call('ZINCRBY', KEYS[3], ARGV[9], ARGV[8])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[5], ARGV[8], ARGV[10]) end
-- Room totals (and the goal's progress) in one HSET; the combos' expiry is refreshed once it is below two windows (its
-- due time kept beside the totals), so a streak outlives its window.
local fmt = string.format
local fields = {'coins_total', fmt('%d', tonumber(state[2] or '0') + tonumber(ARGV[9])),
  'gifts_total', fmt('%d', tonumber(state[3] or '0') + 1)}
if tonumber(state[4] or '0') < now + combo_window * 2 then
  redis.call('PEXPIRE', KEYS[4], combo_window * 4)
  fields[#fields + 1] = 'combo_exp'
  fields[#fields + 1] = fmt('%d', now + combo_window * 4)
end
-- LIVE goal: the event to append after the gift's, if this gift makes one.
local goal_event = nil
local goal_gift = state[7] or ''
if state[5] and state[6] ~= '1' and (goal_gift == '' or goal_gift == ARGV[14]) then
  local target = tonumber(state[5])
  local progress = tonumber(state[8] or '0') + (goal_gift == '' and tonumber(ARGV[9]) or tonumber(ARGV[15]))
  fields[#fields + 1] = 'goal_progress'
  fields[#fields + 1] = fmt('%d', progress)
  local last = tonumber(state[9] or '0')
  local done = progress >= target
  if done or now >= last + tonumber(ARGV[16]) then
    -- Never before the last goal event, even from a gateway whose clock is behind.
    local ts = math.max(now, last)
    goal_event = {type = 'goal', goal_id = state[10], target = target, progress = progress, done = done, ts = ts}
    if goal_gift ~= '' then goal_event.gift = goal_gift end
    fields[#fields + 1] = 'goal_event_ms'
    fields[#fields + 1] = fmt('%d', ts)
    fields[#fields + 1] = 'goal_sent'
    fields[#fields + 1] = fmt('%d', progress)
    if done then
      fields[#fields + 1] = 'goal_done'
      fields[#fields + 1] = '1'
      -- Outlives this goal (a new goal or a clear resets goal_done): the session reached a goal.
      fields[#fields + 1] = 'goal_reached'
      fields[#fields + 1] = '1'
    end
  end
end
redis.call('HSET', KEYS[1], unpack(fields))
local offset = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[2], 'c', combo)
redis.call('PUBLISH', ARGV[5], offset .. '|' .. combo .. '|' .. ARGV[2])
if goal_event then
  local payload = cmsgpack.pack(goal_event)
  local goal_offset = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'e', payload, 'c', 0)
  redis.call('PUBLISH', ARGV[5], goal_offset .. '|0|' .. payload)
end
return {offset, combo, 0}
