"""diffq's GPU worker: an RQ ``SimpleWorker`` that holds its model(s) and runs only diffq's task
(``diffq.worker.models``: several models, a bounded cache of loaded pipelines, which queue next).

Importing ``worker`` is cheap; torch is imported when the engine loads.
"""
