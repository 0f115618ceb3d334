"""Lua scripts that make multi-key state changes atomic on the Redis server.

FINALIZE is the one way any worker (aggregator, reclaim's dead-lettering) writes a final
result: it writes only if no final result exists yet, and always acknowledges the entry.
DEAD_LETTER is FINALIZE's body behind a prefix that records the dead letter in the same step.
ENQUEUE is the producer's one atomic enqueue of one or many requests (idempotency, backlog
bound, XADD); RECLAIM moves a dead worker's pending entries to a live one.
"""

from __future__ import annotations

# FINALIZE's two halves as Lua functions, so a worker's FINALIZE of many requests in one call
# (workers.results.FINALIZE_MANY) runs the very same code:
# write(KEYS, ARGV) acks and deletes the request entry, and writes the final result unless
#   one exists (returns 1 when it wrote, 0 when a final existed); the cost is checked last,
#   after the writes (a bad cost fails the call, as the backlog update it feeds would).
# release(backlog hash, cost tokens, requests) gives a model's backlog back and feeds its
#   drain rate: an EWMA over ~1 s windows of finalized cost tokens.
# The request entry is XACKed and XDELed either way, so the request stream only holds
# queued + pending entries and is never trimmed by MAXLEN (which could drop pending ones).
FINALIZE_FUNCTIONS = """
local function write(KEYS, ARGV)
  local acked = redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  if acked == 1 then
    redis.call('XDEL', KEYS[3], ARGV[2])
  end
  if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
  end
  local ttl = tonumber(ARGV[5])
  redis.call('XADD', KEYS[1], '*', 't', ARGV[3], 'm', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ttl)
  local cost = tonumber(ARGV[6])
  if cost == nil or cost ~= math.floor(cost) or cost < 0 or cost > 2^52 then
    error('cost tokens must be a non-negative integer')
  end
  return 1
end

local function release(backlog, cost, requests)
  -- 0 - cost, not -cost: Lua's -0 reaches Redis as "-0", which HINCRBY rejects.
  local left = redis.call('HINCRBY', backlog, 'tokens', 0 - cost)
  if left < 0 then redis.call('HSET', backlog, 'tokens', 0) end
  if redis.call('HINCRBY', backlog, 'requests', 0 - requests) < 0 then
    redis.call('HSET', backlog, 'requests', 0)
  end
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local win_start = tonumber(redis.call('HGET', backlog, 'win_start_ms') or '0')
  local win_tokens = tonumber(redis.call('HGET', backlog, 'win_tokens') or '0') + cost
  if win_start == 0 then
    redis.call('HSET', backlog, 'win_start_ms', now_ms, 'win_tokens', win_tokens)
  elseif now_ms - win_start >= 5000 then
    -- the window spans an idle gap: start a new one rather than averaging the gap in
    redis.call('HSET', backlog, 'win_start_ms', now_ms, 'win_tokens', cost)
  elseif now_ms - win_start >= 1000 then
    local inst = win_tokens * 1000.0 / (now_ms - win_start)
    local rate = tonumber(redis.call('HGET', backlog, 'rate') or '0')
    if rate <= 0 then rate = inst else rate = 0.7 * rate + 0.3 * inst end
    redis.call('HSET', backlog, 'rate', tostring(rate), 'win_start_ms', now_ms,
               'win_tokens', 0)
  else
    redis.call('HSET', backlog, 'win_tokens', win_tokens)
  end
end
"""

# KEYS: 1 result stream, 2 final marker, 3 request stream, 4 backlog hash
# ARGV: 1 group, 2 entry id, 3 result type ("done"/"error"), 4 msgpack body,
#       5 result TTL s, 6 cost tokens (as added at enqueue)
# Returns 1 when this call wrote the final result, 0 when one already existed.
FINALIZE = (
    FINALIZE_FUNCTIONS
    + """
if write(KEYS, ARGV) == 0 then
  return 0
end
release(KEYS[4], tonumber(ARGV[6]), 1)
return 1
"""
)

# Enqueue N >= 1 requests in one call, in one of two modes.
# KEYS: 1 models set, then M backlog hashes (one per model in the call), then S request
#       streams, then I idempotency keys.
# ARGV: 1 M, 2 S, 3 max backlog tokens, 4 idempotency TTL s, 5 stream field name,
#       6 mode, 7..6+M model names, then 6 per request: msgpack envelope, request id,
#       cost tokens, model index (1..M), stream index (1..S), idempotency key index
#       (1..I, 0 = none).
# Mode "each" (concurrent ``submit`` calls sent together): exactly as if each request had
# been enqueued alone, in order: a known idempotency key (also one set earlier in this call)
# gives its id, a request past its model's backlog bound is refused on its own. Returns
# {1, {outcome, ...}}, one per request: {1, entry id} queued, {2, existing request id}, or
# {0, queued tokens, drain rate (tokens/s as a string, '' if never measured), cost tokens}.
# Mode "all" (``submit_many``): all or nothing. Known idempotency keys give their ids; the
# rest is queued only if every model's part fits under its bound, else nothing is written
# and the reply is {0, model index, queued tokens, drain rate, cost tokens of that model's
# part}; on success {1, {{1, entry id} | {2, existing request id}, ...}}. The client sends
# an idempotency key at most once per "all" call.
# An empty backlog always admits, so one request (or batch) larger than the whole bound is
# still served instead of being refused forever. The consumer group is not touched: workers
# create it at id 0, so entries queued before any worker started are delivered too.
ENQUEUE = """
local m, s = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit, ttl, field = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local each = ARGV[6] == 'each'
local base = 6 + m
local n = (#ARGV - base) / 6
local function idem_key(a)
  local idem = tonumber(ARGV[a + 6])
  if idem > 0 then return KEYS[1 + m + s + idem] end
  return nil
end
-- The request id already queued under request a's idempotency key, else false.
local function known_id(a)
  local key = idem_key(a)
  if key then return redis.call('GET', key) end
  return false
end
local function queued_tokens(j)
  return tonumber(redis.call('HGET', KEYS[1 + j], 'tokens') or '0')
end
local function add(a)
  local stream = KEYS[1 + m + tonumber(ARGV[a + 5])]
  local entry = redis.call('XADD', stream, '*', field, ARGV[a + 1])
  local key = idem_key(a)
  if key then redis.call('SET', key, ARGV[a + 2], 'EX', ttl) end
  return entry
end
local cost = {}
local count = {}
for j = 1, m do cost[j] = 0; count[j] = 0 end
local out = {}
if each then
  local queued = {}
  for i = 0, n - 1 do
    local a = base + 6 * i
    local known = known_id(a)
    if known then
      out[i + 1] = {2, known}
    else
      local j, c = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 3])
      if queued[j] == nil then queued[j] = queued_tokens(j) end
      if queued[j] > 0 and queued[j] + c > limit then
        out[i + 1] = {0, tostring(queued[j]), redis.call('HGET', KEYS[1 + j], 'rate') or '',
                      tostring(c)}
      else
        out[i + 1] = {1, add(a)}
        queued[j] = queued[j] + c
        cost[j] = cost[j] + c
        count[j] = count[j] + 1
      end
    end
  end
else
  local existing = {}
  for i = 0, n - 1 do
    local a = base + 6 * i
    local known = known_id(a)
    if known then
      existing[i + 1] = known
    else
      local j = tonumber(ARGV[a + 4])
      cost[j] = cost[j] + tonumber(ARGV[a + 3])
      count[j] = count[j] + 1
    end
  end
  for j = 1, m do
    if count[j] > 0 then
      local queued = queued_tokens(j)
      if queued > 0 and queued + cost[j] > limit then
        return {0, j, tostring(queued), redis.call('HGET', KEYS[1 + j], 'rate') or '',
                tostring(cost[j])}
      end
    end
  end
  for i = 0, n - 1 do
    if existing[i + 1] then
      out[i + 1] = {2, existing[i + 1]}
    else
      out[i + 1] = {1, add(base + 6 * i)}
    end
  end
end
for j = 1, m do
  if count[j] > 0 then
    redis.call('HINCRBY', KEYS[1 + j], 'tokens', cost[j])
    redis.call('HINCRBY', KEYS[1 + j], 'requests', count[j])
    redis.call('SADD', KEYS[1], ARGV[6 + j])
  end
end
return {1, out}
"""

# KEYS: 1 request stream, 2 heartbeat key of the consumer being reclaimed
# ARGV: 1 group, 2 consumer to reclaim from, 3 claiming consumer, 4 max entries,
#       5 "own" ("1": a worker reclaiming its own pending entries after a restart)
# Returns {-1} when the consumer's heartbeat is live (nothing is touched), else
# {removed, {{entry id, delivery count after this claim, {field, value, ...}}, ...}}.
# Checking the heartbeat, listing and claiming in one script makes "never take from a live
# worker" hold even if it beats again mid-reclaim, and two reclaimers can never both claim
# one entry (the second sees an empty pending list), so min-idle 0 is safe. XCLAIM adds one
# to the delivery count; entries deleted from the stream are dropped from the PEL by Redis.
# The dead consumer is deleted once its pending list is empty (never before: DELCONSUMER
# drops pending entries).
RECLAIM = """
local own = ARGV[5] == '1'
if not own and redis.call('EXISTS', KEYS[2]) == 1 then
  return {-1}
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[2])
local out = {}
if #pending > 0 then
  local ids = {}
  local counts = {}
  for i, p in ipairs(pending) do
    ids[i] = p[1]
    counts[p[1]] = p[4]
  end
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))
  for _, e in ipairs(claimed) do
    out[#out + 1] = {e[1], counts[e[1]] + 1, e[2]}
  end
end
local removed = 0
if not own then
  local left = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
  if #left == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    removed = 1
  end
end
return {removed, out}
"""

# Prefix run before FINALIZE's body, so dead-lettering is one atomic step:
# KEYS: 1-4 as FINALIZE, 5 dead-letter stream
# ARGV: 1-6 as FINALIZE (type "error", code dead_letter), 7 dead stream MAXLEN (approximate),
#       8 consumer that must hold the entry, 9.. field/value pairs of the dead-letter entry
# Returns -1 and changes nothing unless the entry is pending on that consumer (someone else
# finished, requeued or claimed it: not ours to bury), else records the dead letter, bumps
# the model's `dead` counter and runs FINALIZE (1: error result written, 0: one existed).
_DEAD_LETTER_PREFIX = """
local mine = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[8])
if #mine == 0 then return -1 end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', unpack(ARGV, 9))
redis.call('HINCRBY', KEYS[4], 'dead', 1)
"""
DEAD_LETTER = _DEAD_LETTER_PREFIX + FINALIZE

# For an entry whose envelope cannot be decoded (no request id to answer, no cost to give
# back): KEYS 1 request stream, 2 dead-letter stream, 3 backlog hash; ARGV 1 group,
# 2 entry id, 3 dead stream MAXLEN, 4 consumer that must hold it, 5.. dead-letter fields.
# Returns 1 when this call dead-lettered the entry, -1 when it was not pending on that
# consumer.
DEAD_LETTER_RAW = """
local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[4])
if #mine == 0 then return -1 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 5))
redis.call('HINCRBY', KEYS[3], 'dead', 1)
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""
