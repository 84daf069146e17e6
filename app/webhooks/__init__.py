"""Signed webhooks that are not lost: URL checks, signing, a delivery queue and its deliverer.

- ``urls``: which URLs diffq may call (``check_url`` at submit, ``resolve_checked`` per send).
- ``signing``: Standard Webhooks headers and the deployment's secret (``get_secret``).
- ``queue``: ``schedule`` a delivery in the same Redis transaction as the job change it reports.
- ``outbox``: status events the job scripts wrote with the change, ``relay``ed into deliveries.
- ``deliver``: the ``Deliverer`` process (``python -m app.webhooks.deliver``) and ``attempts``.

Nothing here imports torch or numpy: the API and the deliverer both use it.
"""
