"""diffq's HTTP side and the torch-free contract it shares with the workers.

The API process never imports torch or diffusers, directly or through a dependency: it must
stay small and start in about a second. Importing any module under ``app`` imports neither;
two places reach the model stack only when called, outside the API process:
``diffq.app.provenance.watermark`` (invisible-watermark, which imports torch: in the worker and in
``diffq verify``) and ``diffq.app.cli``'s ``diffq worker``/``diffq up`` (the ``worker`` package).
"""

from importlib import metadata

try:
    __version__: str = metadata.version("diffq")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
