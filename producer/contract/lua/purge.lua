-- chatq PURGE (`chatq purge`): drop a lane's queued entries, those no worker was given yet,
-- and give their backlog cost back. Entries delivered to a worker (pending) stay: their
-- worker answers them.
-- KEYS: 1 lane (request stream), 2 the model's backlog hash
-- ARGV: 1 group, 2 most entries to drop in this call
-- Returns {entry id, envelope, reserved, ...} of the dropped entries; reserved is 1 for an
-- entry its request id's reservation (<prefix>:id:T:<id>, T the lane's partition tag) names: the caller writes its
-- requester an error result (FINALIZE, which also gives the reservation its TTL). An entry
-- it does not name (0) was added by hand, without ENQUEUE, maybe as a copy of someone
-- else's id: it is dropped, nobody is told and nothing is given back for it (its c is made
-- up). The drain rate is not fed: nothing was served. The totals hash (<prefix>:totals:T,
-- named after the backlog hash <prefix>:backlog:T:<model>) gives the cost back too.
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local last = '0-0'
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, g in ipairs(groups) do
    local name, delivered
    for k = 1, #g, 2 do
      if g[k] == 'name' then name = g[k + 1] elseif g[k] == 'last-delivered-id' then
        delivered = g[k + 1]
      end
    end
    if name == ARGV[1] then last = delivered end
  end
end
local entries = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', tonumber(ARGV[2]))
local prefix, tag = string.match(KEYS[2], '^([^:]*):backlog:({[^}]*})')
local function reserved(entry_id, envelope)  -- 1 when its id's reservation names it
  local ok, env = pcall(cmsgpack.unpack, envelope)
  if not ok or type(env) ~= 'table' or type(env.id) ~= 'string' then return 0 end
  local reservation = redis.call('GET', prefix .. ':id:' .. tag .. ':' .. env.id)
  if reservation and string.match(reservation, '^(.+) %S*$') == KEYS[1] .. '/' .. entry_id then
    return 1
  end
  return 0
end
local out, cost, charged = {}, 0, 0
for _, e in ipairs(entries) do
  local fields, envelope, c = e[2], '', 0
  for k = 1, #fields, 2 do
    if fields[k] == 'm' then envelope = fields[k + 1] end
    if fields[k] == 'c' then c = tonumber(fields[k + 1]) or 0 end
  end
  local mine = reserved(e[1], envelope)
  if mine == 1 then
    cost = cost + c
    charged = charged + 1
  end
  redis.call('XDEL', KEYS[1], e[1])
  out[#out + 1] = e[1]
  out[#out + 1] = envelope
  out[#out + 1] = mine
end
if charged > 0 then
  -- the totals hash (all models' queued tokens, models with requests) beside the backlog hash
  local totals = prefix .. ':totals:' .. tag
  if redis.call('HINCRBY', KEYS[2], 'tokens', 0 - cost) < 0 then
    redis.call('HSET', KEYS[2], 'tokens', 0)
  end
  if redis.call('HINCRBY', totals, 'tokens', 0 - cost) < 0 then
    redis.call('HSET', totals, 'tokens', 0)
  end
  local was = tonumber(redis.call('HGET', KEYS[2], 'requests') or '0')
  if redis.call('HINCRBY', KEYS[2], 'requests', 0 - charged) <= 0 then
    redis.call('HSET', KEYS[2], 'requests', 0)
    if was > 0 and redis.call('HINCRBY', totals, 'models', -1) < 0 then
      redis.call('HSET', totals, 'models', 0)
    end
  end
end
return out
