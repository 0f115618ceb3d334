-- chatq FINALIZE (runs after finalize_lib.lua): answer one request, effectively once.
-- KEYS: 1 result stream, 2 final marker, 3 request stream, 4 backlog hash
-- ARGV: 1 group, 2 entry id, 3 result type ("done" / "error"), 4 msgpack body,
--       5 result TTL s, 6 cost tokens (the entry's c field: what ENQUEUE charged)
-- Returns 1 when this call wrote the final result, 0 when one already existed. The entry's
-- cost is released when this call acked it.
local wrote, acked = write(KEYS, ARGV)
if acked == 1 then
  release(KEYS[4], tonumber(ARGV[6]), 1)
end
return wrote
