-- durability_pipelines: shard leases with a rising epoch (KCL's leaseCounter).
-- KEYS[1] lease hash {owner, epoch, expires(ms, server clock)}
-- ARGV[1] op: acquire | renew | release | sync | revoke
-- ARGV[2] owner, ARGV[3] duration ms (acquire/renew/sync), ARGV[4] steal '1'/'0' (acquire)
--         or the epoch (renew/release/sync)
-- Returns {ok(1|0), owner, epoch, expires}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local l = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'expires')
local owner = l[1] or ''
local epoch = tonumber(l[2] or '0')
local expires = tonumber(l[3] or '0')
local op = ARGV[1]
local me = ARGV[2]

local function put(o, e, x)
  redis.call('HSET', KEYS[1], 'owner', o, 'epoch', string.format('%d', e), 'expires', string.format('%d', x))
  return {1, o, string.format('%d', e), string.format('%d', x)}
end
local function refuse()
  return {0, owner, string.format('%d', epoch), string.format('%d', expires)}
end

if op == 'acquire' then
  local dur = tonumber(ARGV[3])
  if owner == me and expires > now then return put(me, epoch, now + dur) end
  if owner == '' or expires <= now or ARGV[4] == '1' then return put(me, epoch + 1, now + dur) end
  return refuse()
elseif op == 'renew' then
  if owner ~= me or epoch ~= tonumber(ARGV[4]) then return refuse() end
  return put(me, epoch, now + tonumber(ARGV[3]))
elseif op == 'release' then
  if owner ~= me or epoch ~= tonumber(ARGV[4]) then return refuse() end
  return put('', epoch, now)
elseif op == 'sync' then
  -- Mirror a lease granted by another store (hybrid: Postgres grants): the highest epoch always wins.
  -- ARGV[3] is the grant's remaining time, so the copy never outlives the grant.
  local e = tonumber(ARGV[4])
  if e > epoch or (e == epoch and (owner == me or owner == '')) then
    return put(me, e, now + tonumber(ARGV[3]))
  end
  return refuse()
elseif op == 'revoke' then
  -- Expire the copy now, whoever holds it (hybrid, before a steal): its holder's writes stop here.
  if l[2] then return put(owner, epoch, now) end
  return {1, '', '0', string.format('%d', now)}
end
return redis.error_reply('unknown lease op ' .. op)
