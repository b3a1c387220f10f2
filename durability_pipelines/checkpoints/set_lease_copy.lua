-- KEYS[1] a lease copy {owner, epoch, expires (ms, this node's clock), dead}; ARGV[1] owner, ARGV[2] epoch,
-- ARGV[3] ms the lease has left ('0': released / revoked), ARGV[4] 'fence' (the lease's holder of record
-- after a takeover, release or revoke: wins at an equal epoch) or 'refresh' (a holder renewing its copy on
-- demand: never revives a copy fenced at its epoch). A lower epoch never overwrites a higher one. The copy
-- expires a margin before the lease (the time between reading the lease and writing the copy).
local c = redis.call('HMGET', KEYS[1], 'epoch', 'dead')
local ce, e = tonumber(c[1] or '-1'), tonumber(ARGV[2])
if e < ce or (e == ce and ARGV[4] == 'refresh' and c[2] == '1') then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = tonumber(ARGV[3])
local expires = now + left - math.min(1000, math.floor(left / 10))
if left <= 0 then expires = now end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[2], 'expires', string.format('%d', expires),
  'dead', left <= 0 and '1' or '0')
return 1
