-- chatq CHUNKS (runs after finalize_lib.lua): append a worker's streamed chunks, each only
-- while the request entry it answers is still pending on that worker.
-- KEYS: 2 per chunk: its result stream, the request stream (lane) of its entry.
-- ARGV: 1 group, 2 consumer (the writing worker), then 4 per chunk: entry id, chunk index,
--   msgpack body (the chunk's index, delta and token ids), result TTL s.
-- Returns one value per chunk: 1 appended (or there already), 0 fenced (the entry is not
-- pending on this consumer: another worker claimed it, or it was answered; nothing
-- written), -1 failed (its result key holds another type; the other chunks still land). A chunk whose index is not past the stream's last chunk's is there already (a
-- resend after a lost reply) and is not appended twice.
-- The fence is what lets a claimer resume a half-finished answer: it reads the result
-- stream after its claim, and from then on the worker it took the entry from (paused longer
-- than the heartbeat TTL, cut off by the network, or alive after Redis restarted from older
-- data) cannot add text behind its back.
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

local out = {}
local group, consumer = ARGV[1], ARGV[2]
for i = 0, #KEYS / 2 - 1 do
  local result, lane = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local a = 2 + 4 * i
  if not holds(lane, group, ARGV[a + 1], consumer) then
    out[i + 1] = 0
  elseif last_index(result) >= tonumber(ARGV[a + 2]) then
    out[i + 1] = 1
  else
    local added = redis.pcall('XADD', result, '*', 't', 'chunk', 'm', ARGV[a + 3])
    if type(added) == 'table' and added.err then
      -- A key of another type fails this chunk only; anything else (out of memory, a
      -- read-only replica) fails the call, to be sent again (what landed is not repeated).
      if string.sub(added.err, 1, 9) ~= 'WRONGTYPE' then return redis.error_reply(added.err) end
      out[i + 1] = -1
    else
      redis.call('EXPIRE', result, tonumber(ARGV[a + 4]))
      out[i + 1] = 1
    end
  end
end
return out
