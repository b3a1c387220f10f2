local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, k in ipairs(KEYS) do redis.call('HSET', k, 'acks', 0, 'flushed_ms', string.format('%d', now)) end
return #KEYS
