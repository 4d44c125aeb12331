--[[
renew.lua: keep a running request's concurrency leases (and its reservation record) alive.
Mirrors MemoryEngine.renew (gateway/limits/memory.py).

A lease expires `lease_ttl` after it was taken or last renewed, so a crashed gateway's slots free
themselves; a request still running renews its own before then. Only a lease still held is
renewed (ZADD XX): one that expired or was settled is not taken back.

KEYS[1]    reservation record
KEYS[2..]  the reservation's lease keys (one per scope with a concurrency limit)
ARGV[1]    reservation id (the lease member)
ARGV[2]    lease TTL, µs
ARGV[3]    record TTL, ms

Reply: the number of leases renewed
]]

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local rid, ttl = ARGV[1], tonumber(ARGV[2])
local expiry = string.format('%.0f', now + ttl)
local renewed = 0
for i = 2, #KEYS do
  local held = redis.call('ZSCORE', KEYS[i], rid)
  if held and tonumber(held) > now then
    redis.call('ZADD', KEYS[i], 'XX', expiry, rid)
    redis.call('PEXPIRE', KEYS[i], math.ceil(ttl / 1000)) -- every member expires by then
    renewed = renewed + 1
  end
end
if renewed > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return renewed
