"""Lua scripts that make multi-key state changes atomic on the Redis server.

FINALIZE is the one way any worker (aggregator, reclaim's dead-lettering) writes a final
result: it writes only if no final result exists yet, and always acknowledges the entry.
"""

from __future__ import annotations

# KEYS: 1 result stream, 2 final marker, 3 request stream, 4 backlog hash
# ARGV: 1 group, 2 entry id, 3 result type ("done"/"error"), 4 msgpack body,
#       5 result TTL s, 6 cost tokens (as added at enqueue)
# Returns 1 when this call wrote the final result, 0 when one already existed.
# The request entry is XACKed and XDELed either way, so the request stream only holds
# queued + pending entries and is never trimmed by MAXLEN (which could drop pending ones).
# The backlog's drain rate is an EWMA over ~1 s windows of finalized cost tokens.
FINALIZE = """
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
local left = redis.call('HINCRBY', KEYS[4], 'tokens', -cost)
if left < 0 then redis.call('HSET', KEYS[4], 'tokens', 0) end
redis.call('HINCRBY', KEYS[4], 'requests', -1)
if tonumber(redis.call('HGET', KEYS[4], 'requests')) < 0 then
  redis.call('HSET', KEYS[4], 'requests', 0)
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local win_start = tonumber(redis.call('HGET', KEYS[4], 'win_start_ms') or '0')
local win_tokens = tonumber(redis.call('HGET', KEYS[4], 'win_tokens') or '0') + cost
if win_start == 0 then
  redis.call('HSET', KEYS[4], 'win_start_ms', now_ms, 'win_tokens', win_tokens)
elseif now_ms - win_start >= 1000 then
  local inst = win_tokens * 1000.0 / (now_ms - win_start)
  local rate = tonumber(redis.call('HGET', KEYS[4], 'rate') or '0')
  if rate <= 0 then rate = inst else rate = 0.7 * rate + 0.3 * inst end
  redis.call('HSET', KEYS[4], 'rate', tostring(rate), 'win_start_ms', now_ms, 'win_tokens', 0)
else
  redis.call('HSET', KEYS[4], 'win_tokens', win_tokens)
end
return 1
"""
