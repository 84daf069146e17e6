"""diffq, installed under one import name: ``diffq.app``, ``diffq.worker`` and ``diffq.model``.

- ``diffq.app``: the HTTP API (FastAPI, never torch), the contract it shares with the workers
  (``diffq.app.contract``: records, keys, store scripts, events, the webhook queue), the Python
  client (``diffq.app.client``: httpx only, a plain ``pip install diffq``) and the CLI.
- ``diffq.worker``: the worker processes (RQ, one per GPU), knowing nothing of HTTP.
- ``diffq.model``: the diffusion engine and the bundled default model; its training code is
  ``diffq.model.training``, outside the runtime path.

In the repository the three are the top-level folders ``app/``, ``worker/`` and ``model/``, and
``diffq/app``, ``diffq/worker`` and ``diffq/model`` are symbolic links to them: every tool (Python,
setuptools, mypy, pytest, Docker's COPY) sees one ordinary package, and an installed wheel holds
real files under ``diffq/`` only, where they cannot collide with a user's own ``app`` or ``model``.
"""
