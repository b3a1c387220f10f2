-- durability_pipelines: monotonic, fenced checkpoint save in one round trip.
-- Ordering (same as ordering.py and durability_sequence_rank in SQL):
-- TRIM_HORIZON < LATEST < numbers < SHARD_END; numbers compare by length, then
-- text, after stripping leading zeros (tonumber would be a lossy double). Numbers have 1-129 digits
-- (ordering.MAX_DIGITS: Kinesis sequence numbers).
--
-- KEYS[1] checkpoint key (the shared layout: numbers only), KEYS[2] lease key, KEYS[3] history stream key,
-- KEYS[4] sentinel key (SHARD_END / TRIM_HORIZON / LATEST: positions other workers cannot feed to
--         AT_SEQUENCE_NUMBER live here, never in KEYS[1]); the position is the greater of the two,
-- KEYS[5] (optional, hybrid) flush-state hash {acks, flushed_ms}: counts acks since the
--         last Postgres flush across every process, so "every N acks or T seconds" holds
--         for short-lived run processes too.
-- ARGV[1] sequence (canonical), ARGV[2] writer (the lease owner when fenced), ARGV[3] lease epoch ('' = unfenced),
-- ARGV[4] ttl in ms ('' = keep the key's TTL, if any), ARGV[5] run id, ARGV[6] reason, ARGV[7] history maxlen ('0' = off),
-- ARGV[8] (optional) with no ttl of our own: the length in ms a TTL found on the shared key is renewed to
--         (another worker's `SET key seq EX 86400`: kept, and renewed as that worker's own SET would; never shortened)
-- ARGV[9] (optional) the value this writer's previous save left in the shared key: while the shared key still holds
--         exactly that, nobody lowered it since, so the save skips the history read (the foreign-rewind check).
-- The history entry records `ttl`: the shared key's TTL in ms after the write ('-1' none, '' not known), so that a
-- load that finds the key gone can say whether it expired (redis_store.py restores it from this history).
-- Returns {outcome, previous|false, acks_since_flush|false, ms_since_flush|false, moved_back_from|false, ttl}
-- (ttl: the shared key's TTL in ms after the save, '-1' none, '' not known)
-- (or {'lease_lost', false, lease_owner|false, lease_epoch|false})
-- outcome 'rewound': the shared number is below the number the project's own last recorded write left in it (the
-- history's newest entry), i.e. another worker moved it back (a blind `SET key seq`): the move is recorded in the
-- history (writer 'external') and honoured: nothing is written over it, `previous` is the value found and
-- `moved_back_from` the recorded one. The caller goes on from the value found (it replays what the rewind asks).

-- Hot path: numbers are checked first and a number without leading zeros (what Python
-- always sends) is returned as is, so a save runs no gsub; each rank is computed once.
local find, byte, gsub = string.find, string.byte, string.gsub

local function rank(s)
  local n = #s
  if n >= 1 and n <= 129 and not find(s, '[^0-9]') then
    if n == 1 or byte(s, 1) ~= 48 then return 2, s end
    local t = gsub(s, '^0+', '')
    if t == '' then t = '0' end
    return 2, t
  end
  if s == 'TRIM_HORIZON' then return 0, '' end
  if s == 'LATEST' then return 1, '' end
  if s == 'SHARD_END' then return 3, '' end
  return nil, nil
end

-- -1, 0 or 1 for two ranked values (rank, digits)
local function cmp(ra, ta, rb, tb)
  if ra ~= rb then if ra < rb then return -1 else return 1 end end
  if ra ~= 2 then return 0 end
  if #ta ~= #tb then if #ta < #tb then return -1 else return 1 end end
  if ta == tb then return 0 end
  if ta < tb then return -1 else return 1 end
end

local seq = ARGV[1]
local rs, ts = rank(seq)
if rs == nil then
  return redis.error_reply('DURABILITY_INVALID_SEQUENCE given ' .. string.sub(seq, 1, 80))
end
-- The fencing rule: a fenced save needs the lease's owner and epoch, before the lease expires.
local now = nil
local function clock()
  if now == nil then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
if ARGV[3] ~= '' then
  local l = redis.call('HMGET', KEYS[2], 'owner', 'epoch', 'expires')
  if l[1] ~= ARGV[2] or l[2] ~= ARGV[3] or tonumber(l[3] or '0') <= clock() then
    return {'lease_lost', false, l[1] or false, l[2] or false}
  end
end
local shared = redis.call('GET', KEYS[1])
local sentinel = redis.call('GET', KEYS[4])
local prev, rp, tp = shared, nil, nil
if shared then
  rp, tp = rank(shared)
  if rp == nil then
    return redis.error_reply('DURABILITY_INVALID_SEQUENCE stored ' .. string.sub(shared, 1, 80))
  end
end
-- A foreign rewind: compare the shared number with what the newest history entry left in it (a SHARD_END entry
-- left the number before it; a TRIM_HORIZON / LATEST entry left none). One XREVRANGE of one entry.
local moved_from = nil
local quiet = shared and ARGV[9] ~= nil and shared == ARGV[9]  -- untouched since this writer's previous save
if rp == 2 and ARGV[7] ~= '0' and not quiet then
  local head = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
  if head then
    local f, hs, hp = head[2], nil, nil
    for i = 1, #f, 2 do
      if f[i] == 'seq' then hs = f[i + 1] elseif f[i] == 'prev' then hp = f[i + 1] end
    end
    if hs == 'SHARD_END' then hs = hp end
    if hs then
      local rr, tr = rank(hs)
      if rr == 2 and cmp(rp, tp, rr, tr) < 0 then
        moved_from = hs
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'prev', hs, 'seq', shared, 'writer', 'external',
          'epoch', '', 'run', ARGV[5],
          'reason', 'foreign write seen by a save in redis: moved back from ' .. hs .. ' to ' .. shared, 'ttl', '')
      end
    end
  end
end
if sentinel then
  local rq, tq = rank(sentinel)
  if rq ~= nil and (rp == nil or rq > rp) then prev, rp, tp = sentinel, rq, tq end
end
local outcome = 'advanced'
if moved_from and prev == shared then
  outcome = 'rewound'  -- honoured: the position is the value found (a SHARD_END beside it still governs)
elseif prev then
  local c = cmp(rp, tp, rs, ts)
  if c == 0 then outcome = 'unchanged' elseif c > 0 then outcome = 'stale' end
end
local renew = ARGV[8] or ''
local ttl = ''
if outcome == 'advanced' then
  if rs == 2 then
    if ARGV[4] ~= '' then
      redis.call('SET', KEYS[1], seq, 'PX', ARGV[4])
      ttl = ARGV[4]
    elseif renew ~= '' then
      -- No TTL of our own: a TTL the key has (another worker's `SET key seq EX 86400`) is kept and renewed, as
      -- that worker's own SET renews it: a TTL counting down under the project's saves would expire its position.
      local left = shared and redis.call('PTTL', KEYS[1]) or -1
      if left > 0 then
        local want = tonumber(renew)
        if left > want then want = left end
        redis.call('SET', KEYS[1], seq, 'PX', want)
        ttl = tostring(want)
      else
        redis.call('SET', KEYS[1], seq)
        ttl = '-1'
      end
    else
      redis.call('SET', KEYS[1], seq, 'KEEPTTL')
    end
    if sentinel then redis.call('DEL', KEYS[4]) end  -- a TRIM_HORIZON / LATEST now behind the number
  else
    if ARGV[4] ~= '' then redis.call('SET', KEYS[4], seq, 'PX', ARGV[4]) else redis.call('SET', KEYS[4], seq) end
    -- A sentinel an older version left in the shared key goes; a number there stays (other workers use it).
    if shared and rank(shared) ~= 2 then redis.call('DEL', KEYS[1]) end
  end
  if ARGV[7] ~= '0' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'prev', prev or '', 'seq', seq,
      'writer', ARGV[2], 'epoch', ARGV[3], 'run', ARGV[5], 'reason', ARGV[6], 'ttl', ttl)
  end
elseif outcome == 'unchanged' then
  if ARGV[4] ~= '' then
    redis.call('PEXPIRE', rs == 2 and KEYS[1] or KEYS[4], ARGV[4])
    if rs == 2 then ttl = ARGV[4] end
  elseif renew ~= '' and rs == 2 then
    local left = redis.call('PTTL', KEYS[1])
    if left > 0 and left < tonumber(renew) then redis.call('PEXPIRE', KEYS[1], renew) left = tonumber(renew) end
    if left > 0 then ttl = tostring(left) else ttl = '-1' end
  end
end
if KEYS[5] then
  local acks = redis.call('HINCRBY', KEYS[5], 'acks', 1)
  local flushed = tonumber(redis.call('HGET', KEYS[5], 'flushed_ms') or '0')
  return {outcome, prev or false, acks, clock() - flushed, moved_from or false, ttl}
end
return {outcome, prev or false, false, false, moved_from or false, ttl}
