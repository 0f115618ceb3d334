-- chatq CHUNKS (runs after finalize_lib.lua): append a worker's streamed chunks, each only
-- while the request entry it answers is still pending on that worker.
-- KEYS: 2 per chunk: its result stream, the request stream (lane) of its entry.
-- ARGV: 1 group, 2 consumer (the writing worker), then 4 per chunk: entry id, chunk index,
--   msgpack body (the chunk's index, delta and token ids), result TTL s.
-- Returns one value per chunk: 1 appended (or there already), 0 fenced (the entry is not
-- pending on this consumer: another worker claimed it, or it was answered; nothing
-- written), -1 failed (its result key holds another type; the other chunks still land),
-- -2 out of order (the chunk before it is not the stream's last: nothing written).
-- A chunk whose index is not past the stream's last chunk's is there already (a resend
-- after a lost reply) and is not appended twice. One past the next index is refused, not
-- appended with a gap: its predecessor is either still on its way (a call before this one
-- failed, e.g. NOSCRIPT while another client was loading the scripts: appending now would
-- make that one "there already" for good) or lost (Redis restarted from older data: the
-- writer drops the request and the entry's holder resumes it from the chunks that are
-- there).
-- The fence is what lets a claimer resume a half-finished answer: it reads the result
-- stream after its claim, and from then on the worker it took the entry from (paused longer
-- than the heartbeat TTL, cut off by the network, or alive after Redis restarted from older
-- data) cannot add text behind its back.
local function append(result, body, ttl)
  local added = redis.pcall('XADD', result, '*', 't', 'chunk', 'm', body)
  if type(added) == 'table' and added.err then
    -- A key of another type fails this chunk only; anything else (out of memory, a
    -- read-only replica) fails the call, to be sent again (what landed is not repeated).
    if string.sub(added.err, 1, 9) ~= 'WRONGTYPE' then error(added) end
    return -1
  end
  redis.call('EXPIRE', result, ttl)
  return 1
end

local out = {}
local group, consumer = ARGV[1], ARGV[2]
for i = 0, #KEYS / 2 - 1 do
  local result, lane = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local a = 2 + 4 * i
  local index = tonumber(ARGV[a + 2])
  if not holds(lane, group, ARGV[a + 1], consumer) then
    out[i + 1] = 0
  else
    local last = last_index(result)
    if index <= last then
      out[i + 1] = 1
    elseif index > last + 1 then
      out[i + 1] = -2
    else
      out[i + 1] = append(result, ARGV[a + 3], tonumber(ARGV[a + 4]))
    end
  end
end
return out
