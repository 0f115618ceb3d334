-- chatq BEAT: a worker's heartbeat, and its model marked as served by a live worker.
-- KEYS: 1 heartbeat key (chatq:hb:<worker>), 2 served set (chatq:served: a sorted set of
--       model names, each scored by the Unix ms, Redis's clock, until which a live worker
--       serves it).
-- ARGV: 1 heartbeat value (JSON), 2 heartbeat TTL ms, 3 model name ('' while draining: it
--       takes no new requests), 4 'nx' on the first beat (claims the name) or ''.
-- Returns 1, or 0 when 'nx' was asked and a live worker holds the name (nothing written).
-- ENQUEUE reads the served set to refuse requests for a model no live worker serves (its
-- ':live' modes). Scores use Redis's clock, so worker hosts' clocks never matter; a model
-- whose workers are all gone for a day leaves the set.
local ttl = tonumber(ARGV[2])
local set
if ARGV[4] == 'nx' then
  set = redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl, 'NX')
else
  set = redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
end
if not set then return 0 end
if ARGV[3] ~= '' then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], 'GT', now_ms + ttl, ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - 86400000)
end
return 1
