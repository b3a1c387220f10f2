-- Operator write: no monotonic guard, no fencing; replaces even a garbage value (or a checkpoint or sentinel key
-- of the wrong type; a history key of the wrong type is refused before anything is written) and always appends a history entry. KEYS[1] checkpoint, KEYS[2] history stream, KEYS[3] sentinel.
-- ARGV[1] sequence, ARGV[2] writer, ARGV[3] ttl ms ('' = keep the key's current TTL), ARGV[4] run id,
-- ARGV[5] reason, ARGV[6] history maxlen ('0' = uncapped: a forced write is always recorded).
-- A number goes to the shared key (and clears the sentinel); a sentinel goes to its own key, and a
-- TRIM_HORIZON / LATEST also removes the shared number (a rewind: other workers start over too).
-- Returns the previous position (or '<type>' for a non-string key), or false.
local hkind = redis.call('TYPE', KEYS[2]).ok
if hkind ~= 'none' and hkind ~= 'stream' then
  return redis.error_reply('WRONGTYPE the history key holds a ' .. hkind .. '; nothing was written')
end
local kind = redis.call('TYPE', KEYS[1]).ok
local prev = false
if kind == 'string' then
  prev = redis.call('GET', KEYS[1])
elseif kind ~= 'none' then
  prev = '<redis ' .. kind .. '>'
  redis.call('DEL', KEYS[1])
end
local skind = redis.call('TYPE', KEYS[3]).ok
local sprev = false
if skind == 'string' then
  sprev = redis.call('GET', KEYS[3])
elseif skind ~= 'none' then  -- another program's key at the sentinel place: replaced like the checkpoint key
  redis.call('DEL', KEYS[3])
  if not prev then prev = '<redis ' .. skind .. ' at the sentinel key>' end
end
if sprev and (not prev or sprev == 'SHARD_END' or not string.find(prev, '^[0-9]+$')) then prev = sprev end
if string.find(ARGV[1], '^[0-9]+$') then
  redis.call('DEL', KEYS[3])
  if ARGV[3] ~= '' then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  elseif kind == 'string' then
    redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
  else
    redis.call('SET', KEYS[1], ARGV[1])
  end
else
  if ARGV[1] ~= 'SHARD_END' or (kind == 'string' and not string.find(redis.call('GET', KEYS[1]), '^[0-9]+$')) then
    redis.call('DEL', KEYS[1])
  end
  if ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3]) else redis.call('SET', KEYS[3], ARGV[1]) end
end
local fields = {'prev', prev or '', 'seq', ARGV[1], 'writer', ARGV[2], 'epoch', '', 'run', ARGV[4],
                'reason', ARGV[5], 'forced', '1'}
if ARGV[6] ~= '0' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', unpack(fields))
else
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
return prev
