-- chatq DEAD_LETTER_RAW (runs after finalize_lib.lua): park an entry nobody can answer (its
-- envelope cannot be decoded, or it is not the entry its request id was reserved for) in the
-- dead-letter stream.
-- KEYS: 1 request stream, 2 dead-letter stream, 3 backlog hash
-- ARGV: 1 group, 2 entry id, 3 dead stream MAXLEN (approximate), 4 consumer that must hold
--       it, 5 cost tokens (the entry's c, 0 when it has none; "" for an entry ENQUEUE never
--       charged, added with raw commands: nothing is given back, as its c and its place in
--       the request count would be made up), 6.. field/value pairs of the dead-letter entry
-- Returns 1 when this call dead-lettered the entry, -1 when it was not pending on that
-- consumer.
local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[4])
if #mine == 0 then return -1 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 6))
redis.call('HINCRBY', KEYS[3], 'dead', 1)
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 and ARGV[5] ~= '' then
  release(KEYS[3], tonumber(ARGV[5]), 1)
end
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
