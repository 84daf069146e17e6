"""Where finished images, journeys and stored input uploads live (the result store).

- ``base``: the ``ResultStore`` interface every backend meets, and its two errors.
- ``objects``: object keys, made by the server only (job id, attempt token, fixed names).
- ``redis_store``, ``file_store``, ``s3_store``: the backends (``DIFFQ_STORE``).
- ``factory``: the store a process opens from its settings, checked before it serves.
- ``sweep``: removes objects no live job references (expired, deleted, stale attempts).

Redis keeps job state only (records, events, queues, previews); with ``file`` or ``s3`` no
image byte is written to Redis.
"""
