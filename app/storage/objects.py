"""Object keys: made by the server only, from a job id, an attempt token and fixed names.

``<job id>/<attempt token>/<n>.<ext>`` for image n of one run, ``<job id>/<attempt
token>/journey-<n>.webp`` for its journey, ``<job id>/input/<name>.png`` for an editing
job's stored inputs. Job ids and attempt tokens are 32 hex digits made by diffq, so no
client-supplied text ever reaches a key; ``is_valid`` is the backends' last line of defence.
A run's objects sit under its own attempt token, so a stale run's upload is never the
object a record refers to: only the guarded store script that accepts the run's token
writes those keys into the record.
"""

from __future__ import annotations

import re

_HEX = r"[0-9a-f]{32}"
VALID = re.compile(rf"^{_HEX}/(?:{_HEX}/(?:\d+\.(?:png|webp|jpg)|journey-\d+\.webp)|input/(?:image|mask)\.png)$")
JOB_ID = re.compile(rf"^{_HEX}$")
INPUT_DIR = "input"
#: Seconds a ``redis``-store object outlives its job's retention (it is written just before the record ends).
OBJECT_TTL_MARGIN = 60


def image(job_id: str, token: str, index: int, extension: str) -> str:
    return _checked(f"{job_id}/{token}/{index}.{extension}")


def journey(job_id: str, token: str, index: int) -> str:
    return _checked(f"{job_id}/{token}/journey-{index}.webp")


def job_input(job_id: str, name: str) -> str:
    return _checked(f"{job_id}/{INPUT_DIR}/{name}.png")


def is_valid(key: str) -> bool:
    return VALID.match(key) is not None


def job_of(key: str) -> str:
    """The job id a key belongs to."""
    return key.split("/", 1)[0]


def attempt_of(key: str) -> str | None:
    """The attempt token that wrote a key; ``None`` for inputs (written by the API at submit)."""
    part = key.split("/")[1]
    return None if part == INPUT_DIR else part


def _checked(key: str) -> str:
    if not is_valid(key):
        raise ValueError(f"not a diffq object key: {key!r}")
    return key
