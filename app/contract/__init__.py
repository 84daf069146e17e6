"""What the API and the workers agree on, importable without torch and without the API's modules.

Settings reach it as arguments (``connection.RedisSettings``, ``rq_adapter.JobTimes``: the fields
it reads of ``diffq.app.settings.Settings``), never by importing ``diffq.app.settings``; tests/test_boundaries.py
checks what importing it brings in.

- ``keys``: every Redis key diffq writes, its type and its lifetime.
- ``status``: job statuses and the one mapping from RQ's statuses.
- ``records``: the pydantic records stored under those keys.
- ``rules``: the request rules the API checks at submit and the engine again before it runs.
- ``store``: the atomic operations on job records (create, claim, progress, finish, delete).
- ``registry``: worker and model registration with heartbeats.
- ``rq_adapter``: every touch of RQ: the single task a worker runs, the queue each model uses,
  enqueue, and RQ's bookkeeping of what diffq decides (cancel, delete, requeue, batches, lost jobs).
- ``tasks``: the task and queue names, kept at their old import path (from ``rq_adapter``).
- ``connection``: every Redis client diffq opens, plain or through Sentinel.
- ``replication``: ``WAIT`` for replicas before a write counts as acknowledged.
- ``memory``: refuse an evicting Redis; its used and maximum memory.
- ``webhook_queue``: ``schedule`` a webhook delivery in the same transaction as the change it reports.
- ``webhook_outbox``: status events the job scripts write with the change, ``relay``ed into deliveries.
- ``adapters``: the LoRA adapter folder (names, base models, hashes) and A1111's prompt tags.
"""
