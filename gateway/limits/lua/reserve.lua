--[[
reserve.lua: admit one request against every limit of every scope, in one atomic step:
all limits pass and are charged, or nothing is charged (a rejection is only counted in the
ledger). Mirrors MemoryEngine.reserve (gateway/limits/memory.py) step by step, on the integer
arithmetic of gateway/limits/meters.py; see there for why the smooth limiter is a leaky bucket.

Time is the server's TIME, never the caller's clock, so every gateway replica agrees. Numbers
written back are formatted with %d (`int`): Lua numbers are doubles, exact integers below 2^53,
which %d prints exactly (as a C long) where Lua's own conversion (%.14g) would lose digits of
microsecond timestamps; glibc's %.0f prints the same digits at twice the cost, and a number given
to redis.call as it is costs Redis a %.17g.

What a call costs Redis is mostly the script's own work, not the commands it runs: every
redis.call is a round trip through the scripting layer (arguments converted, the reply parsed back),
so the counters and buckets are read with one MGET, and a lease set's earliest expiry only when it
is needed; the checks come as doubles, unpacked in C (struct) rather than split and converted in Lua.

KEYS[1]    reservation record: the amount charged to each check key, a JSON array
KEYS[2]    the reservation's settled marker: an id already settled or released is never charged
KEYS[3]    the day's ledger hash
KEYS[4..]  one key per check, in the order of the checks in ARGV
ARGV[1]    reservation id (the lease member)
ARGV[2]    UTC day number (days since 1970-01-01) the keys were named for
ARGV[3]    mode: enforce | shadow (check, charge anyway) | peek (check, charge nothing)
ARGV[4]    model (the ledger field suffix)
ARGV[5]    record TTL, ms
ARGV[6]    ledger EXPIREAT, unix seconds
ARGV[7]    lease TTL, µs
ARGV[8]    smooth limiter window, µs
ARGV[9]    the checks, six little-endian doubles each (struct '<dddddd'): mechanism (RATE, CALENDAR
           for a day or month window, LEASE), limit, cost, period end µs, counter EXPIREAT, shadow (1:
           this limit alone is dark-launched: a refusal of it is reported and counted, never rejects)
ARGV[10..] pairs of ledger field, increment: the estimate, charged to the ledger with the budgets

Reply, an array of integers (Lua numbers, exact below 2^53; cheaper than formatting each one):
status, now µs, then five per check: code, used, reset µs, wait µs, more µs.
status 1 admitted (charged), 0 rejected (nothing charged), 2 peeked, -1 another UTC day (nothing done),
-2 already settled (nothing done: this reserve arrived after its own release)
]]

local OK, WAIT, EXHAUSTED, TOO_LARGE = 0, 1, 2, 3
local RATE, CALENDAR, LEASE = 1, 2, 3 -- calls.MECHANISM_CODES
local LEASE_RETRY_US = 1000000

local clock = redis.call('TIME')
local seconds = tonumber(clock[1])
local now = seconds * 1000000 + tonumber(clock[2])
if math.floor(seconds / 86400) ~= tonumber(ARGV[2]) then
  return {-1, now}
end
if ARGV[3] ~= 'peek' and redis.call('EXISTS', KEYS[2]) == 1 then
  return {-2, now}
end

local rid, mode, model = ARGV[1], ARGV[3], ARGV[4]
local lease_ttl, window = tonumber(ARGV[7]), tonumber(ARGV[8])

local function int(n)
  return string.format('%d', n)
end

-- Exact ceiling of a / b for non-negative integers below 2^53, whatever the float division rounds to.
local function ceil_div(a, b)
  local q = math.floor(a / b)
  while q * b < a do q = q + 1 end
  while q > 0 and (q - 1) * b >= a do q = q - 1 end
  return q
end

local function rate_level(state, limit)
  if not state then return 0 end
  local level, stamp = string.match(state, '^(%d+) (%d+)$')
  local elapsed = math.max(0, now - tonumber(stamp))
  return math.max(0, tonumber(level) - elapsed * limit)
end

local function rate_ttl_ms(level, limit)
  local drain = window
  if limit > 0 then drain = ceil_div(level, limit) end
  return ceil_div(drain, 1000) + 1000
end

local checks, counters, at = {}, {}, 1
for i = 1, #KEYS - 3 do
  local mech, limit, cost, finish, expire, shadow
  mech, limit, cost, finish, expire, shadow, at = struct.unpack('<dddddd', ARGV[9], at)
  local c = {key = KEYS[i + 3], mech = mech, limit = limit, cost = cost, finish = finish, expire = expire,
             shadow = shadow == 1, code = OK, wait = 0}
  checks[i] = c
  if mech ~= LEASE then counters[#counters + 1] = c.key end
end
-- Every bucket and counter in one read (a missing key reads false); leases are sorted sets.
local values = {}
if #counters > 0 then values = redis.call('MGET', unpack(counters)) end

-- Pass 1: read every limit and decide, changing nothing but expired leases.
local refused, quota, shadowed, read = false, false, false, 0
for _, c in ipairs(checks) do
  local value
  if c.mech ~= LEASE then
    read = read + 1
    value = values[read]
  end
  if c.mech == RATE then
    c.level = rate_level(value, c.limit)
    local capacity, need = c.limit * window, c.cost * window
    if c.cost == 0 then
      c.code = OK
    elseif need > capacity then
      c.code = TOO_LARGE
    elseif c.level + need > capacity then
      c.code, c.wait = WAIT, ceil_div(c.level + need - capacity, c.limit)
    end
  elseif c.mech == LEASE then
    redis.call('ZREMRANGEBYSCORE', c.key, '-inf', int(now)) -- a crashed process's leases free here
    c.count = redis.call('ZCARD', c.key)
    c.first, c.last = now, now
    if c.count > 0 then
      c.last = tonumber(redis.call('ZRANGE', c.key, '-1', '-1', 'WITHSCORES')[2])
      -- The earliest expiry only matters to a request that fills the limit or finds it full.
      if c.count + 1 >= c.limit then
        c.first = tonumber(redis.call('ZRANGE', c.key, '0', '0', 'WITHSCORES')[2])
      end
    end
    if c.limit == 0 then
      c.code = TOO_LARGE
    elseif c.count + 1 > c.limit then
      c.code, c.wait = WAIT, math.min(LEASE_RETRY_US, c.first - now)
    end
  else
    c.used = tonumber(value or '0')
    if c.cost == 0 then
      c.code = OK
    elseif c.cost > c.limit then
      c.code = TOO_LARGE
    elseif c.used + c.cost > c.limit then
      c.code, c.wait = EXHAUSTED, c.finish - now
    end
  end
  if c.code ~= OK and c.shadow then
    shadowed = true
  elseif c.code ~= OK then
    refused = true
    if c.code == EXHAUSTED or c.code == TOO_LARGE then quota = true end
  end
end

local function count(counter)
  redis.call('HINCRBY', KEYS[3], counter .. ':' .. model, 1)
  redis.call('EXPIREAT', KEYS[3], ARGV[6])
end

-- Pass 2: charge everything (admitted or shadow), or nothing.
local charge = mode == 'shadow' or (mode == 'enforce' and not refused)
if mode == 'enforce' and refused then
  if quota then count('rejected_quota') else count('rejected_rate') end
end
if charge then
  local amounts = {}
  local expiry = now + lease_ttl
  for i, c in ipairs(checks) do
    amounts[i] = int(c.cost)
    if c.mech == RATE then
      c.level = c.level + c.cost * window
      if c.level > 0 then
        redis.call('SET', c.key, string.format('%d %d', c.level, now), 'PX', int(rate_ttl_ms(c.level, c.limit)))
      end
    elseif c.mech == LEASE then
      redis.call('ZADD', c.key, int(expiry), rid)
      redis.call('PEXPIRE', c.key, int(ceil_div(lease_ttl, 1000)))
      if c.count == 0 then c.first = expiry end
      c.last = math.max(c.last, expiry)
      c.count = c.count + 1
    elseif c.cost > 0 then
      c.used = redis.call('INCRBY', c.key, int(c.cost))
      -- Its expiry is the same instant for every charge to this period's key: set once, when the
      -- key is new (settle.lua sets it again whenever it creates the key or resets it to zero).
      if c.used == c.cost then redis.call('EXPIREAT', c.key, int(c.expire)) end
    end
  end
  redis.call('SET', KEYS[1], '[' .. table.concat(amounts, ',') .. ']', 'PX', ARGV[5])
  for i = 10, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  end
  if #ARGV >= 10 then redis.call('EXPIREAT', KEYS[3], ARGV[6]) end
  if refused or shadowed then count('shadow_rejected') end
end

-- Readings, after the decision.
local status = 2
if mode ~= 'peek' then status = charge and 1 or 0 end
local reply = {status, now}
for _, c in ipairs(checks) do
  local used, reset, more = 0, 0, 0
  if c.mech == RATE then
    used = ceil_div(c.level, window)
    if c.limit > 0 and c.level > 0 then
      reset = ceil_div(c.level, c.limit)
      more = ceil_div(c.level - (used - 1) * window, c.limit)
    end
  elseif c.mech == LEASE then
    used = c.count
    if used > 0 then
      reset = c.last - now
      if used >= c.limit then more = c.first - now end
    end
  else
    used = c.used
    if used > 0 then reset, more = c.finish - now, c.finish - now end
  end
  local n = #reply
  reply[n + 1], reply[n + 2], reply[n + 3], reply[n + 4], reply[n + 5] = c.code, used, reset, c.wait, more
end
return reply
