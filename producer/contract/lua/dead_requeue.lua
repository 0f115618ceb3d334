-- chatq DEAD_REQUEUE (`chatq dead requeue`): give a dead-lettered request another run.
-- KEYS: 1 dead-letter stream, 2 the request's lane, 3 the model's backlog hash, 4 its final
--       marker, 5 its result stream, 6 models set
-- ARGV: 1 dead-letter entry id, 2 envelope (the entry's payload), 3 cost tokens, 4 model
-- Returns the new request-stream entry id; false when the dead letter is gone (requeued or
-- dropped already); -1, changing nothing, when it is not the entry the request id was
-- reserved for: the reservation <p>:id:T:<id> names another entry (a copy someone added with
-- raw commands, parked by a worker), or it is gone and the dead letter does not name the
-- request (workers record the id only of entries they read as the request's own). Requeued,
-- the request's old error result and final marker are deleted, so its next final is
-- written; the requester reads the answer with the same request id. Names built from the
-- prefix and the partition's hash tag T (of KEYS[5], <p>:res:T:<id>): the id's reservation
-- <p>:id:T:<id>, the totals hash <p>:totals:T. All KEYS are in that partition.
local dead = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #dead == 0 then return false end
local fields, lane, lane_entry, letter_id = dead[1][2], '', '', ''
for i = 1, #fields, 2 do
  if fields[i] == 'stream' then lane = fields[i + 1] end
  if fields[i] == 'entry_id' then lane_entry = fields[i + 1] end
  if fields[i] == 'id' then letter_id = fields[i + 1] end
end
local prefix, tag, id = string.match(KEYS[5], '^([^:]*):res:({[^}]*}):(.*)$')
local reservation_key = prefix .. ':id:' .. tag .. ':' .. id
local reservation = redis.call('GET', reservation_key)
-- The reservation names the new entry (same cancel digest), without a TTL while it is
-- queued (the final gives it one again); gone (expired with the old result): a new one
-- without a cancel token.
local digest = ''
if reservation then
  local reserved, reserved_digest = string.match(reservation, '^(.+) (%S*)$')
  if reserved ~= lane .. '/' .. lane_entry then return -1 end
  digest = reserved_digest
elseif letter_id ~= id then
  return -1
end
redis.call('DEL', KEYS[4], KEYS[5])
local entry = redis.call('XADD', KEYS[2], '*', 'm', ARGV[2], 'c', ARGV[3])
redis.call('SET', reservation_key, KEYS[2] .. '/' .. entry .. ' ' .. digest)
-- the model's backlog and the totals hash beside it (queued tokens, models with requests)
local totals = prefix .. ':totals:' .. tag
if tonumber(redis.call('HGET', KEYS[3], 'requests') or '0') <= 0 then
  redis.call('HINCRBY', totals, 'models', 1)
end
redis.call('HINCRBY', totals, 'tokens', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'tokens', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'requests', 1)
redis.call('PERSIST', KEYS[3])
if redis.call('HINCRBY', KEYS[3], 'dead', -1) < 0 then redis.call('HSET', KEYS[3], 'dead', 0) end
redis.call('SADD', KEYS[6], ARGV[4])
redis.call('XDEL', KEYS[1], ARGV[1])
return entry
