-- keystile's moving window: decides every window of one key atomically, on Redis' clock.
-- KEYS: one list per window of the key, newest admission first (hash-tagged by key id).
-- ARGV: cost, now in ms ('' = Redis' own clock), then amount and window ms per window.
-- Returns, as one space-separated string (one reply line to parse): allowed (1/0), now ms,
-- then per window: entries inside the window after the decision, the oldest of them
-- (-1: none), the entry that refused (-1: none).
-- Times are whole milliseconds: 13 digits, exact in Lua's doubles until the year 2286.
-- A list's newest entry (its head) holds its time whole; every other entry holds its time
-- modulo a power of two at least 4 windows long (for a 1-minute window, below 2^18: Redis
-- packs such a number in 4 bytes where 13 digits take 9) and is read back as the one time
-- in (head - 3 windows, head + 1 window] it stands for. That is exact: the call that
-- pushed the head dropped every entry older than a window before it, and one pushed
-- later by a clock gone back (up to a window) is at most that far ahead. An entry of 13
-- digits elsewhere in a list was written whole (before this encoding) and is read so.
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
local modulus = {}
local heads = {}
-- The time entry `index` of list i holds (its value `value`; the head is read whole).
local function time_of(i, index, value)
  value = tonumber(value)
  local m = modulus[i]
  if index == 0 or value >= m then return value end
  local ahead = heads[i] + tonumber(ARGV[2 + 2 * i])
  return ahead - ((ahead - value) % m)
end
-- Drops the entries of list i past its window (they can never refuse again: time only
-- moves on); returns how many are left and the oldest of them (-1: none).
local function trim(i)
  local window = tonumber(ARGV[2 + 2 * i])
  local length = redis.call('LLEN', KEYS[i])
  local last, oldest = -1, -1
  if length > 0 then
    local tail = time_of(i, length - 1, redis.call('LINDEX', KEYS[i], -1))
    if tail >= now - window then
      last, oldest = length - 1, tail  -- the usual case: every entry is inside the window
    else
      local low, high = 0, length - 1
      while low <= high do
        local mid = math.floor((low + high) / 2)
        local value = time_of(i, mid, redis.call('LINDEX', KEYS[i], mid))
        if value >= now - window then
          last, oldest, low = mid, value, mid + 1
        else
          high = mid - 1
        end
      end
      if last < 0 then
        redis.call('DEL', KEYS[i])
      else
        redis.call('LTRIM', KEYS[i], 0, last)
      end
    end
  end
  return last + 1, oldest
end
for i = 1, n do
  local amount = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  local m = 2
  while m < 4 * window + 1 do m = m * 2 end
  modulus[i] = m
  local head = redis.call('LINDEX', KEYS[i], 0)
  heads[i] = head and tonumber(head) or now
  refused_by[i] = -1
  if cost > amount then
    allowed = 0
    refused_by[i] = now
  else
    local entry = redis.call('LINDEX', KEYS[i], amount - cost)
    if entry then
      entry = time_of(i, amount - cost, entry)
      if entry >= now - window then
        allowed = 0
        refused_by[i] = entry
      end
    end
  end
end
if allowed == 1 then
  -- Lua's stack takes fewer than 8,000 results from one unpack(): push in chunks.
  for i = 1, n do
    local amount = tonumber(ARGV[1 + 2 * i])
    local m = modulus[i]
    local stamps = {}
    for j = 1, math.min(cost, 1000) do stamps[j] = now % m end
    -- The entries left (inside the window) are read against the new head from here on;
    -- the old head now holds its time modulo m; the new one, pushed last, whole.
    if trim(i) > 0 then
      redis.call('LSET', KEYS[i], 0, heads[i] % m)
    end
    for pushed = 0, cost - 1, 1000 do
      local count = math.min(1000, cost - pushed)
      if pushed + count == cost then stamps[count] = now end
      redis.call('LPUSH', KEYS[i], unpack(stamps, 1, count))
    end
    heads[i] = now
    redis.call('LTRIM', KEYS[i], 0, amount - 1)
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2 + 2 * i]))
  end
end
local out = {allowed, now}
for i = 1, n do
  local inside, oldest = trim(i)
  out[#out + 1] = inside
  out[#out + 1] = oldest
  out[#out + 1] = refused_by[i]
end
return table.concat(out, ' ')
