-- chatq FINALIZE library: the two halves of answering a request, as Lua functions, so
-- FINALIZE (one request), FINALIZE_MANY (a worker's flush), DEAD_LETTER, DEAD_LETTER_RAW
-- and REQUEUE run the same code.
--
-- write(KEYS, ARGV) acks and deletes the request entry, and writes the final result unless
--   one exists; the id's reservation (<prefix>:id:T:<id>, named after the result stream
--   <prefix>:res:T:<id>, T the partition's hash tag: ENQUEUE
--   sets it without a TTL, as a producer may not expire keys) then lives as long as the
--   result. KEYS: 1 result stream, 2 final marker, 3 request stream.
--   ARGV: 1 group, 2 entry id, 3 result type ("done" / "error"), 4 msgpack body,
--   5 result TTL s, 6 cost tokens (the entry's c). Returns two values: 1 when it wrote the
--   final (0 when one existed), and 1 when it acked the entry (0 when the entry was no
--   longer pending: someone acked it before). The cost is checked last, after the writes (a
--   bad cost fails the call, as the backlog update it feeds would).
-- release(backlog hash, cost tokens, requests) gives a model's backlog back and feeds its
--   drain rate: an EWMA of released cost tokens over windows that are busy all along (they
--   open at a release that leaves work queued or running and close when the backlog is
--   empty again, or after 1 s; the first window after 0.25 s).
-- holds(lane, group, entry id, consumer) is true while the entry is pending on that consumer
--   (a missing lane or group holds nothing): the fence of CHUNKS and FINALIZE_MANY.
-- Every acked entry releases its own cost exactly once (the call whose XACK removed it from
-- the pending list releases it), so the backlog returns to 0 however many entries one
-- request id had and however many workers touched them. The request entry is XDELed too,
-- so a request stream only holds queued and pending entries and is never trimmed by MAXLEN
-- (which could drop pending ones).
local function holds(lane, group, entry_id, consumer)
  local mine = redis.pcall('XPENDING', lane, group, entry_id, entry_id, 1, consumer)
  return type(mine) == 'table' and mine.err == nil and #mine == 1
end

-- last_index(result stream): the index of its last entry when that is a chunk, else -1
--   (no stream, or one whose last entry is a final): where CHUNKS goes on from, and what
--   FINALIZE_MANY checks a final's chunks against.
local function last_index(result)
  local last = redis.pcall('XREVRANGE', result, '+', '-', 'COUNT', 1)
  if type(last) ~= 'table' or last.err or #last == 0 then return -1 end
  local f = last[1][2]
  if f[1] ~= 't' or f[2] ~= 'chunk' or f[3] ~= 'm' then return -1 end
  local ok, body = pcall(cmsgpack.unpack, f[4])
  if ok and type(body) == 'table' and type(body['index']) == 'number' then
    return body['index']
  end
  return -1
end

local function write(KEYS, ARGV)
  local acked = redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  if acked == 1 then
    redis.call('XDEL', KEYS[3], ARGV[2])
  end
  local wrote = 0
  if redis.call('EXISTS', KEYS[2]) == 0 then
    local ttl = tonumber(ARGV[5])
    redis.call('XADD', KEYS[1], '*', 't', ARGV[3], 'm', ARGV[4])
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('SET', KEYS[2], ARGV[3], 'EX', ttl)
    local prefix, id = string.match(KEYS[1], '^([^:]*):res:(.*)$')
    if prefix then redis.call('EXPIRE', prefix .. ':id:' .. id, ttl) end
    wrote = 1
  end
  local cost = tonumber(ARGV[6])
  if cost == nil or cost ~= math.floor(cost) or cost < 0 or cost > 2^52 then
    error('cost tokens must be a non-negative integer')
  end
  return wrote, acked
end

-- hooks(job key, job, queue, in-flight set, request id) runs after a write for a request
--   that asks for it: queues its webhook as arq would (job key = "arq:job:" + job id, kept
--   25 h: webhook_job.JOB_TTL_MS; the job id in the queue, due now) and frees the request's
--   slot in its tenant's in-flight set.
local function hooks(job_key, job, queue, inflight, request_id)
  if job_key ~= '' then
    local t = redis.call('TIME')
    local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('SET', job_key, job, 'PX', 90000000)
    redis.call('ZADD', queue, now_ms, string.sub(job_key, 9))
  end
  if inflight ~= '' then
    redis.call('ZREM', inflight, request_id)
  end
end

-- The totals hash (all models' queued tokens, models with requests) sits beside the backlog
-- hashes under the same prefix and partition tag (<p>:backlog:T:<model> → <p>:totals:T); an idle backlog hash expires (keys.IDLE_BACKLOG_TTL_S).
local function release(backlog, cost, requests)
  local prefix, tag = string.match(backlog, '^([^:]*):backlog:({[^}]*})')
  local totals = prefix .. ':totals:' .. tag
  -- 0 - cost, not -cost: Lua's -0 reaches Redis as "-0", which HINCRBY rejects.
  local left = redis.call('HINCRBY', backlog, 'tokens', 0 - cost)
  if left < 0 then
    redis.call('HSET', backlog, 'tokens', 0)
    left = 0
  end
  if redis.call('HINCRBY', totals, 'tokens', 0 - cost) < 0 then
    redis.call('HSET', totals, 'tokens', 0)
  end
  local was = tonumber(redis.call('HGET', backlog, 'requests') or '0')
  if redis.call('HINCRBY', backlog, 'requests', 0 - requests) <= 0 then
    redis.call('HSET', backlog, 'requests', 0)
    redis.call('EXPIRE', backlog, 86400)
    if was > 0 and redis.call('HINCRBY', totals, 'models', -1) < 0 then
      redis.call('HSET', totals, 'models', 0)
    end
  end
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- The rate is what the workers drain while busy (their capacity): a window opens at a
  -- release that leaves work queued or running and ends when the backlog empties, so idle
  -- time never dilutes it (a rate diluted by idle time would make the retry hints, and with
  -- them the load, fall further), while an open window counts all its time as draining,
  -- however long one answer takes (a CPU worker's answers take many seconds).
  local win_start = tonumber(redis.call('HGET', backlog, 'win_start_ms') or '0')
  local win_tokens = tonumber(redis.call('HGET', backlog, 'win_tokens') or '0') + cost
  local rate = tonumber(redis.call('HGET', backlog, 'rate') or '0')
  -- A window closes after 1 s; the first one after 0.25 s, so a rate shows once there is
  -- traffic; one the backlog empties closes after 0.1 s (shorter is too short to count).
  local close_ms = 1000
  if rate <= 0 then close_ms = 250 end
  local empty = left <= 0
  if win_start == 0 then
    if not empty then
      redis.call('HSET', backlog, 'win_start_ms', now_ms, 'win_tokens', cost)
    end
  elseif now_ms - win_start >= close_ms or (empty and now_ms - win_start >= 100) then
    local inst = win_tokens * 1000.0 / (now_ms - win_start)
    if rate <= 0 then rate = inst else rate = 0.7 * rate + 0.3 * inst end
    redis.call('HSET', backlog, 'rate', tostring(rate), 'win_start_ms', empty and 0 or now_ms,
               'win_tokens', 0)
  elseif empty then
    redis.call('HSET', backlog, 'win_start_ms', 0, 'win_tokens', 0)  -- too short to count
  else
    redis.call('HSET', backlog, 'win_tokens', win_tokens)
  end
end
