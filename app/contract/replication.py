"""Acknowledge a write only once replicas hold it: Redis ``WAIT``, for the API and the workers.

``WAIT`` counts the replicas that have the *calling connection's* last
write, and a pooled client may send it on another connection than the one
that wrote. So ``confirm`` writes a small mark and sends ``WAIT`` right after
it on one connection (a pipeline): the mark comes after every write this
process made before the call, so replicas that have it have those too.
"""

from __future__ import annotations

import re
import time

from redis import Redis
from redis.exceptions import ReadOnlyError

from diffq.app.contract import keys

#: How long the mark lives; it is only there to move the connection's replication offset.
MARK_TTL_MS = 60_000


#: Error prefixes of a Redis that refuses writes only for as long as a failover lasts.
FAILOVER_REFUSALS = ("NOREPLICAS", "MASTERDOWN", "READONLY")
_REFUSAL = re.compile(r"(?:^|[\s:-])(?:" + "|".join(FAILOVER_REFUSALS) + r")\s")


def is_failover_refusal(error: Exception) -> bool:
    """Whether ``error`` is a primary without its replicas (``min-replicas-to-write``), a replica
    cut off from its primary, or a demoted primary: worth retrying like an unreachable Redis."""
    # Inside a Lua script the refusal comes wrapped ("Error running script ...: -NOREPLICAS ..."), and inside
    # a MULTI as the pipeline's "Command # 1 (...) of pipeline caused error: NOREPLICAS ...".
    text = str(error)
    return isinstance(error, ReadOnlyError) or _REFUSAL.search(text) is not None


class ReplicationTimeout(Exception):
    """Fewer than the required replicas acknowledged in time."""

    def __init__(self, acknowledged: int, required: int, timeout: float) -> None:
        super().__init__(f"{acknowledged} of {required} Redis replica(s) acknowledged within {timeout:g} s")
        self.acknowledged = acknowledged
        self.required = required


def confirm(redis: Redis, replicas: int, timeout: float) -> None:
    """Return once ``replicas`` replicas hold every earlier write of this process; raises
    ``ReplicationTimeout`` after ``timeout`` seconds. ``replicas`` 0: nothing to wait for."""
    if replicas <= 0:
        return
    with redis.pipeline(transaction=False) as pipe:
        pipe.set(keys.REPLICATION_MARK, str(time.time()), px=MARK_TTL_MS)
        pipe.execute_command("WAIT", replicas, max(1, int(timeout * 1000)))
        _, acknowledged = pipe.execute()
    if int(acknowledged) < replicas:
        raise ReplicationTimeout(int(acknowledged), replicas, timeout)
