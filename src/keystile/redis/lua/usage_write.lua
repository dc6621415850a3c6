-- A usage flush's share for a chunk of keys, one call for many keys (on a Redis Cluster,
-- keys of one hash slot only). Each key's share is applied at most once per (process,
-- sequence): the key's totals hash keeps, per writing process, the highest sequence
-- applied; a retried flush whose first reply was lost carries the same sequence, finds it
-- there and adds nothing. A process's sequences only grow, so the hash holds one field per
-- process (capped, and a process gone an hour is forgotten), not one per flush.
-- KEYS: the totals hash of the chunk's first key, <ns>:usage:{<key id>}:total (on a
-- cluster, the slot every key of the chunk shares: the call goes there); a key's names all
-- share the prefix <ns>:usage:{<key id>}: (so its hash tag and slot): total, m:<hour> (and
-- the earlier h:<hour>), d:<day>, ips, origins; the script makes them from the prefix the
-- head gives and each row's key id (one declared name per call, not one per key: a
-- flush of many keys sends each key's id once). Then, when the index ttl is not 0 (not on
-- a cluster, where the index has a slot of its own), the usage index: each key goes in it
-- with its last use (ZADD GT).
-- ARGV[1], JSON: [process, sequence (text), applied ttl, applied cap, hour ttl, day ttl,
-- total ttl, top n, index ttl, what a key's names start with before its id (<ns>:usage:{),
-- what they go on with after it (}:)].
-- ARGV[2], one row per key-minute, a key's rows one after another (and in one call):
-- [the key ids, the minutes, the values], the values 13 columns of one value per row,
-- one column after another: the 9 counters, last used at, ip, origin, last inactive
-- attempt at (the value of column c for row k is values[(c - 1) * rows + k]); the times
-- as numbers, what a row lacks null (nil). ARGV[3]: [ips, origins], each a map of key id ->
-- {member: count} for the keys of the chunk that have any. Both in MessagePack where this
-- server's Lua has cmsgpack (the store asks first), else in JSON (a JSON text starts '[').
-- The minute counts of an hour live in its hash m:<hour> as one field per minute of the hour
-- (0-59), the counters one after another, trailing zeros left out, each in base 64 most
-- significant digit first: a digit is one byte, 0-63, and the last one of a counter carries
-- 64 more (a small hash stays compact: 240,2400,120000 takes 7 bytes, not 15; and the bytes
-- stay ASCII). A minute written by the earlier layout, in h:<hour> with the counters as
-- comma-separated decimals, moves to m:<hour> the first time the minute is written again.
-- Returns the totals of every bucket after the write, in order: each bucket's counters
-- comma-separated, the buckets joined by ';'.
local head = cjson.decode(ARGV[1])
local chunk, tops, null
if string.byte(ARGV[2], 1) == 91 then  -- '[': JSON
  chunk, tops, null = cjson.decode(ARGV[2]), cjson.decode(ARGV[3]), cjson.null
else
  chunk, tops, null = cmsgpack.unpack(ARGV[2]), cmsgpack.unpack(ARGV[3]), nil
end
local ids, minutes, values = chunk[1], chunk[2], chunk[3]
local process, seq = head[1], tonumber(head[2])
local applied_ttl, cap = head[3], head[4]
local hour_ttl, day_ttl, total_ttl, keep = head[5], head[6], head[7], head[8]
local index_ttl, before_id, after_id = head[9], head[10], head[11]
local index = nil
if index_ttl > 0 then index = KEYS[#KEYS] end
local fields = {'requests', 'bytes_in', 'bytes_out', 'errors_4xx', 'errors_5xx',
                'rate_limited', 'quota_exceeded', 'tokens', 'inactive_attempts'}
local nfields = #fields
local rows = #ids  -- a column's values: the counters', then at, ip, origin, inactive at
local out = {}

local function text(value)
  return string.format('%.0f', value)
end

-- A time as the totals hash keeps it: every digit its double needs (it reads back the same).
local function stamp(value)
  return string.format('%.17g', value)
end

-- The position of the last counter not 0 (1 when every one is).
local function last_counter(counts)
  local last = 1
  for i = 1, nfields do
    if counts[i] ~= 0 then last = i end
  end
  return last
end

-- The counters up to the last one not 0, comma-separated decimals (the reply; and the
-- earlier layout's hour hash).
local function pack(counts)
  local parts = {}
  for i = 1, last_counter(counts) do parts[i] = text(counts[i]) end
  return table.concat(parts, ',')
end

-- The same in base-64 digits, as m:<hour> holds them.
local function pack_digits(counts)
  local parts = {}
  for i = 1, last_counter(counts) do
    local value = counts[i]
    local digits = {string.char(64 + value % 64)}
    value = math.floor(value / 64)
    while value > 0 do
      table.insert(digits, 1, string.char(value % 64))
      value = math.floor(value / 64)
    end
    parts[i] = table.concat(digits)
  end
  return table.concat(parts)
end

local function unpack_digits(packed, counts)
  local i, value = 1, 0
  for p = 1, #packed do
    local byte = string.byte(packed, p)
    if byte >= 64 then
      counts[i] = value * 64 + byte - 64
      i, value = i + 1, 0
    else
      value = value * 64 + byte
    end
  end
end

local function unpack_text(packed, counts)
  local i = 1
  for value in string.gmatch(packed, '[^,]+') do
    counts[i] = counts[i] + tonumber(value)
    i = i + 1
  end
end

-- A minute's counts in the hour's hash, and (the first time the minute is written) those
-- the earlier layout's hash holds for it, moved over.
local function minute_counts(prefix, hour, field, fresh)
  local counts = {0, 0, 0, 0, 0, 0, 0, 0, 0}
  local packed = redis.call('HGET', prefix .. 'm:' .. hour, field)
  if packed then
    unpack_digits(packed, counts)
    return counts
  end
  local earlier = prefix .. 'h:' .. hour
  packed = redis.call('HGET', earlier, field)
  if packed then
    unpack_text(packed, counts)
    if fresh then redis.call('HDEL', earlier, field) end
  end
  return counts
end

-- Whether this process's share with this sequence is new to the key (and note it), and
-- whether the totals hash had no field of this process (a new writer, or a new hash). The
-- key's totals hash holds, per writing process, the latest sequence applied (field
-- p:<process>). A process's first write to the key forgets the processes whose latest
-- sequence (near their clock in ms) is more than the applied ttl older than this one, and
-- past the cap the one written longest ago.
local function first_time(total)
  local field = 'p:' .. process
  local seen = redis.call('HGET', total, field)
  if seen and tonumber(seen) >= seq then
    return false, false
  end
  redis.call('HSET', total, field, head[2])
  if seen then
    return true, false
  end
  local all = redis.call('HGETALL', total)
  local oldest, low, kept = nil, nil, 0
  for i = 1, #all, 2 do
    local name = all[i]
    if string.sub(name, 1, 2) == 'p:' and name ~= field then
      local value = tonumber(all[i + 1])
      if value < seq - applied_ttl * 1000 then
        redis.call('HDEL', total, name)
      else
        kept = kept + 1
        if low == nil or value < low then oldest, low = name, value end
      end
    end
  end
  if kept >= cap and oldest then redis.call('HDEL', total, oldest) end
  return true, true
end

-- A name's TTL is set when a write makes it (its first field or member) and, for those
-- that outlive a day (totals, addresses), pushed on when the key's day hash is new: a
-- key's later flushes that day send no EXPIRE (nor trim an address table no member
-- joined).
local key_id, prefix, total, fresh, newer, extend = nil, nil, nil, false, false, false
for k = 1, #ids do
  local first = ids[k] ~= key_id  -- the key's first row in this call: its share's checks
  if first then
    key_id = ids[k]
    prefix = before_id .. key_id .. after_id
    total = prefix .. 'total'
    fresh, newer = first_time(total)
    extend = false
  end
  local minute = minutes[k]
  local hour = text(math.floor(minute / 60))
  local field = text(minute % 60)
  local counts = minute_counts(prefix, hour, field, fresh)
  local new_day = false
  if fresh then
    local day_key = prefix .. 'd:' .. text(math.floor(minute / 1440))
    for i = 1, nfields do
      local value = values[(i - 1) * rows + k]
      if value ~= 0 then
        counts[i] = counts[i] + value
        -- (a day's counter equal to what it was given is new: counters only grow)
        if redis.call('HINCRBY', day_key, fields[i], text(value)) == value then
          new_day = true
        end
        redis.call('HINCRBY', total, fields[i], text(value))
      end
    end
    local hour_key = prefix .. 'm:' .. hour
    if redis.call('HSET', hour_key, field, pack_digits(counts)) == 1 then
      redis.call('EXPIRE', hour_key, hour_ttl)
    end
    if new_day then
      redis.call('EXPIRE', day_key, day_ttl)
      extend = true
    end
  end
  out[#out + 1] = pack(counts)
  local at, inactive = values[nfields * rows + k], values[(nfields + 3) * rows + k]
  if fresh then
    -- The latest use wins (a key's rows come in minute order; another process's may be later).
    if at ~= null then
      local seen = redis.call('HGET', total, 'last_at')
      if not seen or at >= tonumber(seen) then
        local ip, origin = values[(nfields + 1) * rows + k], values[(nfields + 2) * rows + k]
        redis.call('HSET', total, 'last_at', stamp(at), 'last_ip', ip == null and '' or ip,
                   'last_origin', origin == null and '' or origin)
      end
    end
    if inactive ~= null then
      local seen = redis.call('HGET', total, 'last_inactive_at')
      if not seen or inactive >= tonumber(seen) then
        redis.call('HSET', total, 'last_inactive_at', stamp(inactive))
      end
    end
    if (first and newer) or new_day then redis.call('EXPIRE', total, total_ttl) end
    if first then
      for t = 1, 2 do
        local members = tops[t][key_id]
        if members then
          local name = prefix .. (t == 1 and 'ips' or 'origins')
          local joined = false
          for member, count in pairs(members) do
            if tonumber(redis.call('ZINCRBY', name, text(count), member)) == count then
              joined = true  -- (a member whose score is what it was given is new)
            end
          end
          if joined then redis.call('ZREMRANGEBYRANK', name, 0, -(keep + 1)) end
          if joined or extend then redis.call('EXPIRE', name, total_ttl) end
        end
      end
    end
  end
  if index then
    local score = 0
    if at ~= null then score = at elseif inactive ~= null then score = inactive end
    redis.call('ZADD', index, 'GT', score, key_id)
  end
end
if index then redis.call('EXPIRE', index, index_ttl) end
return table.concat(out, ';')
