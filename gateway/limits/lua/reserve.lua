--[[
reserve.lua: admit one request against every limit of every scope, in one atomic step:
all limits pass and are charged, or nothing is charged (a rejection is only counted in the
ledger). Mirrors MemoryEngine.reserve (gateway/limits/memory.py) step by step, on the integer
arithmetic of gateway/limits/meters.py; see there for why the smooth limiter is a leaky bucket.

Time is the server's TIME, never the caller's clock, so every gateway replica agrees. Numbers
written back are formatted with %d (`int`): Lua numbers are doubles, exact integers below 2^53,
which %d prints exactly (as a C long) where Lua's own conversion (%.14g) would lose digits of
microsecond timestamps; glibc's %.0f prints the same digits at twice the cost, and a number given
to redis.call as it is costs Redis a %.17g. Every number written stays below 2^53: a bucket's level
stops at LEVEL_CAP (a shadow limit's would grow without end, and %d wraps past 2^63), a timestamp
is microseconds since 1970 (2^53 of them is the year 2255), a cost is a request's.

What a call costs Redis is mostly the script's own work, not the commands it runs: every
redis.call is a round trip through the scripting layer (arguments converted, the reply parsed back),
so the settled marker, counters and buckets are read with one MGET, and a lease set's earliest
expiry only when it is needed; the checks come as doubles, unpacked in C (struct) rather than split
and converted in Lua. In Lua itself, a call to C (ipairs, math.floor) costs more than the arithmetic
around it. A number Redis answers as text (TIME, a counter, a score) is read by arithmetic (`text + 0`,
or the text as an operand): Lua converts it once, where tonumber converts it twice (it first asks
whether it can), at 2k instructions a call. `bench/script_bench.py` measures what each call costs Redis.

KEYS[1]    reservation record: the amount charged to each check key, a JSON array (ARGV[7])
KEYS[2]    the reservation's settled marker: an id already settled or released is never charged
KEYS[3]    the day's ledger hash
KEYS[4..]  one key per check, in the order of the checks in ARGV
ARGV[1]    reservation id (the lease member)
ARGV[2]    mode: enforce | shadow (check, charge anyway) | peek (check, charge nothing)
ARGV[3]    model (the ledger field suffix)
ARGV[4]    record TTL, ms
ARGV[5]    ledger EXPIREAT, unix seconds
ARGV[6]    little-endian doubles: the UTC day number (days since 1970-01-01) the keys were named for,
           the lease TTL µs and the smooth limiter window µs (struct '<ddd': the numbers the script
           computes with, unpacked at once rather than converted from words one by one), then the
           checks, six doubles each (struct '<dddddd'): mechanism (RATE, CALENDAR
           for a day or month window, LEASE), limit, cost, period end µs, counter EXPIREAT, shadow (1:
           this limit alone is dark-launched: a refusal of it is reported and counted, never rejects)
ARGV[7]    the reservation record, as the caller wrote it (calls.record: the checks' costs as a JSON
           array; formatting them here costs Redis a string.format per amount); empty for a peek,
           which records nothing
ARGV[8..]  pairs of ledger field, increment: the estimate, charged to the ledger with the budgets

Reply, an array of integers (Lua numbers, exact below 2^53; cheaper than formatting each one):
status, now µs, then five per check: code, used, reset µs, wait µs, more µs.
status 1 admitted (charged), 0 rejected (nothing charged), 2 peeked, -1 another UTC day (nothing done),
-2 already settled (nothing done: this reserve arrived after its own release)
]]

local OK, WAIT, EXHAUSTED, TOO_LARGE = 0, 1, 2, 3
local RATE, CALENDAR, LEASE = 1, 2, 3 -- calls.MECHANISM_CODES
local LEASE_RETRY_US = 1000000

local call, format, floor = redis.call, string.format, math.floor

local clock = call('TIME')
local seconds = clock[1] + 0
local now = seconds * 1000000 + clock[2]
local day, lease_ttl, window, at = struct.unpack('<ddd', ARGV[6])
if floor(seconds / 86400) ~= day then
  return {-1, now}
end

local rid, mode, model = ARGV[1], ARGV[2], ARGV[3]

local function int(n)
  return format('%d', n)
end

-- The most a bucket's level holds (meters.LEVEL_CAP, which says why): a shadow limit is charged
-- even when full, and its level stops here, where doubles are still exact.
local LEVEL_CAP = 2^53 - 1

-- Exact ceiling of a / b for non-negative integers below 2^53, whatever the float division rounds to.
-- From 2^53 on, where a step of one no longer moves a double, the rounded quotient as it is: no
-- level is charged past LEVEL_CAP, but a bucket an earlier version of this script wrote may hold
-- more, and the steps would never end (Redis busy).
local EXACT = 2^53
local function ceil_div(a, b)
  local q = a / b
  q = q - q % 1 -- floor, without calling out to C
  if q >= EXACT then return q end
  while q * b < a and q < EXACT do q = q + 1 end
  while q > 0 and (q - 1) * b >= a do q = q - 1 end
  return q
end

-- A bucket's state is '<level> <stamp µs>' (split at its space: a pattern match costs twice as much).
local function rate_level(state, limit)
  if not state then return 0 end
  local space = string.find(state, ' ', 1, true)
  local elapsed = now - string.sub(state, space + 1)
  if elapsed < 0 then elapsed = 0 end -- a clock that stepped back drains nothing
  local level = string.sub(state, 1, space - 1) - elapsed * limit
  if level < 0 then return 0 end
  return level
end

-- Until the bucket has drained (in ms, rounded up), plus a second of slack; the ceiling of a
-- ceiling division by 1000 is the ceiling of the division by 1000 times as much.
local function rate_ttl_ms(level, limit)
  if limit == 0 then return ceil_div(window, 1000) + 1000 end
  return ceil_div(level, limit * 1000) + 1000
end

-- A check is an array whose slots are named here, made whole at once (a table that grows after it
-- is made is rehashed): what ARGV says, the decision (code, wait µs), then what was read and charged:
-- the bucket's level (RATE), the leases' count, first and last expiry (LEASE), the counter (CALENDAR).
local KEY, MECH, LIMIT, COST, FINISH, EXPIRE, SHADOW, CODE, WAIT_US = 1, 2, 3, 4, 5, 6, 7, 8, 9
local LEVEL, COUNT, FIRST, LAST, USED = 10, 11, 12, 13, 14

-- The settled marker and every bucket and counter are read in one MGET (a missing key reads false);
-- leases are sorted sets, read on their own.
local checks, reads = {}, {KEYS[2]}
for i = 1, #KEYS - 3 do
  local mech, limit, cost, finish, expire, shadow
  mech, limit, cost, finish, expire, shadow, at = struct.unpack('<dddddd', ARGV[6], at)
  local c = {KEYS[i + 3], mech, limit, cost, finish, expire, shadow == 1, OK, 0, 0, 0, 0, 0, 0}
  checks[i] = c
  if mech ~= LEASE then reads[#reads + 1] = c[KEY] end
end
local values = call('MGET', unpack(reads))
if mode ~= 'peek' and values[1] then
  return {-2, now}
end

-- Pass 1: read every limit and decide, changing nothing but expired leases.
local refused, quota, shadowed, read = false, false, false, 1
for i = 1, #checks do
  local c, value = checks[i], nil
  local mech, limit, cost, code, wait = c[MECH], c[LIMIT], c[COST], OK, 0
  if mech ~= LEASE then
    read = read + 1
    value = values[read]
  end
  if mech == RATE then
    local level = rate_level(value, limit)
    local capacity, need = limit * window, cost * window
    -- What the bucket holds beyond the room the cost leaves: level + need - capacity, in the order
    -- that keeps it exact (a level near LEVEL_CAP plus a cost would pass 2^53 and be rounded).
    local over = level - (capacity - need)
    if cost == 0 then
      code = OK
    elseif need > capacity then
      code = TOO_LARGE
    elseif over > 0 then
      code, wait = WAIT, ceil_div(over, limit)
    end
    c[LEVEL] = level
  elseif mech == LEASE then
    call('ZREMRANGEBYSCORE', c[KEY], '-inf', int(now)) -- a crashed process's leases free here
    local count, first, last = call('ZCARD', c[KEY]), now, now
    if count > 0 then
      last = call('ZRANGE', c[KEY], '-1', '-1', 'WITHSCORES')[2] + 0
      -- The earliest expiry only matters to a request that fills the limit or finds it full.
      if count + 1 >= limit then
        first = call('ZRANGE', c[KEY], '0', '0', 'WITHSCORES')[2] + 0
      end
    end
    if limit == 0 then
      code = TOO_LARGE
    elseif count + 1 > limit then
      code, wait = WAIT, math.min(LEASE_RETRY_US, first - now)
    end
    c[COUNT], c[FIRST], c[LAST] = count, first, last
  else
    local used = (value or 0) + 0
    if cost == 0 then
      code = OK
    elseif cost > limit then
      code = TOO_LARGE
    elseif used + cost > limit then
      code, wait = EXHAUSTED, c[FINISH] - now
    end
    c[USED] = used
  end
  c[CODE], c[WAIT_US] = code, wait
  if code ~= OK and c[SHADOW] then
    shadowed = true
  elseif code ~= OK then
    refused = true
    if code == EXHAUSTED or code == TOO_LARGE then quota = true end
  end
end

local function count(counter)
  call('HINCRBY', KEYS[3], counter .. ':' .. model, 1)
  call('EXPIREAT', KEYS[3], ARGV[5])
end

-- Pass 2: charge everything (admitted or shadow), or nothing.
local charge = mode == 'shadow' or (mode == 'enforce' and not refused)
if mode == 'enforce' and refused then
  if quota then count('rejected_quota') else count('rejected_rate') end
end
if charge then
  local expiry, lease_ttl_ms = now + lease_ttl, int(ceil_div(lease_ttl, 1000))
  for i = 1, #checks do
    local c = checks[i]
    local cost = c[COST]
    if c[MECH] == RATE then
      local level = c[LEVEL] + cost * window
      if level > LEVEL_CAP then level = LEVEL_CAP end
      c[LEVEL] = level
      if level > 0 then
        call('SET', c[KEY], format('%d %d', level, now), 'PX', int(rate_ttl_ms(level, c[LIMIT])))
      end
    elseif c[MECH] == LEASE then
      call('ZADD', c[KEY], int(expiry), rid)
      call('PEXPIRE', c[KEY], lease_ttl_ms)
      if c[COUNT] == 0 then c[FIRST] = expiry end
      c[LAST] = math.max(c[LAST], expiry)
      c[COUNT] = c[COUNT] + 1
    elseif cost > 0 then
      c[USED] = call('INCRBY', c[KEY], int(cost))
      -- Its expiry is the same instant for every charge to this period's key: set once, when the
      -- key is new (settle.lua sets it again whenever it creates the key or resets it to zero).
      if c[USED] == cost then call('EXPIREAT', c[KEY], int(c[EXPIRE])) end
    end
  end
  call('SET', KEYS[1], ARGV[7], 'PX', ARGV[4])
  for i = 8, #ARGV, 2 do
    call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  end
  if #ARGV >= 8 then call('EXPIREAT', KEYS[3], ARGV[5]) end
  if refused or shadowed then count('shadow_rejected') end
end

-- Readings, after the decision.
local status = 2
if mode ~= 'peek' then status = charge and 1 or 0 end
local reply, n = {status, now}, 2
for i = 1, #checks do
  local c = checks[i]
  local mech, limit, used, reset, more = c[MECH], c[LIMIT], 0, 0, 0
  if mech == RATE then
    local level = c[LEVEL]
    used = ceil_div(level, window)
    if limit > 0 and level > 0 then
      reset = ceil_div(level, limit)
      more = ceil_div(level - (used - 1) * window, limit)
    end
  elseif mech == LEASE then
    used = c[COUNT]
    if used > 0 then
      reset = c[LAST] - now
      if used >= limit then more = c[FIRST] - now end
    end
  else
    used = c[USED]
    if used > 0 then reset, more = c[FINISH] - now, c[FINISH] - now end
  end
  reply[n + 1], reply[n + 2], reply[n + 3], reply[n + 4], reply[n + 5] = c[CODE], used, reset, c[WAIT_US], more
  n = n + 5
end
return reply
