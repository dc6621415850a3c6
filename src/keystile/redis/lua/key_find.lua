-- Look keys up by digest, on a standalone Redis (or Sentinel's master): one call for a
-- whole batch of lookups, each digest and then its record read here, in one round trip.
-- KEYS: digest names (<ns>:digest:<hmac>), each holding a key id.
-- ARGV: the namespace <ns>: a key id's record is <ns>:key:{<key id>}
--   (keystile.redis.schema.RedisSchema.record).
-- Returns, per digest in order, its key's record (JSON), or false (a nil reply) when the
-- digest is unknown or names an id whose record is gone.
-- The records are not in KEYS (their names come from the digests) and lie in other
-- cluster slots than the digests: never run on a Redis Cluster, where the store reads
-- digests and records apart.
local found = {}
local prefix = ARGV[1] .. ':key:{'
for i, name in ipairs(KEYS) do
  local id = redis.call('GET', name)
  if id then
    found[i] = redis.call('GET', prefix .. id .. '}')
  else
    found[i] = false
  end
end
return found
