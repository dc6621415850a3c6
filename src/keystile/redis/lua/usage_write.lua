-- One key's share of a usage flush, applied at most once per batch id (KEYS[1] is the
-- batch's marker: a retried flush whose first reply was lost finds it set and adds nothing).
-- KEYS: marker, total, ips, origins, then an hour and a day hash per minute bucket.
-- ARGV: marker ms, hour ttl, day ttl, total ttl, top n, number of buckets; per bucket the
-- minute and the counters; last use (at, ip, origin, inactive at; '' = none); the per-IP
-- then the per-origin table as a count followed by member, count pairs.
-- Returns each bucket's minute totals after the write.
local fields = {'requests', 'bytes_in', 'bytes_out', 'errors_4xx', 'errors_5xx',
                'rate_limited', 'quota_exceeded', 'tokens', 'inactive_attempts'}
local fresh = redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
local n = tonumber(ARGV[6])
local pos = 7
local out = {}
for b = 1, n do
  local minute = ARGV[pos]
  local hour_key, day_key = KEYS[3 + 2 * b], KEYS[4 + 2 * b]
  for i = 1, #fields do
    local value = tonumber(ARGV[pos + i])
    local field = minute .. ':' .. fields[i]
    if fresh and value ~= 0 then
      redis.call('HINCRBY', hour_key, field, value)
      redis.call('HINCRBY', day_key, fields[i], value)
      redis.call('HINCRBY', KEYS[2], fields[i], value)
    end
    out[#out + 1] = tonumber(redis.call('HGET', hour_key, field) or '0')
  end
  if fresh then
    redis.call('EXPIRE', hour_key, ARGV[2])
    redis.call('EXPIRE', day_key, ARGV[3])
  end
  pos = pos + 1 + #fields
end
if fresh then
  local at, ip, origin, inactive = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3]
  pos = pos + 4
  if at ~= '' then
    local seen = redis.call('HGET', KEYS[2], 'last_at')
    if not seen or tonumber(at) >= tonumber(seen) then
      redis.call('HSET', KEYS[2], 'last_at', at, 'last_ip', ip, 'last_origin', origin)
    end
  end
  if inactive ~= '' then
    local seen = redis.call('HGET', KEYS[2], 'last_inactive_at')
    if not seen or tonumber(inactive) >= tonumber(seen) then
      redis.call('HSET', KEYS[2], 'last_inactive_at', inactive)
    end
  end
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  for t = 3, 4 do
    local count = tonumber(ARGV[pos])
    pos = pos + 1
    for j = 1, count do
      redis.call('ZINCRBY', KEYS[t], ARGV[pos + 1], ARGV[pos])
      pos = pos + 2
    end
    if count > 0 then
      redis.call('ZREMRANGEBYRANK', KEYS[t], 0, -(tonumber(ARGV[5]) + 1))
      redis.call('EXPIRE', KEYS[t], ARGV[4])
    end
  end
end
return out
