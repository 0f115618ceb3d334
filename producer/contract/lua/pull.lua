-- chatq PULL: read up to N new entries from a model's lanes, lanes in aging order.
-- KEYS: the model's lanes, highest first. ARGV: 1 group, 2 consumer, 3 count, 4 aging ms.
-- Returns {missing, {lane index (1-based), entry id, {field, value, ...}}, ...};
-- missing = 1 when a lane or its group does not exist (the worker re-creates groups).
-- A lane's score is its level (high 2, normal 1, low 0) plus the age of its oldest
-- undelivered entry divided by the aging time; the age comes from the entry id (Redis
-- server milliseconds at XADD), so the clocks of producers and workers do not matter.
-- XREADGROUP without BLOCK is allowed in scripts; only when every lane is empty does the
-- worker block on a plain XREADGROUP.
local group, consumer = ARGV[1], ARGV[2]
local want, aging = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local missing = 0
local order = {}
for i, key in ipairs(KEYS) do
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', key)
  local last = nil
  if ok then
    for _, g in ipairs(groups) do
      for j = 1, #g, 2 do
        if g[j] == 'name' and g[j + 1] == group then
          for k = 1, #g, 2 do
            if g[k] == 'last-delivered-id' then last = g[k + 1] end
          end
        end
      end
    end
  end
  if last == nil then
    missing = 1
  else
    local nxt = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', 1)
    if #nxt > 0 then
      local ms = tonumber(string.match(nxt[1][1], '^(%d+)'))
      local level = #KEYS - i
      order[#order + 1] = {i, level + math.max(0, now - ms) / aging}
    end
  end
end
table.sort(order, function(a, b) return a[2] > b[2] end)
local out = {missing}
for _, lane in ipairs(order) do
  if want <= 0 then break end
  local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
                         'STREAMS', KEYS[lane[1]], '>')
  if res then
    for _, e in ipairs(res[1][2]) do
      out[#out + 1] = {lane[1], e[1], e[2]}
      want = want - 1
    end
  end
end
return out
