--[[
settle.lua: replace a reservation's estimate with the actual cost, exactly once.
Mirrors MemoryEngine.settle (gateway/limits/memory.py).

Idempotent: the settled marker (KEYS[2]) is checked first and written last, in one atomic step,
so a retried settle changes nothing. The amounts charged come from the reservation record
(KEYS[1]); if it has expired (a request that outlived its lease, or one admitted while the store
was unreachable, which charged nothing) the caller's copy in ARGV is used instead. Each window
moves by (actual - estimate) and never below zero; an actual above the estimate charges the
difference, the only way a budget can be overshot, and only by the estimate's error.

KEYS[1]    reservation record
KEYS[2]    settled marker
KEYS[3]    the admission day's ledger hash
KEYS[4..]  the reservation's check keys, in the order they were reserved
ARGV[1]    reservation id (the lease member)
ARGV[2]    settled marker TTL, ms
ARGV[3]    ledger EXPIREAT, unix seconds
ARGV[4]    smooth limiter window, µs
ARGV[5]    the checks, five little-endian doubles each (struct '<ddddd', see reserve.lua): mechanism
           (RATE, CALENDAR for a day or month window, LEASE), limit, estimate, actual, counter EXPIREAT
ARGV[6]    1 for a degraded reservation (admitted while the store was unreachable): without a record
           (its reserve never ran) the per-minute limits are left alone, that minute is over
ARGV[7]    1: take the estimate out of the ledger only if the record is here (the reserve may never
           have run: a degraded reservation, a release); 0: always (the reserve ran)
ARGV[8]    the record the reserve wrote if it charged the estimates in ARGV[5] (calls.record): when the
           record is that, the amounts are read from ARGV[5] instead of decoded from it
ARGV[9]    N, the number of ledger pairs that follow for the record found (or always, if ARGV[7] is 0)
ARGV[10..] N pairs of ledger field, increment: the actual cost less the estimate the reserve charged,
           one pair per field that moves (calls.SettleCall.ledger_moves); then, if ARGV[7] is 1,
           the pairs for no record found: the actual cost alone

Reply: 1 settled from the record, 2 settled from the caller's copy, 0 already settled

The record is a JSON array of the amounts (reserve.lua); one written before it was (space separated
amounts, a reserve of an earlier version) is read too. The caller writes it (calls.record) and
passes the one it expects as ARGV[8], which a record found is compared with before it is decoded:
the same string is the same amounts, and comparing two Lua strings costs nothing (they are interned).
]]

if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end

local clock = redis.call('TIME')
-- Numbers in text are read by arithmetic, which converts them once (tonumber twice: see reserve.lua).
local now = clock[1] * 1000000 + clock[2]
local rid, window, degraded = ARGV[1], ARGV[4] + 0, ARGV[6] == '1'

local function int(n)
  return string.format('%d', n)
end

-- The most a bucket's level holds (meters.LEVEL_CAP, see reserve.lua): a settle's excess stops there.
local LEVEL_CAP = 2^53 - 1

-- Exact below 2^53, the rounded quotient from there on (see reserve.lua).
local EXACT = 2^53
local function ceil_div(a, b)
  local q = math.floor(a / b)
  if q >= EXACT then return q end
  while q * b < a and q < EXACT do q = q + 1 end
  while q > 0 and (q - 1) * b >= a do q = q - 1 end
  return q
end

local record = redis.call('GET', KEYS[1])
local recorded
if record == ARGV[8] then
  recorded = nil -- the amounts charged are the estimates in ARGV[5]
elseif record and string.byte(record) == 91 then -- '['
  recorded = cjson.decode(record)
elseif record then
  recorded = {}
  for amount in string.gmatch(record, '%d+') do recorded[#recorded + 1] = tonumber(amount) end
end

local RATE, LEASE = 1, 3 -- calls.MECHANISM_CODES (2: a calendar window)
local at = 1
for i = 1, #KEYS - 3 do
  local key, mech, limit, estimate, actual, expire = KEYS[i + 3]
  mech, limit, estimate, actual, expire, at = struct.unpack('<ddddd', ARGV[5], at)
  if recorded then estimate = recorded[i] end
  local diff = actual - estimate
  if mech == RATE and degraded and not record then diff = 0 end
  if mech == LEASE then
    redis.call('ZREM', key, rid)
  elseif diff ~= 0 and mech == RATE then
    local level = 0
    local state = redis.call('GET', key)
    if state then
      -- A level below zero is one an earlier reserve.lua wrapped past 2^63: empty, as reserve reads it.
      local stored, stamp = string.match(state, '^(-?%d+) (%d+)$')
      level = math.max(0, stored - math.max(0, now - stamp) * limit)
    end
    level = math.max(0, level + diff * window)
    if level > LEVEL_CAP then level = LEVEL_CAP end
    if level > 0 then
      local drain = window
      if limit > 0 then drain = ceil_div(level, limit) end
      redis.call('SET', key, string.format('%d %d', level, now), 'PX', int(ceil_div(drain, 1000) + 1000))
    else
      redis.call('DEL', key)
    end
  elseif diff ~= 0 then
    -- A period's key expires at one instant, set when the key is made (here or by reserve.lua):
    -- set again only if this made it (the amount is all it holds) or reset it (SET drops a TTL).
    local used = redis.call('INCRBY', key, int(diff))
    if used < 0 then
      redis.call('SET', key, '0')
    end
    if used <= 0 or used == diff then
      redis.call('EXPIREAT', key, int(expire))
    end
  end
end

-- The ledger moves by actual - estimate, netted per field by the caller: one HINCRBY per field
-- that changes, its increment passed on as it came.
local first, last = 10, 9 + 2 * ARGV[9]
if ARGV[7] == '1' and not record then first, last = last + 1, #ARGV end
for i = first, last, 2 do
  -- A counter back at zero goes (a release leaves no trace, as before it was charged).
  if redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1]) == 0 then
    redis.call('HDEL', KEYS[3], ARGV[i])
  end
end
redis.call('EXPIREAT', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
if record then return 1 end
return 2
