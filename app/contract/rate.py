"""A key's request rate in Redis, as a Lua function that any script can run first.

``rate_hit`` counts one request against an API key's rate: a sliding-window counter (as the
``limits`` package keeps one, whose hit and window stats took two round trips): the count of the
current fixed window plus the previous window's count weighted by how much of it the sliding
window still covers. ``diffq.app.auth.quotas.RateLimiter`` runs it alone; the submit script of
``POST /v1/jobs`` (``diffq.app.contract.store``) runs it before its own checks, so an accepted
job costs one round trip, the rate included.

``rate_hit(record, prefix, limit, window, now)``: ``record`` is the key's record (``diffq:apikey:<id>``):
a key revoked or removed since the API process checked its secret is refused here ({-1}),
uncounted. ``prefix``: the name of the key's counters, two fields of that record
(``<prefix>0`` and ``<prefix>1``, the windows of even and odd number, each ``"<window
number>:<count>"``): so the revocation and both counts are one ``HMGET`` and the count one
``HSET``, with no counter keys to expire (3 commands a request, the script call included; two
counter keys with their ``EXPIRE`` took 4–5). ``limit`` requests per ``window`` seconds;
``now``: the caller's clock in seconds (the API process's, so no ``TIME``). Returns {1 allowed or
0 refused, remaining, ms until the window resets, ms until a retry fits}.
"""

from __future__ import annotations

HIT_FN = """
local function rate_count(slot, index)
  if not slot then return 0 end
  local at = string.find(slot, ':', 1, true)
  if tonumber(string.sub(slot, 1, at - 1)) ~= index then return 0 end
  return tonumber(string.sub(slot, at + 1))
end

local function rate_hit(record, prefix, limit, window, now)
  local t = tonumber(now)
  local index = math.floor(t / window)
  local left = window - (t - index * window)
  local here, there = prefix .. (index % 2), prefix .. ((index + 1) % 2)
  local read = redis.call('HMGET', record, 'revoked_at', here, there)
  if not read[1] or read[1] ~= 'null' then return {-1} end
  local current = rate_count(read[2], index)
  local previous = rate_count(read[3], index - 1)
  local weight = previous * left / window
  if weight + current + 1 > limit then
    -- When this window is full, the next one starts with this one's count weighing on it: the
    -- request goes once that weight has slid down to limit - 1.
    local wait
    if current + 1 > limit then
      wait = left + window * (1 - (limit - 1) / current)
    else
      wait = left - (limit - current - 1) * window / previous
    end
    return {0, 0, math.ceil(left * 1000), math.ceil(wait * 1000)}
  end
  redis.call('HSET', record, here, index .. ':' .. (current + 1))
  return {1, math.floor(limit - weight - current - 1), math.ceil(left * 1000), 0}
end
"""
