"""The Redis key layout of diffq: every key, its type, who writes it, and its TTL.

diffq's own keys all start with ``diffq:``. RQ keeps its usual ``rq:`` keys
(``rq:queue:<queue>``, ``rq:job:<id>``, registries); diffq reads and writes
those only in ``diffq.app.contract.rq_adapter`` (through RQ's API, or, for its queue and
intermediate lists, in the store's claim scripts with the names the adapter gives). A diffq
job and its RQ job share one id.

==============================  ======  ========  ==================================================
key                             type    writer    lifetime
==============================  ======  ========  ==================================================
diffq:job:<id>                  hash    both      ``job_ttl`` from creation, renewed when the job
                                                  ends. One field per ``JobRecord`` field, each
                                                  JSON-encoded. Written only through
                                                  ``diffq.app.contract.store`` scripts, which never
                                                  recreate a deleted record.
diffq:job:<id>:image:<n>        string  worker    ``result_ttl``. PNG bytes of image n (0-based), of jobs
                                                  stored before the result store (now ``object``).
diffq:job:<id>:input:<name>     string  API       ``job_ttl`` from creation (older jobs; now ``object``). Input PNG of
                                                  an editing job: ``image`` (RGB) and, for inpainting,
                                                  ``mask`` (greyscale, white = repaint).
diffq:job:<id>:events          stream  both      ``job_ttl``, renewed with the record; 5 minutes once
                                                  the job succeeds or fails on a worker. The job's
                                                  events (``diffq.app.contract.events``): status,
                                                  progress, preview, and the terminal one.
diffq:job:<id>:preview          string  worker    ``result_ttl``; 5 minutes once the job ends
                                                  (``diffq.worker.runner.PREVIEW_AFTER_END``). PNG of the
                                                  latest preview.
diffq:job:<id>:journey:<n>      string  worker    ``result_ttl`` (older jobs; now ``object``). Animated WebP of image
                                                  n's clean-image estimate over the steps.
diffq:object:<object key>       string  both      the job's retention. With ``DIFFQ_STORE=redis`` only: an
                                                  image, journey or input (``diffq.app.storage.objects``).
diffq:store:sweeper             string  worker    a sweep interval. Lock: one store sweep at once.
diffq:model:<name>:durations    list    worker    none (20 entries). Seconds of the model's last
                                                  jobs, for queue ETAs; a worker writes its first
                                                  at once, the rest with its metrics (every 10 s).
diffq:running                   zset    worker    none. Ids of claimed, unended jobs (score: claim
                                                  time); the sweeper looks there for lost jobs.
diffq:sweeper:<model>           string  worker    a sweep interval. Lock: one sweep per model at once.
diffq:sweeper:<model>:unclaimed hash    worker    3 heartbeat TTLs, renewed by each sweep. Job id ->
                                                  unix time a sweep first saw it taken off the queue
                                                  list but unclaimed (``diffq.worker.sweeper``).
diffq:deadlines:<model>         zset    API       ``job_ttl``, renewed by each entry. Ids of the
                                                  model's jobs made with a ``deadline_at`` -> that
                                                  time; the sweeper reads the passed ones alone and
                                                  drops each once its job has ended or gone.
diffq:workers                   set     worker    none. Ids of registered workers; readers drop
                                                  ids whose worker key has expired.
diffq:worker:<worker id>        string  worker    ``heartbeat_ttl``, renewed every
                                                  ``heartbeat_interval``. JSON ``WorkerRecord``.
diffq:model:<name>              string  worker    ``heartbeat_ttl``, renewed by every worker that
                                                  serves it. JSON ``ModelRecord``: the limits the
                                                  API validates requests against.
rq:queue:diffq:<model>          list    both      RQ's queue of job ids for one model; workers also
                                                  take batch company off it (worker/batching.py).
diffq:metrics:<model>           hash    both      none. Counters and histogram buckets of ended
                                                  jobs (``diffq.app.contract.metrics``), read by
                                                  ``GET /metrics``.
diffq:metrics:models            set     both      none. Models that have a metrics hash.
diffq:fair:<queue>              zset    API       ``job_ttl``, renewed by a submit once an
                                                  eighth of it has passed. Queued job id -> its
                                                  place in the fair order (priority class, then
                                                  round: ``diffq.app.contract.tasks``).
diffq:fair:<queue>:state        hash    API       ``job_ttl``, renewed with the zset. Each
                                                  owner's latest round per class, the top, and
                                                  ``renewed`` (when both TTLs last were).
diffq:replication:mark          string  both      a minute. Written just before a ``WAIT``, on the
                                                  same connection, so the ``WAIT`` covers every
                                                  write made before it (``diffq.app.contract.replication``).
diffq:batch:<id>                hash    both      ``job_ttl`` (or its retention, if longer) from
                                                  creation; set to its retention when its last item
                                                  ends. ``BatchRecord`` fields, JSON-encoded; the
                                                  counters (``ended``, ``succeeded``, ``failed``,
                                                  ``canceled``) are raised by the store scripts as
                                                  each item ends (``diffq.app.contract.batches``).
diffq:batch:<id>:items          list    API       as its batch hash. Item job ids in item order.
==============================  ======  ========  ==================================================

API keys and tenants (``diffq.app.auth``; an owner is an API key id, or ``-`` with auth off):

==================================  ======  ========  ==============================================
key                                 type    writer    lifetime
==================================  ======  ========  ==============================================
diffq:apikey:<key id>               hash    CLI       none. ``ApiKey`` fields, JSON-encoded: name,
                                                      sha256 of the secret, limits, revoked_at; and
                                                      the rate's two window counters the API writes,
                                                      ``rate:<n>/<w>:<0|1>`` = ``"<window>:<count>"``
                                                      (rate <n> per <w> seconds; the windows of even
                                                      and odd number: ``diffq.app.contract.rate``).
diffq:apikeys                       set     CLI       none. Every key id, for ``diffq keys list``.
diffq:owner:<owner>:jobs            zset    API       ``job_ttl``, renewed at submit. The owner's
                                                      job ids -> creation time, for ``GET /v1/jobs``
                                                      (the newest ``JOBS_INDEX_MAX``); readers drop
                                                      ids whose record is gone.
diffq:owner:<owner>:queued          set     API       ``job_ttl``, renewed at submit. Ids of the
                                                      owner's jobs counted against its queued-job
                                                      cap; ended ones are dropped when it is full.
diffq:owner:<owner>:batches         zset    API       ``job_ttl``, renewed at submit. The owner's
                                                      batch ids -> creation time, for
                                                      ``GET /v1/batches``; readers drop ids whose
                                                      batch is gone.
diffq:owner:<owner>:streams         zset    API       a minute, renewed. Open event streams ->
                                                      unix time their claim lapses.
diffq:owner:<owner>:waits           zset    API       a minute, renewed. Open waits of every kind
                                                      (long polls, event streams, OpenAI-endpoint
                                                      requests) -> unix time their claim lapses.
diffq:owner:<owner>:sdapi:options   hash    API       none. The owner's AUTOMATIC1111 options
                                                      (``diffq.app.core.a1111_session``): field -> JSON
                                                      value; ``sd_model_checkpoint`` is its default
                                                      model on ``/sdapi/v1``.
diffq:owner:<owner>:sdapi:jobs      zset    API       ``job_ttl``, renewed at submit. Ids of the
                                                      owner's jobs made through ``/sdapi/v1`` ->
                                                      creation time: what its ``progress``,
                                                      ``interrupt`` and ``skip`` see and touch.
==================================  ======  ========  ==============================================

Idempotency-Key and webhooks (their modules own these keys; see each module's docstring):

==================================  ======  ========  ==============================================
key                                 type    writer    lifetime
==================================  ======  ========  ==============================================
diffq:idempotency:<sha256>          string  API       ``idempotency_ttl`` from first use. JSON
                                                      ``{body_sha256, job_id, created_at}``
                                                      (``diffq.app.core.idempotency``).
diffq:job:<id>:webhooks             list    deliverer the job record's remaining TTL. JSON of each
                                                      delivery attempt (``diffq.app.webhooks.deliver``);
                                                      deleted with the job by the API.
diffq:webhooks:outbox               stream  both      none (emptied by the deliverer). Status events
                                                      of jobs with a webhook, written by the job's
                                                      guarded scripts (``diffq.app.contract.webhook_outbox``).
diffq:webhooks:due                  zset    both      none. Delivery id -> unix time it is next due;
                                                      written by ``events.publish`` with the event, or
                                                      by the deliverer relaying the outbox.
diffq:webhook:delivery:<id>         string  both      7 days, extended while retried. JSON delivery.
diffq:webhooks:inflight             zset    deliverer none. Claimed delivery id -> lease end.
diffq:webhooks:owners               hash    deliverer none. Claimed delivery id -> claim token.
diffq:webhook:secret                string  any       none. Generated signing secret, unless
                                                      ``webhook_secret`` is set.
==================================  ======  ========  ==============================================
"""

from __future__ import annotations

PREFIX = "diffq"

RUNNING = f"{PREFIX}:running"
BATCH_PREFIX = f"{PREFIX}:batch:"
"""Prefix of a batch's keys; the store scripts build ``batch(id)`` from it."""
"""Sorted set of running job ids, scored by claim time."""

WORKERS = f"{PREFIX}:workers"
"""Set of worker ids; membership alone does not mean alive (see ``worker``)."""

STOPS = f"{PREFIX}:stops"
"""Pub/sub channel (no key): the id of a running job a client canceled or deleted, published by
``diffq.app.contract.store`` with the change, so that its worker checks the record at its next
denoising step instead of at every step (``diffq.worker.stops``)."""

JOBS_INDEX_MAX = 10_000
"""Job ids an owner's ``owner_jobs`` index keeps; older ones are trimmed at submit."""

METRICS_MODELS = f"{PREFIX}:metrics:models"
"""Set of model names that have a ``metrics`` hash."""

REPLICATION_MARK = f"{PREFIX}:replication:mark"
"""Written right before a ``WAIT`` on the same connection (``diffq.app.contract.replication``)."""


API_KEYS = f"{PREFIX}:apikeys"
"""Set of every API key id."""

RATE_FIELD_PREFIX = "rate:"
"""Prefix of the rate limiter's counters: fields of the key's ``api_key`` hash
(``diffq.app.contract.rate``), which ``diffq.app.auth.apikeys`` leaves out of the key."""


def api_key(key_id: str) -> str:
    """Hash of one API key (``diffq.app.auth.apikeys.ApiKey``)."""
    return f"{PREFIX}:apikey:{key_id}"


def owner_jobs(owner: str) -> str:
    """Sorted set of an owner's job ids by creation time (unix seconds), for listing."""
    return f"{PREFIX}:owner:{owner}:jobs"


def owner_batches(owner: str) -> str:
    """Sorted set of an owner's batch ids by creation time (unix seconds), for listing."""
    return f"{PREFIX}:owner:{owner}:batches"


def batch(batch_id: str) -> str:
    """Hash holding one batch record and its counters."""
    return f"{BATCH_PREFIX}{batch_id}"


def batch_items(batch_id: str) -> str:
    """List of a batch's item job ids, in item order."""
    return f"{BATCH_PREFIX}{batch_id}:items"


def owner_queued(owner: str) -> str:
    """Set of an owner's job ids counted against its queued-job cap."""
    return f"{PREFIX}:owner:{owner}:queued"


def sdapi_options(owner: str) -> str:
    """Hash of an owner's AUTOMATIC1111 options (``/sdapi/v1/options``)."""
    return f"{PREFIX}:owner:{owner}:sdapi:options"


def sdapi_jobs(owner: str) -> str:
    """Sorted set of an owner's ``/sdapi/v1`` job ids by creation time."""
    return f"{PREFIX}:owner:{owner}:sdapi:jobs"


def owner_streams(owner: str) -> str:
    """Sorted set of an owner's open event streams, scored by the unix time their claim lapses."""
    return f"{PREFIX}:owner:{owner}:streams"


def owner_waits(owner: str) -> str:
    """Sorted set of an owner's open waits of every kind, scored by the unix time their claim lapses."""
    return f"{PREFIX}:owner:{owner}:waits"


def fair(queue: str) -> str:
    """Sorted set of a queue's queued job ids by their place in the fair order."""
    return f"{PREFIX}:fair:{queue}"


def fair_state(queue: str) -> str:
    """Hash of a queue's fair-order bookkeeping: each owner's latest round per class, and the top."""
    return f"{PREFIX}:fair:{queue}:state"


def metrics(model: str) -> str:
    """Hash of a model's job counters and histogram buckets (``diffq.app.contract.metrics``)."""
    return f"{PREFIX}:metrics:{model}"


def job(job_id: str) -> str:
    """Hash holding one job record."""
    return f"{PREFIX}:job:{job_id}"


def image(job_id: str, index: int) -> str:
    """PNG bytes of image ``index`` of a job."""
    return f"{PREFIX}:job:{job_id}:image:{index}"


def job_input(job_id: str, name: str) -> str:
    """Normalised input PNG ``name`` ("image" or "mask") of an editing job."""
    return f"{PREFIX}:job:{job_id}:input:{name}"


INPUT_NAMES = ("image", "mask")


def events(job_id: str) -> str:
    """Stream of a job's events, read by the SSE endpoint and long polls."""
    return f"{PREFIX}:job:{job_id}:events"


def preview(job_id: str) -> str:
    """PNG of the latest preview of a running (or finished) job."""
    return f"{PREFIX}:job:{job_id}:preview"


def journey(job_id: str, index: int) -> str:
    """Animated WebP of image ``index``'s journey from noise."""
    return f"{PREFIX}:job:{job_id}:journey:{index}"


def sweeper_lock(model: str) -> str:
    """Held by the worker sweeping a model's jobs, for one sweep interval."""
    return f"{PREFIX}:sweeper:{model}"


def deadlines(model: str) -> str:
    """Sorted set of a model's jobs that have a deadline, by that deadline (unix seconds)."""
    return f"{PREFIX}:deadlines:{model}"


def sweeper_unclaimed(model: str) -> str:
    """Job ids a sweep found taken off the queue but unclaimed -> when first seen so."""
    return f"{PREFIX}:sweeper:{model}:unclaimed"


def model_durations(name: str) -> str:
    """Recent job durations of a model (seconds, newest first)."""
    return f"{PREFIX}:model:{name}:durations"


def worker(worker_id: str) -> str:
    """A live worker's registration; it expires when its heartbeats stop."""
    return f"{PREFIX}:worker:{worker_id}"


def model(name: str) -> str:
    """The registered limits of a model served by at least one live worker."""
    return f"{PREFIX}:model:{name}"


STORE_SWEEPER = f"{PREFIX}:store:sweeper"
"""Held by the worker sweeping the result store for unreferenced objects, for one sweep interval."""


def stored_object(key: str) -> str:
    """An object of the ``redis`` result store (``diffq.app.storage.objects`` makes ``key``)."""
    return f"{PREFIX}:object:{key}"
