-- chatq RECLAIM: move a dead worker's pending entries to a live one.
-- KEYS: 1 request stream, 2 heartbeat key of the consumer being reclaimed, 3 heartbeat key
--       of the claiming worker (in the stream's partition)
-- ARGV: 1 group, 2 consumer to reclaim from, 3 claiming consumer, 4 max entries,
--       5 "own" ("1": a worker reclaiming its own pending entries after a restart)
-- Returns {-1} when the consumer's heartbeat is live, {-2} when the claimer's own heartbeat
-- is missing (nothing is touched either way), else
-- {removed, {{entry id, delivery count after this claim, {field, value, ...}}, ...}}.
-- A claimer beats on time, so its own key missing means Redis lost writes (restarted from
-- older data): every heartbeat may be gone, live workers' too, so no death verdict now.
-- Checking the heartbeat, listing and claiming in one script makes "never take from a live
-- worker" hold even if it beats again mid-reclaim, and two reclaimers can never both claim
-- one entry (the second sees an empty pending list), so min-idle 0 is safe. XCLAIM adds one
-- to the delivery count; entries deleted from the stream are dropped from the PEL by Redis.
-- The dead consumer is deleted once its pending list is empty (never before: DELCONSUMER
-- drops pending entries).
local own = ARGV[5] == '1'
if not own then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    return {-1}
  end
  if redis.call('EXISTS', KEYS[3]) == 0 then
    return {-2}
  end
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
