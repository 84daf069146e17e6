"""diffq's HTTP side and the torch-free contract it shares with the workers.

Nothing under ``app`` may import torch or diffusers, directly or through a
dependency: the API process must stay small and start in about a second.
"""

from importlib import metadata

try:
    __version__: str = metadata.version("diffq")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
