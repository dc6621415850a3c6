-- KEYS[1]: the key's buckets (a hash: minute -> tokens), hash-tagged by key id.
-- ARGV: tokens, quota, mode, now in ms ('' = Redis' own clock).
-- Returns: allowed, tokens spent in the rolling hour afterwards, oldest minute (-1: none),
-- now in ms.
local tokens, quota, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now
if ARGV[4] ~= '' then now = tonumber(ARGV[4]) else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local minute = math.floor(now / 60000)
local spent, oldest = 0, -1
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local m = tonumber(fields[i])
  if m <= minute - 60 then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    spent = spent + tonumber(fields[i + 1])
    if oldest < 0 or m < oldest then oldest = m end
  end
end
local ok = true
if mode == 'reserve' then ok = spent + tokens <= quota
elseif mode == 'check' then ok = spent < quota end
if ok and mode ~= 'check' and tokens > 0 then
  redis.call('HINCRBY', KEYS[1], minute, tokens)
  redis.call('PEXPIRE', KEYS[1], 3660000)
  spent = spent + tokens
  if oldest < 0 then oldest = minute end
end
return {ok and 1 or 0, spent, oldest, now}
