"""Lua scripts registered once per Redis client, not once per request.

``redis.register_script`` builds a ``Script`` (and hashes its source) each time it is called;
the API builds its stores per request, so that cost came back on every request. ``script``
keeps one ``Script`` per client and source for as long as the client lives.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from redis.commands.core import Script

_cache: WeakKeyDictionary[Any, dict[str, Script]] = WeakKeyDictionary()


def script(redis: Any, source: str) -> Script:
    """The registered ``Script`` of ``source`` on ``redis`` (a client or anything with
    ``register_script``), made on first use."""
    try:
        known = _cache.setdefault(redis, {})
    except TypeError:  # not weak-referenceable: register each time, as before
        return redis.register_script(source)
    found = known.get(source)
    if found is None:
        found = known[source] = redis.register_script(source)
    return found
