-- chatq FINALIZE_MANY (runs after finalize_lib.lua): FINALIZE for many entries in one call.
-- KEYS: 6 per final: FINALIZE's 4, then the webhook's arq job key and the tenant's in-flight
--   set (where the request has none, the slot repeats its result key: an empty key name would
--   fail every ACL check, so "none" is a key the caller may touch anyway); last, one more:
--   the webhook queue (arq's sorted set).
-- ARGV: 9 per final: FINALIZE's 6, then the request id, the webhook job ("" for none) and
--   the index of the request's last chunk (-1: it streamed none); last, one more: the
--   consumer that must hold every entry ("" for no such check).
-- Returns FINALIZE's 1 / 0 for each final, 2 where the entry is not pending on that
-- consumer (fenced: nothing written, nothing acked), 3 where the stream's last chunk is before
-- the request's last chunk (nothing written, nothing acked: its chunks have not all landed,
-- so a final now would end the stream before them), or -1 where one failed (pcall: one bad
-- request must not stop the others' finals).
-- The fence: a worker that lost its entry (paused longer than the heartbeat TTL, cut off by
-- the network, or alive after Redis restarted from older data) must not answer it behind
-- the back of the worker that took it over, whose answer may continue a stream of chunks
-- the first one never saw.
-- Only the call that writes a request's final queues its webhook and frees its tenant slot
-- (hooks, in the same atomic step): a redelivered request answered twice queues one
-- delivery, and a worker killed after its final was written has queued it already.
-- One release per backlog hash for the costs of all the entries acked (one backlog update
-- and rate sample per flush, not per request: most of FINALIZE's Redis time), and one
-- EVALSHA per flush instead of one per request (packing commands on the client was most of
-- a worker's CPU per request). All keys of one call must live on one node: fine for one
-- Redis; a cluster needs the per-request form.
local out = {}
local freed = {}
local backlogs = {}
local queue = KEYS[#KEYS]
local consumer = ARGV[#ARGV]
for i = 0, (#KEYS - 1) / 6 - 1 do
  local k, a = 6 * i, 9 * i
  local keys = {KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]}
  local args = {ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]}
  local ok, wrote, acked = true, 2, 0
  if consumer == '' or holds(keys[3], args[1], args[2], consumer) then
    local last_chunk = tonumber(ARGV[a + 9]) or -1
    if last_chunk >= 0 and redis.call('EXISTS', keys[2]) == 0
        and last_index(keys[1]) < last_chunk then
      wrote = 3
    else
      ok, wrote, acked = pcall(write, keys, args)
    end
  end
  if ok and wrote >= 2 then
    out[i + 1] = wrote
  elseif ok then
    out[i + 1] = wrote
    if wrote == 1 then
      local none = keys[1]
      local job_key, inflight = KEYS[k + 5], KEYS[k + 6]
      if job_key == none then job_key = '' end
      if inflight == none then inflight = '' end
      hooks(job_key, ARGV[a + 8], queue, inflight, ARGV[a + 7])
    end
    if acked == 1 then
      local f = freed[keys[4]]
      if f == nil then
        f = {0, 0}
        freed[keys[4]] = f
        backlogs[#backlogs + 1] = keys[4]
      end
      f[1] = f[1] + tonumber(args[6])
      f[2] = f[2] + 1
    end
  else
    out[i + 1] = -1
  end
end
for _, backlog in ipairs(backlogs) do
  release(backlog, freed[backlog][1], freed[backlog][2])
end
return out
