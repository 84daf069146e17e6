"""A key's request rate in Redis, as a Lua function that any script can run first.

``rate_hit`` counts one request against an API key's rate: a sliding-window counter (as the
``limits`` package keeps one, whose hit and window stats took two round trips): the count of the
current fixed window plus the previous window's count weighted by how much of it the sliding
window still covers. ``diffq.app.auth.quotas.RateLimiter`` runs it alone; the submit script of
``POST /v1/jobs`` (``diffq.app.contract.store``) runs it before its own checks, so an accepted
job costs one round trip, the rate included.

``rate_hit(record, prefix, limit, window, now)``: ``record`` is the key's record (``diffq:apikey:<id>``):
a key revoked or removed since the API process checked its secret is refused here ({-1}),
uncounted. ``prefix``: the key's counters' prefix; ``limit`` requests per ``window`` seconds;
``now``: the caller's clock in seconds (the API process's, so no ``TIME``: one command fewer per
request). The counters are named from the window's number (one Redis, no cluster: as RQ needs). Returns {1
allowed or 0 refused, remaining, ms until the window resets, ms until a retry fits}.
"""

from __future__ import annotations

HIT_FN = """
local function rate_hit(record, prefix, limit, window, now)
  local revoked = redis.call('HGET', record, 'revoked_at')
  if not revoked or revoked ~= 'null' then return {-1} end
  local t = tonumber(now)
  local index = math.floor(t / window)
  local left = window - (t - index * window)
  local current_key = prefix .. index
  local counts = redis.call('MGET', current_key, prefix .. (index - 1))
  local current = tonumber(counts[1] or '0')
  local previous = tonumber(counts[2] or '0')
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
  if redis.call('INCR', current_key) == 1 then  -- a window's first hit: its counter lives two windows
    redis.call('EXPIRE', current_key, 2 * window)
  end
  return {1, math.floor(limit - weight - current - 1), math.ceil(left * 1000), 0}
end
"""
