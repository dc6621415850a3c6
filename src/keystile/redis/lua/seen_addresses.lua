-- KEYS[1]: the set of the addresses one key has used. ARGV: the cap, the TTL in seconds,
-- then the addresses seen since the last flush. Adds them while the set holds fewer than
-- the cap (past it, an address is neither remembered nor reported; a set over it, from
-- before the cap was enforced here, loses random members down to it). Returns how many the
-- set held before, then the addresses it did not hold and now does.
local known = redis.call('SCARD', KEYS[1])
local cap = tonumber(ARGV[1])
local out = {known}
if known > cap then  -- grown past the cap before it was enforced here: back to it
  redis.call('SPOP', KEYS[1], known - cap)
  known = cap
end
for i = 3, #ARGV do
  if known >= cap then break end
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    known = known + 1
    out[#out + 1] = ARGV[i]
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return out
