-- room_goal.lua: set or clear a live room's goal, and tell the room (a `goal` event).
-- All keys share the room tag {r:<room_id>}.
-- KEYS[1] room state hash (host, live, goal_* fields)   KEYS[2] room event stream
-- ARGV[1] 'set' | 'clear'   ARGV[2] now ms   ARGV[3] stream max length   ARGV[4] pub/sub channel
-- set only: ARGV[5] goal id   ARGV[6] gift (catalog id), or '' for a coins goal   ARGV[7] target
-- Returns {'no_room'}, {'not_live'}, {'no_goal'} (clear, with none set), or
-- {'ok', offset, goal id, gift, target, progress, done ('1' or '0')}: the goal set, or the goal
-- as it was when cleared.
--
-- The goal lives in the room state hash, where room_publish.lua counts each gift published
-- after it was set (goal_progress) and decides its events (goal_event_ms, goal_sent: the time
-- and progress of the last one; goal_done: '1' once the target was reached, exactly once), and
-- room_tick.lua sends a change the interval held back. Setting a goal replaces the current one
-- and starts at 0; both answers are events in the room's stream, so a resume replays them.
local state = redis.call('HMGET', KEYS[1], 'host', 'live', 'goal_id', 'goal_gift', 'goal_target',
  'goal_progress', 'goal_done')
if not state[1] then return {'no_room'} end
if state[2] ~= '1' then return {'not_live'} end
local now = tonumber(ARGV[2])
local event
local answer
if ARGV[1] == 'set' then
  redis.call('HSET', KEYS[1], 'goal_id', ARGV[5], 'goal_gift', ARGV[6], 'goal_target', ARGV[7],
    'goal_progress', '0', 'goal_done', '0', 'goal_event_ms', ARGV[2], 'goal_sent', '0')
  event = {type = 'goal', goal_id = ARGV[5], target = tonumber(ARGV[7]), progress = 0, done = false, ts = now}
  if ARGV[6] ~= '' then event.gift = ARGV[6] end
  answer = {ARGV[5], ARGV[6], ARGV[7], '0', '0'}
else
  if not state[5] then return {'no_goal'} end
  redis.call('HDEL', KEYS[1], 'goal_id', 'goal_gift', 'goal_target', 'goal_progress', 'goal_done',
    'goal_event_ms', 'goal_sent')
  event = {type = 'goal', goal_id = state[3], target = tonumber(state[5]), progress = tonumber(state[6] or '0'),
    done = state[7] == '1', cleared = true, ts = now}
  if (state[4] or '') ~= '' then event.gift = state[4] end
  answer = {state[3], state[4] or '', state[5], state[6] or '0', state[7] or '0'}
end
local payload = cmsgpack.pack(event)
local offset = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'e', payload, 'c', 0)
redis.call('PUBLISH', ARGV[4], offset .. '|0|' .. payload)
return {'ok', offset, unpack(answer)}
