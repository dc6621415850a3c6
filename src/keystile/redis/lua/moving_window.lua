-- keystile's moving window: decides every window of one key atomically, on Redis' clock.
-- KEYS: one list per window of the key, newest admission first (hash-tagged by key id).
-- ARGV: cost, now in ms ('' = Redis' own clock), then amount and window ms per window.
-- Returns, as one space-separated string (one reply line to parse): allowed (1/0), now ms,
-- then per window: entries inside the window after the decision, the oldest of them
-- (-1: none), the entry that refused (-1: none).
-- Times are whole milliseconds: 13 digits, exact in Lua's doubles until the year 2286.
local cost = tonumber(ARGV[1])
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local n = #KEYS
local allowed = 1
local refused_by = {}
for i = 1, n do
  local amount = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  refused_by[i] = -1
  if cost > amount then
    allowed = 0
    refused_by[i] = now
  else
    local entry = redis.call('LINDEX', KEYS[i], amount - cost)
    if entry and tonumber(entry) >= now - window then
      allowed = 0
      refused_by[i] = tonumber(entry)
    end
  end
end
if allowed == 1 then
  -- Lua's stack takes fewer than 8,000 results from one unpack(): push in chunks.
  local stamps = {}
  for j = 1, math.min(cost, 1000) do stamps[j] = now end
  for i = 1, n do
    local amount = tonumber(ARGV[1 + 2 * i])
    for pushed = 0, cost - 1, 1000 do
      redis.call('LPUSH', KEYS[i], unpack(stamps, 1, math.min(1000, cost - pushed)))
    end
    redis.call('LTRIM', KEYS[i], 0, amount - 1)
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2 + 2 * i]))
  end
end
local out = {allowed, now}
for i = 1, n do
  local window = tonumber(ARGV[2 + 2 * i])
  local length = redis.call('LLEN', KEYS[i])
  local last, oldest = -1, -1
  if length > 0 then
    local tail = tonumber(redis.call('LINDEX', KEYS[i], -1))
    if tail >= now - window then
      last, oldest = length - 1, tail  -- the usual case: every entry is inside the window
    else
      local low, high = 0, length - 1
      while low <= high do
        local mid = math.floor((low + high) / 2)
        local value = tonumber(redis.call('LINDEX', KEYS[i], mid))
        if value >= now - window then
          last, oldest, low = mid, value, mid + 1
        else
          high = mid - 1
        end
      end
      -- Entries past the window can never refuse again (time only moves on): drop them.
      if last < 0 then
        redis.call('DEL', KEYS[i])
      else
        redis.call('LTRIM', KEYS[i], 0, last)
      end
    end
  end
  out[#out + 1] = last + 1
  out[#out + 1] = oldest
  out[#out + 1] = refused_by[i]
end
return table.concat(out, ' ')
