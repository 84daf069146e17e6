"""diffq's model layer: the generation engine, its schedulers and the bundled "shapes" model.

Beside the engine: `diffq.model.adapters` (LoRA adapters per request, through diffusers/peft) and
`diffq.model.single_file` (single-file `.safetensors` checkpoints, through `from_single_file`).
The code that trains and evaluates the bundled model lives in `diffq.model.training`, which nothing
of the runtime imports.

Importing `model` (or `diffq.model.schedulers`, `diffq.model.engine`) does not import torch
or diffusers: the worker's modules use the names and types without the model
stack, and a worker pays for torch only when it loads a model. The API process
does not import `model` at all (see `app`). The engine's
names are importable from here too, lazily:

    from diffq.model import Engine, GenerationRequest
"""

from __future__ import annotations

from typing import Any

_ENGINE_NAMES = {
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequestError",
    "Mode",
    "ModelInfo",
    "ModelLoadError",
    "Padding",
    "StopGeneration",
    "UnknownSchedulerError",
}


def __getattr__(name: str) -> Any:
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    if name == "SCHEDULERS":
        from .schedulers import SCHEDULERS

        return SCHEDULERS
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = sorted(_ENGINE_NAMES | {"SCHEDULERS"})
