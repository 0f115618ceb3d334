-- chatq ENQUEUE: enqueue N >= 1 requests in one call, in one of two modes.
-- KEYS: 1 models set, 2 totals hash, then M backlog hashes (one per model in the call), all
--       of the call's partition.
-- ARGV: 1 M, 2 the caller's own backlog bound in tokens (0 = none; it can only lower the
--       bound in the bounds hash, never raise it), 3 idempotency TTL s, 4 mode ("each" /
--       "all", optionally ":live" / ":any", see the live check below), 5 key prefix,
--       6 the partition's hash tag ("{q<p>}"), 7 the partition p, 8 the number of
--       partitions P, 9..8+M model names, then 3 per request: msgpack envelope, model index
--       (1..M), cancel digest (SHA-1 hex of the request's cancel token; "" for none).
--
-- Partitions: every key one call touches carries the partition's hash tag (one Redis
-- Cluster slot). A request id belongs to partition tonumber(first 8 hex digits of
-- SHA-1(id), 16) % P, an idempotency scope to the same function of its SHA-1 (below); a
-- request whose id (or scope) belongs to another partition fails the call (with P = 1 every
-- id and scope belongs to partition 0). The token bounds are split evenly over the
-- partitions (each enforces ceil(bound / P)).
-- Names built here from the prefix and tag T: the request lane <p>:req:T:<model>:<priority>,
-- the bounds hash <p>:bounds:T, the served set <p>:served:T, <p>:id:T:<id> (the id's
-- reservation), <p>:final:T:<id>, <p>:res:T:<id>, <p>:idem:T:<scope> where scope is the
-- SHA-1 of (model, tenant, idempotency key). They are not KEYS because Redis
-- checks every KEYS name of an EVALSHA for read and write access, and a producer's ACL user
-- may only write lanes and only read the bounds and the served set
-- (deploy/redis/users.acl.template).
--
-- Ids: an id that is reserved, answered or has a result stream is refused; a queued request
-- reserves its id with SETNX (the one write a producer's ACL user may make to a reservation:
-- it can not overwrite or expire one) and the value "<lane>/<entry id> <cancel digest>" (the
-- lane too: stream ids are per stream, and a producer may XADD a copy under the same id to
-- another lane): a worker answers only the entry its id was reserved for, honours only a
-- cancel whose token has that digest, and gives the reservation its TTL (the result's) when
-- it writes the final.
-- Idempotency: per (model, tenant, key), never global. The record is "<request id> <body
-- digest>" (SHA-1 of the messages, params, tools, tool_choice and chat_template_kwargs): the
-- same key with the same body gives the first request's id; with another body it is refused
-- ({4}), as payment APIs do.
-- Cost (enqueue.cost_tokens is its Python twin, pinned to it by a test):
--   cost = floor(UTF-8 bytes of all message contents / 4) + 8 * messages + n * max_tokens
-- (max_tokens 256 and n 1 when the envelope leaves them out: n answers share one prompt). Each entry is {m: envelope, c: cost};
-- the worker gives back exactly c when the entry is acked.
-- Bounds (the bounds hash, set by operators; defaults below when unset): a model's queued
-- tokens (backlog_tokens), all models' queued tokens (total_tokens) and how many models may
-- have requests queued at once (max_models). A model's empty backlog always admits one
-- request (or batch) larger than the bound, and so does an empty total.
-- A refusal carries a retry hint: the time until the excess over the bound has drained at
-- the measured rate, plus the time to drain what was already promised to callers refused
-- before (a decaying count of their costs), so N waiting callers are told N different
-- times instead of one.
--
-- Mode "each" (concurrent submit calls sent together): exactly as if each request had been
-- enqueued alone, in order. Returns {1, {outcome, ...}}, one per request:
--   {1, entry id} queued; {2, existing request id} known idempotency key, same body;
--   {0, queued tokens, drain rate ('' if never measured), cost, retry ms, bound tokens[, live]};
--   {3} the id is in use; {4} the idempotency key was used for another body;
--   {5, {served model, ...}} no live worker serves the model (live check below).
-- Mode "all" (submit_many): all or nothing. On success {1, {{1, entry id} | {2, id}, ...}};
-- else nothing is written and the reply is {0, model index, queued, rate, cost of that
-- model's part, retry ms, bound[, live]} or {3, request index} or {4, request index} or
-- {5, model index, {served model, ...}}.
-- Live check (mode "each:live" / "all:live", or "each:any" / "all:any"): the served set
-- (written by workers' BEAT: model -> Unix ms until which a live worker serves it) is read.
-- With ":live", a request for a model no live worker serves is refused ({5}) before
-- anything is written for it. With either suffix every queue-full outcome carries one more
-- element, '1' if a live worker serves the model, else '0' (a queue nobody drains: no retry
-- hint helps). Without a suffix ("each" / "all") nothing is checked.
-- A request whose envelope is not a msgpack map with messages (each with a string content),
-- an id of 1-64 of [A-Za-z0-9_.:-], the model named at its model index and a non-negative
-- integer max_tokens fails the whole call with an error reply naming the request.
-- The consumer group is not touched: workers create it at id 0, so entries queued before
-- any worker started are delivered too.
local m = tonumber(ARGV[1])
local own_bound, idem_ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local mode, check = string.match(ARGV[4], '^(%a+):?(%a*)$')
local each, prefix, tag = mode == 'each', ARGV[5], ARGV[6]
local partition, partitions = tonumber(ARGV[7]), tonumber(ARGV[8])
local MODELS = 8  -- ARGV[MODELS + j] is the name of model j
local base = MODELS + m
local n = (#ARGV - base) / 3
local PRIORITIES = {high = true, normal = true, low = true}
local DEFAULT_MAX_TOKENS = 256
local DEFAULT_BACKLOG_TOKENS, DEFAULT_TOTAL_TOKENS, DEFAULT_MAX_MODELS = 2000000, 8000000, 256
local MIN_RETRY_MS, MAX_RETRY_MS = 50, 60000

local function refuse(i, why)
  error({err = 'ERR chatq ENQUEUE: request ' .. i .. ': ' .. why})
end

-- One canonical text for a msgpack value: strings length-prefixed, maps by sorted key.
local function canon(v)
  if type(v) == 'string' then return #v .. ':' .. v end
  if type(v) ~= 'table' then return tostring(v) end
  local names, count = {}, 0
  for k in pairs(v) do
    count = count + 1
    names[#names + 1] = tostring(k)
  end
  if count == #v then
    local out = {}
    for _, x in ipairs(v) do out[#out + 1] = canon(x) end
    return '[' .. table.concat(out, ',') .. ']'
  end
  table.sort(names)
  local out = {}
  for _, k in ipairs(names) do
    local x = v[k]
    if x == nil then x = v[tonumber(k)] end
    out[#out + 1] = canon(k) .. '=' .. canon(x)
  end
  return '{' .. table.concat(out, ',') .. '}'
end

-- SHA-1 of what makes the answer: the messages, params, tools and template names.
local function body_digest(env)
  return redis.sha1hex(canon({env.messages, env.params or {}, env.tools or {},
                              env.tool_choice or 'auto', env.chat_template_kwargs or {}}))
end

-- The request's id, cost, idempotency record key (or false), body digest and lane.
local function read(i)
  local a = base + 3 * i
  local ok, env = pcall(cmsgpack.unpack, ARGV[a + 1])
  if not ok or type(env) ~= 'table' then refuse(i + 1, 'the envelope is not a msgpack map') end
  if type(env.id) ~= 'string' then refuse(i + 1, 'id must be a string') end
  if #env.id > 64 or not string.match(env.id, '^[%w_.:%-]+$') then
    refuse(i + 1, 'id must be 1 to 64 of A-Z a-z 0-9 _ . : -')
  end
  if env.model ~= ARGV[MODELS + tonumber(ARGV[a + 2])] then
    refuse(i + 1, 'model must be the model named at its model index')
  end
  local priority = env.priority or 'normal'
  if not PRIORITIES[priority] then refuse(i + 1, 'priority must be high, normal or low') end
  local messages = env.messages
  if type(messages) ~= 'table' then refuse(i + 1, 'messages must be a list') end
  local bytes = 0
  for _, message in ipairs(messages) do
    if type(message) ~= 'table' or type(message.content) ~= 'string' then
      refuse(i + 1, 'every message needs a string content')
    end
    bytes = bytes + #message.content
  end
  local max_tokens = DEFAULT_MAX_TOKENS
  if type(env.params) == 'table' and env.params.max_tokens ~= nil then
    max_tokens = env.params.max_tokens
  end
  if type(max_tokens) ~= 'number' or max_tokens < 0 or max_tokens > 2^31
     or max_tokens ~= math.floor(max_tokens) then
    refuse(i + 1, 'params.max_tokens must be an integer in [0, 2^31]')
  end
  local n = 1
  if type(env.params) == 'table' and env.params.n ~= nil then n = env.params.n end
  if type(n) ~= 'number' or n < 1 or n > 16 or n ~= math.floor(n) then  -- MAX_N
    refuse(i + 1, 'params.n must be an integer in [1, 16]')
  end
  local idem = false
  if type(env.idempotency_key) == 'string' then
    local tenant = type(env.tenant) == 'string' and env.tenant or ''
    local scope = #env.model .. ':' .. env.model .. #tenant .. ':' .. tenant
                  .. env.idempotency_key
    local digest = redis.sha1hex(scope)
    if partitions > 1 and tonumber(string.sub(digest, 1, 8), 16) % partitions ~= partition then
      refuse(i + 1, 'its idempotency scope belongs to another partition')
    end
    idem = prefix .. ':idem:' .. tag .. ':' .. digest
  end
  if partitions > 1
     and tonumber(string.sub(redis.sha1hex(env.id), 1, 8), 16) % partitions ~= partition then
    refuse(i + 1, 'its id belongs to another partition')
  end
  return env.id, math.floor(bytes / 4) + 8 * #messages + n * max_tokens, idem,
         idem and body_digest(env) or '', prefix .. ':req:' .. tag .. ':' .. env.model .. ':'
         .. priority
end

-- Every request is read before anything is written: a bad one fails the call untouched.
local ids, costs, idems, digests, lanes = {}, {}, {}, {}, {}
for i = 1, n do
  ids[i], costs[i], idems[i], digests[i], lanes[i] = read(i - 1)
end

local bounds = redis.call('HMGET', prefix .. ':bounds:' .. tag, 'backlog_tokens',
                          'total_tokens', 'max_models')
local model_bound = tonumber(bounds[1]) or DEFAULT_BACKLOG_TOKENS
if own_bound > 0 and own_bound < model_bound then model_bound = own_bound end
model_bound = math.ceil(model_bound / partitions)
local total_bound = math.ceil((tonumber(bounds[2]) or DEFAULT_TOTAL_TOKENS) / partitions)
local max_models = tonumber(bounds[3]) or DEFAULT_MAX_MODELS
local totals = redis.call('HMGET', KEYS[2], 'tokens', 'models')
local total, active = tonumber(totals[1] or '0'), tonumber(totals[2] or '0')
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- The live check: which models a live worker serves now (Redis's clock).
local live, served = {}, {}
if check ~= '' then
  served = redis.call('ZRANGEBYSCORE', prefix .. ':served:' .. tag, now_ms, '+inf')
  for _, name in ipairs(served) do live[name] = true end
end
local function unserved(j)
  return check == 'live' and not live[ARGV[MODELS + j]]
end
-- The queue-full reply's optional last element: does a live worker drain the model?
local function with_live(reply, j)
  if check ~= '' then reply[#reply + 1] = live[ARGV[MODELS + j]] and '1' or '0' end
  return reply
end
local backlog = {}  -- per model index: {tokens, requests, rate, rate text, promised, ms}
local function model_state(j)
  if backlog[j] == nil then
    local h = redis.call('HMGET', KEYS[2 + j], 'tokens', 'requests', 'rate', 'promised',
                         'promised_ms', 'win_start_ms', 'win_tokens')
    backlog[j] = {tonumber(h[1] or '0'), tonumber(h[2] or '0'), tonumber(h[3] or '0'), h[3] or '',
                  tonumber(h[4] or '0'), tonumber(h[5] or now_ms), tonumber(h[6] or '0'),
                  tonumber(h[7] or '0')}
  end
  return backlog[j]
end

-- The drain rate (tokens/s; not measured yet: the busy window in progress if it is 100 ms
-- old, else the bound drained in 30 s) and the cost still promised to refused callers now:
-- what was promised, less what drained since.
local function promised_now(b, bound)
  local rate = b[3]
  if rate <= 0 and b[7] > 0 and now_ms - b[7] >= 100 and b[8] > 0 then
    rate = b[8] * 1000 / (now_ms - b[7])
  end
  if rate <= 0 then rate = math.max(bound / 30, 1) end
  local promised = b[5] - rate * (now_ms - b[6]) / 1000
  if promised < 0 then promised = 0 end
  return rate, promised
end

-- The request's outcome before any write: {2, id}, {3}, {4} or nil (new, id free).
local seen = {}
local function known(i)
  if idems[i] then
    local record = redis.call('GET', idems[i])
    if record then
      local id, digest = string.match(record, '^(%S+) (%S*)$')
      if digest == digests[i] then return {2, id} end
      return {4}
    end
  end
  local id = ids[i]
  local tagged = tag .. ':' .. id
  if seen[id] or redis.call('EXISTS', prefix .. ':id:' .. tagged) == 1
     or redis.call('EXISTS', prefix .. ':final:' .. tagged, prefix .. ':res:' .. tagged) > 0 then
    return {3}
  end
  return nil
end

-- The bound a request of cost c for model j would pass (tokens queued, bound), or nil.
local function over(j, c)
  local b = model_state(j)
  if b[1] > 0 and b[1] + c > model_bound then return b[1], model_bound end
  if total > 0 and total + c > total_bound then return total, total_bound end
  if b[2] == 0 and active >= max_models then return active, max_models end
  return nil
end

-- Milliseconds until the caller's cost fits after what earlier refused callers were told;
-- the promise is recorded (decaying at the drain rate) so the next caller waits longer.
local function retry_ms(j, queued, bound, c)
  local b = model_state(j)
  local rate, promised = promised_now(b, bound)
  local excess = queued + c - bound
  if excess < 1 then excess = 1 end
  local wait = math.floor(1000 * (excess + promised) / rate)
  b[5], b[6] = promised + c, now_ms
  if b[2] > 0 then  -- never a hash for a model with nothing queued: a flood of names leaves none
    redis.call('HSET', KEYS[2 + j], 'promised', tostring(b[5]), 'promised_ms', now_ms)
  end
  return math.min(math.max(wait, MIN_RETRY_MS), MAX_RETRY_MS)
end

local function add(i)
  local a = base + 3 * (i - 1)
  local j = tonumber(ARGV[a + 2])
  local entry = redis.call('XADD', lanes[i], '*', 'm', ARGV[a + 1], 'c', costs[i])
  redis.call('SETNX', prefix .. ':id:' .. tag .. ':' .. ids[i],
             lanes[i] .. '/' .. entry .. ' ' .. ARGV[a + 3])
  if idems[i] then
    redis.call('SET', idems[i], ids[i] .. ' ' .. digests[i], 'EX', idem_ttl)
  end
  local b = model_state(j)
  if b[2] == 0 then active = active + 1 end
  b[1], b[2] = b[1] + costs[i], b[2] + 1
  total = total + costs[i]
  return entry
end

local charged = {}  -- per model index: {cost, requests}
local function charge(i)
  local j = tonumber(ARGV[base + 3 * (i - 1) + 2])
  local c = charged[j] or {0, 0}
  c[1], c[2] = c[1] + costs[i], c[2] + 1
  charged[j] = c
end

-- An admitted request takes its cost off the promises (it was most likely one of the callers
-- told to come back), so callers refused again are not counted twice.
local function commit()
  for j, c in pairs(charged) do
    local b = model_state(j)
    if b[5] > 0 then
      local _, promised = promised_now(b, model_bound)
      promised = math.max(promised - c[1], 0)
      redis.call('HSET', KEYS[2 + j], 'promised', tostring(promised), 'promised_ms', now_ms)
    end
    redis.call('HINCRBY', KEYS[2 + j], 'tokens', c[1])
    redis.call('HINCRBY', KEYS[2 + j], 'requests', c[2])
    redis.call('PERSIST', KEYS[2 + j])
    redis.call('SADD', KEYS[1], ARGV[MODELS + j])
  end
  if next(charged) ~= nil then redis.call('HSET', KEYS[2], 'tokens', total, 'models', active) end
end

local out = {}
if each then
  for i = 1, n do
    local j = tonumber(ARGV[base + 3 * (i - 1) + 2])
    out[i] = known(i)
    if out[i] == nil and unserved(j) then out[i] = {5, served} end
    if out[i] == nil then
      local queued, bound = over(j, costs[i])
      if queued then
        local b = model_state(j)
        out[i] = with_live({0, tostring(queued), b[4], tostring(costs[i]),
                            retry_ms(j, queued, bound, costs[i]), tostring(bound)}, j)
      else
        out[i] = {1, add(i)}
        seen[ids[i]] = true
        charge(i)
      end
    end
  end
  commit()
  return {1, out}
end

local part = {}  -- per model index: cost of the new requests
for i = 1, n do
  out[i] = known(i)
  if out[i] and out[i][1] ~= 2 then return {out[i][1], i} end
  if out[i] == nil then
    seen[ids[i]] = true
    local j = tonumber(ARGV[base + 3 * (i - 1) + 2])
    part[j] = (part[j] or 0) + costs[i]
  end
end
for j = 1, m do
  if part[j] and unserved(j) then return {5, j, served} end
end
local new_models, all_cost = 0, 0
for j, c in pairs(part) do
  all_cost = all_cost + c
  if model_state(j)[2] == 0 then new_models = new_models + 1 end
end
for j = 1, m do
  local c = part[j]
  if c then
    local b = model_state(j)
    local queued, bound = nil, nil
    if b[1] > 0 and b[1] + c > model_bound then queued, bound = b[1], model_bound
    elseif total > 0 and total + all_cost > total_bound then queued, bound = total, total_bound
    elseif new_models > 0 and active + new_models > max_models then
      queued, bound = active, max_models
    end
    if queued then
      return with_live({0, j, tostring(queued), b[4], tostring(c),
                        retry_ms(j, queued, bound, c), tostring(bound)}, j)
    end
  end
end
for i = 1, n do
  if out[i] == nil then
    out[i] = {1, add(i)}
    charge(i)
  end
end
commit()
return {1, out}
