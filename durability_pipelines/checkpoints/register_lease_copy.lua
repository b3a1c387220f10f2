-- Redis Cluster lease copies (see RedisLeaseManager). KEYS[1] the lease hash, KEYS[2] the set of its copies;
-- ARGV[1] owner, ARGV[2] epoch, ARGV[3] the copy key. If the lease is this holder's and unexpired, the copy
-- is registered (a takeover then fences it) in the same step: returns {1, ms left} or {0, owner, epoch}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local l = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'expires')
if l[1] ~= ARGV[1] or l[2] ~= ARGV[2] or tonumber(l[3] or '0') <= now then
  return {0, l[1] or false, l[2] or false}
end
redis.call('SADD', KEYS[2], ARGV[3])
return {1, tonumber(l[3]) - now}
