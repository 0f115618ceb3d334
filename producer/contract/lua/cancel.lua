-- chatq CANCEL: cancel one request, for the caller that holds its cancel token.
-- KEYS: 1 the id's reservation <p>:id:T:<id> (declared so a Redis Cluster client sends the
--   call to the id's slot; a producer's ACL user may read it in a script). The other names
--   are built here from the prefix and the tag (Redis checks every KEYS name of an EVALSHA
--   for read and write access, and a producer's ACL user may only read the final marker and
--   result stream and only write the marker and the cancel stream).
-- ARGV: 1 key prefix, 2 request id, 3 cancel token, 4 marker TTL s, 5 cancel stream MAXLEN
--   (approximate), 6 the hash tag T of the id's partition ("{q<p>}")
-- Keys: <p>:id:T:<id> (the reservation: "<lane>/<entry id> <SHA-1 of the token>"),
--   <p>:final:T:<id>, <p>:res:T:<id>, <p>:cancelled:T:<id> (the marker), <p>:cancel:T (the
--   stream).
-- Returns 1 cancelled; 0 it already has its final result (nothing changes); -1 the token is
-- not this request's (nothing written); -2 no such request: no reservation, final marker or
-- result stream (never queued, or all of it expired; nothing written). A request whose
-- reservation has expired but whose final marker or result stream is still there is
-- finished (0): the three get the same TTL at the final but need not expire together.
-- The marker holds the token and the stream entry carries it: a worker checks it against
-- the reservation's digest too, so a cancel written without this script (a client with raw
-- write access) is ignored unless it has the token.
local prefix, id, token, tag = ARGV[1], ARGV[2], ARGV[3], ARGV[6]
if KEYS[1] ~= prefix .. ':id:' .. tag .. ':' .. id then
  return redis.error_reply("ERR chatq CANCEL: KEYS[1] must be the request id's reservation")
end
local final = prefix .. ':final:' .. tag .. ':' .. id
local reservation = redis.call('GET', KEYS[1])
if not reservation then
  if redis.call('EXISTS', final) == 1 then return 0 end
  if redis.call('EXISTS', prefix .. ':res:' .. tag .. ':' .. id) == 1 then return 0 end
  return -2
end
local digest = string.match(reservation, '^.+ (%S*)$')
if digest == nil or digest == '' or digest ~= redis.sha1hex(token) then return -1 end
if redis.call('EXISTS', final) == 1 then return 0 end
redis.call('SET', prefix .. ':cancelled:' .. tag .. ':' .. id, token, 'EX', tonumber(ARGV[4]))
redis.call('XADD', prefix .. ':cancel:' .. tag, 'MAXLEN', '~', tonumber(ARGV[5]), '*',
           'id', id, 'token', token)
return 1
