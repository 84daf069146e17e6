"""Fault injection for the chaos tests: make a worker die, or see Redis fail, at a named step.

``DIFFQ_FAULT=<action>:<step>[,<action>:<step>...]`` (an environment variable read once per
process, not a setting: production never sets it) arms a fault at each named step of a job's
path through the worker:

- ``taken``: RQ has moved the job id into ``<queue>:intermediate``; nothing else has happened;
- ``dequeued``: RQ has marked the job started; diffq has not claimed it;
- ``claimed``: claimed (``running``), before the run starts;
- ``store``: just before the guarded write of the result (retried while Redis recovers);
- ``stored``: the result and terminal event are written; RQ's bookkeeping has not run.

Actions: ``kill`` (SIGKILL this process, as an OOM killer or a power cut would) and ``redis``
(raise ``redis.exceptions.ConnectionError``, as a Redis restart would). Each fault fires once
per process, so the job can then go on, on this worker or another.
"""

from __future__ import annotations

import os
import signal

import redis.exceptions

ENV = "DIFFQ_FAULT"
STEPS = ("taken", "dequeued", "claimed", "store", "stored")
ACTIONS = ("kill", "redis")

_fired: set[str] = set()


def armed() -> dict[str, str]:
    """step -> action, from the environment (empty without ``DIFFQ_FAULT``)."""
    faults = {}
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        action, _, step = item.strip().partition(":")
        if action not in ACTIONS or step not in STEPS:
            raise ValueError(f"{ENV}: {item!r} is not <action>:<step> with action in {ACTIONS}, step in {STEPS}")
        faults[step] = action
    return faults


def at(step: str) -> None:
    """Fire the fault armed for ``step``, the first time this process reaches it."""
    action = armed().get(step) if ENV in os.environ else None
    if action is None or step in _fired:
        return
    _fired.add(step)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise redis.exceptions.ConnectionError(f"{ENV}: Redis failure injected at step {step!r}")
