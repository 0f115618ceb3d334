-- chatq REQUEUE (runs after finalize_lib.lua): hand an entry this worker holds back to the
-- end of its lane (graceful shutdown).
-- KEYS: 1 lane, 2 final marker, 3 backlog hash, 4 the request id's reservation
-- ARGV: 1 group, 2 entry id, 3 consumer, 4 envelope (the entry's m), 5 cost tokens (its c)
-- Returns 1 requeued (the new entry carries the same m and c: its charge stays, and r = 1:
-- it may have a half-finished answer for its next worker to resume), 0 already
-- answered (acked, its cost released), -1 not pending on this consumer (another worker
-- claimed it: leave it alone). A reservation that named the old entry names the new one
-- (same cancel digest, same TTL): the request stays answerable and cancellable.
local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
if #mine == 0 then return -1 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then
  release(KEYS[3], tonumber(ARGV[5]), 1)
  return 0
end
local entry = redis.call('XADD', KEYS[1], '*', 'm', ARGV[4], 'c', ARGV[5], 'r', '1')
local reservation = redis.call('GET', KEYS[4])
if reservation then
  local old, digest = string.match(reservation, '^(.+) (%S*)$')
  if old == KEYS[1] .. '/' .. ARGV[2] then
    redis.call('SET', KEYS[4], KEYS[1] .. '/' .. entry .. ' ' .. digest, 'KEEPTTL')
  end
end
return 1
