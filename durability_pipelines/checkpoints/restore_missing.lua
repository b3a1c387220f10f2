-- durability_pipelines: put back a checkpoint the project recorded but Redis no longer holds (its TTL ran out,
-- or the key was deleted), from the project's own history, instead of letting a load read "no checkpoint"
-- (which sends a consumer to its initial position: LATEST skips everything in between).
-- KEYS[1] checkpoint key, KEYS[2] history stream key, KEYS[3] sentinel key
-- ARGV[1] the number the history recorded, ARGV[2] ttl in ms ('' = none), ARGV[3] reason, ARGV[4] history maxlen,
-- ARGV[5] the id of the history entry it was read from
-- Returns 1 if restored; 0 if the key or a sentinel exists now, or the history moved on (someone wrote meanwhile).
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local head = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if not head[1] or head[1][1] ~= ARGV[5] then return 0 end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'prev', '', 'seq', ARGV[1], 'writer', 'restore',
  'epoch', '', 'run', '', 'reason', ARGV[3], 'ttl', ARGV[2] ~= '' and ARGV[2] or '-1')
return 1
