-- chatq DEAD_LETTER (this prefix, then finalize_lib.lua's functions and finalize.lua): bury
-- a request that keeps killing workers, in one atomic step with its error result.
-- KEYS: 1-4 as FINALIZE, 5 dead-letter stream
-- ARGV: 1-6 as FINALIZE (type "error", code dead_letter), 7 dead stream MAXLEN
--       (approximate), 8 consumer that must hold the entry, 9.. field/value pairs of the
--       dead-letter entry
-- Returns -1 and changes nothing unless the entry is pending on that consumer (someone else
-- finished, requeued or claimed it: not ours to bury), else records the dead letter, bumps
-- the model's `dead` counter and runs FINALIZE (1: error result written, 0: one existed).
local mine = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[8])
if #mine == 0 then return -1 end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', unpack(ARGV, 9))
redis.call('HINCRBY', KEYS[4], 'dead', 1)
