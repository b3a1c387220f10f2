-- A checkpoint key that holds no position (garbage, or another Redis type) replaced by one, fenced like a
-- save and only if the key still holds what was found. KEYS[1] checkpoint, KEYS[2] lease, KEYS[3] history,
-- KEYS[4] sentinel (where a SHARD_END / TRIM_HORIZON / LATEST goes: the shared key then holds nothing).
-- ARGV[1] the type found ('string' for a garbage value), ARGV[2] sequence, ARGV[3] writer, ARGV[4] epoch
-- ('' = unfenced), ARGV[5] run id, ARGV[6] reason, ARGV[7] history maxlen, ARGV[8] ttl ms ('' = keep the key's),
-- ARGV[9] the garbage value found (type 'string'), ARGV[10] 'sentinel' when the unusable key is KEYS[4]. Returns {'replaced'|'changed'|'lease_lost', owner, epoch}.
if ARGV[4] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local l = redis.call('HMGET', KEYS[2], 'owner', 'epoch', 'expires')
  if l[1] ~= ARGV[3] or l[2] ~= ARGV[4] or tonumber(l[3] or '0') <= now then
    return {'lease_lost', l[1] or false, l[2] or false}
  end
end
if ARGV[10] == 'sentinel' then
  -- The sentinel key holds another type: it goes (fenced, and only if still of that type); the caller then
  -- saves the position through the monotonic save, which writes the sentinel again if there is one.
  if redis.call('TYPE', KEYS[4]).ok ~= ARGV[1] then return {'changed', false, false} end
  redis.call('DEL', KEYS[4])
  if ARGV[7] ~= '0' then
    -- `seq` is what the shared key holds (untouched here): the history's newest entry always says what the shared
    -- key was left with (checkpoint.lua compares it, to tell a foreign rewind); the save that follows records ARGV[2].
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'prev', '<redis ' .. ARGV[1] .. ' at the sentinel key>',
      'seq', redis.call('GET', KEYS[1]) or '', 'writer', ARGV[3], 'epoch', ARGV[4], 'run', ARGV[5], 'reason', ARGV[6])
  end
  return {'replaced', false, false}
end
if redis.call('TYPE', KEYS[1]).ok ~= ARGV[1] then return {'changed', false, false} end
local prev = '<redis ' .. ARGV[1] .. '>'
if ARGV[1] == 'string' then
  prev = redis.call('GET', KEYS[1])
  if prev ~= ARGV[9] then return {'changed', false, false} end
end
if not string.find(ARGV[2], '^[0-9]+$') then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[4], ARGV[2])
elseif ARGV[8] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[8])
elseif ARGV[1] == 'string' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[1], ARGV[2])
end
if ARGV[7] ~= '0' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'prev', prev, 'seq', ARGV[2],
    'writer', ARGV[3], 'epoch', ARGV[4], 'run', ARGV[5], 'reason', ARGV[6])
end
return {'replaced', false, false}
