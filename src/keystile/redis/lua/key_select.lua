-- One page of key ids from the listing index, in id (creation) order.
-- KEYS: blocks of 8 index names (see key_place.lua), one block per key type, one group.
-- ARGV: now in microseconds ('' = no status asked: nothing to settle), the id to start
--   after ('' = the first), how many ids, at most how many keys to settle per block and
--   state, then the positions (1-4: active, rotated, revoked, expired) of the sets to read.
-- Returns: 1 if settling stopped at its bound (call again: the answer would be early),
--   else 0; then the ids.
-- Settling moves the keys whose expiry has passed (by the caller's clock) from their live
-- set to "expired", and back for a clock that went back; each key moves once, so a
-- listing costs what has expired since the last one, bounded per call.
local now, after, count, bound = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local more = 0
if now ~= '' then
  now = tonumber(now)
  for b = 1, #KEYS, 8 do
    local k = function(i) return KEYS[b + i - 1] end
    for s = 1, 2 do
      local due = redis.call('ZRANGEBYSCORE', k(4 + s), '-inf', now, 'WITHSCORES', 'LIMIT', 0, bound)
      for i = 1, #due, 2 do
        redis.call('ZREM', k(4 + s), due[i])
        redis.call('ZADD', k(6 + s), due[i + 1], due[i])
        redis.call('ZREM', k(s), due[i])
        redis.call('ZADD', k(4), 0, due[i])
      end
      local back = redis.call('ZRANGEBYSCORE', k(6 + s), '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, bound)
      for i = 1, #back, 2 do
        redis.call('ZREM', k(6 + s), back[i])
        redis.call('ZADD', k(4 + s), back[i + 1], back[i])
        redis.call('ZREM', k(4), back[i])
        redis.call('ZADD', k(s), 0, back[i])
      end
      if #due >= 2 * bound or #back >= 2 * bound then more = 1 end
    end
  end
end
if more == 1 then return {1} end
local start = (after == '') and '-' or ('(' .. after)
local ids, seen = {}, {}
for b = 1, #KEYS, 8 do
  for a = 5, #ARGV do
    local got = redis.call('ZRANGEBYLEX', KEYS[b + tonumber(ARGV[a]) - 1], start, '+', 'LIMIT', 0, count)
    for _, id in ipairs(got) do
      if not seen[id] then seen[id] = true; ids[#ids + 1] = id end
    end
  end
end
table.sort(ids)
local out = {0}
for i = 1, math.min(count, #ids) do out[i + 1] = ids[i] end
return out
