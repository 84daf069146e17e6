"""Job events: one Redis stream per job, so polling, SSE and webhooks tell the same story.

Event types, in the order a job emits them:

- ``queued`` (by the API, in the same MULTI that creates the job),
- ``running`` (a worker claimed it; again on a retry, with its attempt),
- ``progress`` (step, total, eta_seconds; throttled like the record's progress),
- ``preview`` (a new preview PNG is stored; step, total),
- one terminal event: ``succeeded``, ``failed`` or ``canceled``.

An event's id is its stream entry id (``<ms>-<n>``): increasing, and what an
SSE client sends back as ``Last-Event-ID`` to resume after it. The stream
lives as long as the job record and is trimmed to its latest entries.

Status changes made by the guarded scripts of ``diffq.app.contract.store`` (claim, finish,
requeue, cancel, deadline) write their event inside the script itself, with the change;
a job whose webhook subscribes to it gets an entry in the webhook outbox in the same
script (``diffq.app.contract.webhook_outbox``), which the deliverer turns into a delivery.

Webhooks through ``publish`` (the API's ``queued``): a status event of a job
whose request has a ``webhook`` whose ``events`` name it is also scheduled for
delivery (``diffq.app.contract.webhook_queue.schedule``) in the same ``MULTI`` as the stream
entry, so the event exists exactly when its delivery does. ``publish`` finds the
job's webhook itself (one ``HGET`` of the record's ``request``) unless it is
given a pipeline; then the caller passes ``webhook`` (``JobService.submit`` does).
The delivery's ``webhook-id`` is ``msg_<job id>_<type>`` (``_<attempt>`` added
when the data has an ``attempt``, as ``running`` does), so a receiver can drop a
repeated event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from diffq.app.contract import keys, webhook_queue
from diffq.app.contract.records import Webhook

TERMINAL_EVENTS = frozenset({"succeeded", "failed", "canceled"})
#: Events that change a job's status: the ones a webhook can subscribe to.
STATUS_EVENTS = frozenset({"queued", "running", *TERMINAL_EVENTS})
#: Entries kept per job: progress is throttled, so this covers many minutes of a run.
MAX_EVENTS = 1000


@dataclass(frozen=True)
class Event:
    """One event of a job as read back from its stream."""

    id: str
    type: str
    data: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def publish(
    redis: Redis | Pipeline,
    job_id: str,
    type: str,
    data: dict[str, Any],
    ttl: int,
    webhook: Webhook | dict[str, Any] | None = None,
) -> None:
    """Append an event and renew the stream's TTL, and schedule its webhook delivery if the job
    has a webhook for it: inside the caller's pipeline when one is given, else in one ``MULTI``.

    ``webhook`` is the job's webhook spec; ``None`` means "look it up" on a plain client (status
    events only) and "none" in a pipeline, whose caller knows the job's request.
    """
    if webhook is None and type in STATUS_EVENTS and not isinstance(redis, Pipeline):
        webhook = job_webhook(redis, job_id)
    spec = Webhook.model_validate(webhook) if isinstance(webhook, dict) else webhook
    if isinstance(redis, Pipeline):
        _write(redis, job_id, type, data, ttl, spec)
    else:
        with redis.pipeline() as pipe:
            _write(pipe, job_id, type, data, ttl, spec)
            pipe.execute()


def _write(pipe: Pipeline, job_id: str, type: str, data: dict[str, Any], ttl: int, webhook: Webhook | None) -> None:
    stream = keys.events(job_id)
    pipe.xadd(
        stream, {"type": type, "data": json.dumps(data, separators=(",", ":"))}, maxlen=MAX_EVENTS, approximate=True
    )
    pipe.expire(stream, ttl)
    if webhook is not None and type in STATUS_EVENTS and type in webhook.events:
        webhook_queue.schedule(
            pipe, job_id, webhook.url, f"job.{type}", webhook_data(job_id, type, data), webhook_id(job_id, type, data)
        )


def job_webhook(redis: Redis, job_id: str) -> Webhook | None:
    """The webhook of a job's request, or ``None`` (no webhook, or no record)."""
    raw = redis.hget(keys.job(job_id), "request")
    if raw is None:
        return None
    spec = json.loads(raw).get("webhook")
    return Webhook.model_validate(spec) if spec else None


def webhook_id(job_id: str, type: str, data: dict[str, Any]) -> str:
    """The ``webhook-id`` of an event: the same for a repeat of the same event. Events a job can
    emit more than once (``running`` on a retry, ``queued`` when requeued) carry ``attempt``."""
    attempt = data.get("attempt")
    return f"msg_{job_id}_{type}" + (f"_{attempt}" if attempt is not None else "")


def webhook_data(job_id: str, type: str, data: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` of an event's webhook payload: the event's data plus the job's id and path,
    and for a terminal event its ``error`` and the paths of its images (not a count)."""
    path = f"/v1/jobs/{job_id}"  # the API's routes (app/api/routes): relative, as workers know no host
    payload = {"id": job_id, "url": path, "status": type, **data}
    if type in TERMINAL_EVENTS:
        payload.setdefault("error", None)
        count = data.get("images", 0)
        # The worker's URLs of the images (diffq.app.storage.urls: proxied paths, signed or public URLs).
        urls = payload.pop("image_urls", None)
        payload["images"] = urls or [f"{path}/images/{n}.png" for n in range(count if isinstance(count, int) else 0)]
    return payload


def parse(entries: list) -> list[Event]:
    """Events from XRANGE/XREAD entries: ``[(id, {b"type": ..., b"data": ...}), ...]``."""
    events = []
    for entry_id, fields in entries:
        decoded = {_text(k): _text(v) for k, v in fields.items()}
        events.append(Event(id=_text(entry_id), type=decoded["type"], data=json.loads(decoded["data"])))
    return events


def read(redis: Redis, job_id: str, after: str = "0", count: int = 100) -> list[Event]:
    """Events after id ``after`` (exclusive), without blocking."""
    return parse(redis.xrange(keys.events(job_id), min=f"({after}" if after != "0" else "-", count=count))


def last_id(redis: Redis, job_id: str) -> str:
    """Id of the job's newest event, or "0" when there is none."""
    return last_id_text(redis.xrevrange(keys.events(job_id), count=1))


def last_id_text(newest: list) -> str:
    """The id in an ``XREVRANGE ... COUNT 1`` reply, or "0" for an empty stream."""
    return _text(newest[0][0]) if newest else "0"


def is_event_id(text: str) -> bool:
    """Whether ``text`` is a stream id (``<ms>-<seq>``), as SSE clients send back in Last-Event-ID."""
    ms, _, seq = text.partition("-")
    return ms.isdigit() and seq.isdigit()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
