"""Signed webhooks that are not lost: URL checks, signing, a delivery queue and its deliverer.

- ``urls``: which URLs diffq may call (``check_url`` at submit, ``resolve_checked`` per send).
- ``signing``: Standard Webhooks headers and the deployment's secret (``get_secret``).
- ``deliver``: the ``Deliverer`` process (``python -m diffq.app.webhooks.deliver``) and ``attempts``.

The delivery queue itself is part of the contract, written by the job scripts and read here:
``diffq.app.contract.webhook_queue`` (``schedule`` a delivery in the same Redis transaction as the job
change it reports) and ``diffq.app.contract.webhook_outbox`` (status events the job scripts wrote with the
change, ``relay``ed into deliveries).

Nothing here imports torch or numpy: the API and the deliverer both use it.
"""
