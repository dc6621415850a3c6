-- Place a key in the listing index (and, on a standalone Redis, write its record with it).
-- KEYS: with ARGV[1] ~= '', first the key's record (hash-tagged by key id); then blocks of
--   8 index names of one key type in one group (a project, or every project), all in one
--   slot: active, rotated, revoked, expired, ends-active, ends-rotated, gone-active,
--   gone-rotated (keystile.redis.schema.RedisSchema.listing).
-- ARGV: the record's JSON to SET XX ('' = no record), the key id, its stored state
--   (active, rotated, revoked; or none: take the id out of the index), its expiry in
--   microseconds ('' = never).
-- Returns 0 when the record was to be written and there is none (nothing changed), else 1.
-- A key's state only moves forward (active -> rotated -> revoked): a placement that would
-- move it back (a late or concurrent writer's) leaves the state as it is.
local first = 1
if ARGV[1] ~= '' then
  if not redis.call('SET', KEYS[1], ARGV[1], 'XX') then return 0 end
  first = 2
end
local id, state, ends = ARGV[2], ARGV[3], ARGV[4]
local RANK = {active = 0, rotated = 1, revoked = 2}
for b = first, #KEYS, 8 do
  local k = function(i) return KEYS[b + i - 1] end
  local now = 0
  if redis.call('ZSCORE', k(3), id) then now = 2
  elseif redis.call('ZSCORE', k(2), id) or redis.call('ZSCORE', k(8), id) then now = 1 end
  if state == 'none' or RANK[state] >= now then
    for i = 1, 8 do redis.call('ZREM', k(i), id) end
    if state == 'revoked' then
      redis.call('ZADD', k(3), 0, id)
    elseif state ~= 'none' then
      local s = (state == 'active') and 1 or 2
      -- Live until a listing finds the expiry passed (key_select.lua settles it).
      redis.call('ZADD', k(s), 0, id)
      if ends ~= '' then redis.call('ZADD', k(4 + s), ends, id) end
    end
  end
end
return 1
