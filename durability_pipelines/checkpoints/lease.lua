-- durability_pipelines: shard leases with a rising epoch (KCL's leaseCounter), and graceful hand-offs.
-- KEYS[1] lease hash {owner, epoch, expires(ms, server clock), requested_by, requested_at(ms),
--                     handed_from, handed_at(ms)}
-- ARGV[1] op: acquire | renew | release | sync | revoke | request | handover | withdraw
-- ARGV[2] owner (the requester for request/withdraw), ARGV[3] duration ms (acquire/renew/sync/request/handover),
-- ARGV[4] steal '1'/'0' (acquire) or the epoch (renew/release/sync/handover)
-- ARGV[5] (request/handover) ms a request stays fresh without being renewed (HANDOFF_REQUEST_FRESH_S)
-- Returns {ok(1|0), owner, epoch, expires, requested_by, requested_at, handed_from, handed_at}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local l = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'expires', 'requested_by', 'requested_at',
                     'handed_from', 'handed_at')
local owner = l[1] or ''
local epoch = tonumber(l[2] or '0')
local expires = tonumber(l[3] or '0')
local req = l[4] or ''
local req_at = tonumber(l[5] or '0')
local from = l[6] or ''
local from_at = tonumber(l[7] or '0')
local op = ARGV[1]
local me = ARGV[2]

local function fmt(n) return string.format('%d', n) end
local function reply(ok)
  return {ok, owner, fmt(epoch), fmt(expires), req, fmt(req_at), from, fmt(from_at)}
end
local function put(o, e, x)
  owner, epoch, expires = o, e, x
  redis.call('HSET', KEYS[1], 'owner', o, 'epoch', fmt(e), 'expires', fmt(x))
  return reply(1)
end
-- A takeover (epoch + 1): a pending request and the last hand-off's record belong to the old epoch.
local function take(o, x)
  req, req_at, from, from_at = '', 0, '', 0
  redis.call('HSET', KEYS[1], 'requested_by', '', 'requested_at', '0', 'handed_from', '', 'handed_at', '0')
  return put(o, epoch + 1, x)
end

if op == 'acquire' then
  local dur = tonumber(ARGV[3])
  if owner == me and expires > now then return put(me, epoch, now + dur) end
  if owner == '' or expires <= now or ARGV[4] == '1' then return take(me, now + dur) end
  return reply(0)
elseif op == 'renew' then
  if owner ~= me or epoch ~= tonumber(ARGV[4]) then return reply(0) end
  return put(me, epoch, now + tonumber(ARGV[3]))
elseif op == 'release' then
  if owner ~= me or epoch ~= tonumber(ARGV[4]) then return reply(0) end
  return put('', epoch, now)
elseif op == 'sync' then
  -- Mirror a lease granted by another store (hybrid: Postgres grants): the highest epoch always wins.
  -- ARGV[3] is the grant's remaining time, so the copy never outlives the grant.
  local e = tonumber(ARGV[4])
  if e > epoch or (e == epoch and (owner == me or owner == '')) then
    return put(me, e, now + tonumber(ARGV[3]))
  end
  return reply(0)
elseif op == 'revoke' then
  -- Expire the copy now, whoever holds it (hybrid, before a steal): its holder's writes stop here.
  if l[2] then return put(owner, epoch, now) end
  return {1, '', '0', fmt(now), '', '0', '', '0'}
elseif op == 'request' then
  -- A successor asks: free/expired/ours -> take it; else record the request unless another one is pending.
  local dur = tonumber(ARGV[3])
  if owner == me and expires > now then return put(me, epoch, now + dur) end
  if owner == '' or expires <= now then return take(me, now + dur) end
  if req == '' or req == me or req_at + tonumber(ARGV[5]) <= now then
    req, req_at = me, now
    redis.call('HSET', KEYS[1], 'requested_by', me, 'requested_at', fmt(now))
  end
  return reply(1)
elseif op == 'handover' then
  -- The owner gives the lease to the requester: epoch + 1 (the old owner is fenced from here on).
  if owner ~= me or epoch ~= tonumber(ARGV[4]) or req == '' or req_at + tonumber(ARGV[5]) <= now then
    return reply(0)
  end
  local successor = req
  take(successor, now + tonumber(ARGV[3]))
  from, from_at = me, now
  redis.call('HSET', KEYS[1], 'handed_from', me, 'handed_at', fmt(now))
  return reply(1)
elseif op == 'withdraw' then
  if req == me then
    req, req_at = '', 0
    redis.call('HSET', KEYS[1], 'requested_by', '', 'requested_at', '0')
  end
  return reply(1)
end
return redis.error_reply('unknown lease op ' .. op)
