"""diffq's GPU worker: an RQ ``SimpleWorker`` that holds one model and runs only diffq's task.

Importing ``worker`` is cheap; torch is imported when the engine loads.
"""
