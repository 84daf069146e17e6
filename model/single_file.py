"""Single-file checkpoints: one `.safetensors` file as A1111, ComfyUI and Civitai keep them
(Stable Diffusion 1.x, 2.x, SDXL), loaded with diffusers' `from_single_file`, offline.

A single file holds weights only; the architecture (component configs, tokenizer, scheduler)
comes from a local diffusers folder of the same kind of model (its weights are not read):

1. `<name>.json` beside the checkpoint with `{"config": "<folder>"}` (relative to the file), and
   optionally diffq's model settings (`name`, `default_steps`, …, as in a folder's diffq.json);
2. else the `config` argument (`DIFFQ_SINGLE_FILE_CONFIG`).

Nothing is fetched from a model hub: `local_files_only=True`, and a missing config is an error
that says where to put one.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

SUFFIXES = (".safetensors",)


def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix in SUFFIXES


def sidecar(path: Path) -> dict[str, Any]:
    """The `<name>.json` beside a checkpoint ({} when there is none)."""
    file = path.with_suffix(".json")
    if not file.is_file():
        return {}
    raw = json.loads(file.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: must hold a JSON object")
    return raw


def config_folder(path: Path, default: str | Path | None) -> Path:
    """The diffusers folder whose configs `path` uses (see the module's order)."""
    named = sidecar(path).get("config")
    folder = (path.parent / named) if isinstance(named, str) else default
    if folder is None or not (Path(folder) / "model_index.json").is_file():
        where = f"{folder} has no model_index.json" if folder is not None else "none is configured"
        raise FileNotFoundError(
            f"{path}: a single-file checkpoint needs a local diffusers folder of the same architecture for its "
            f'configs ({where}); name one in {path.with_suffix(".json").name} as {{"config": "<folder>"}} '
            "or set DIFFQ_SINGLE_FILE_CONFIG"
        )
    return Path(folder)


def load_single_file(path: Path, config: Path, dtype: torch.dtype) -> DiffusionPipeline:
    """The pipeline class the config folder names, its weights from the single file."""
    import diffusers

    index = json.loads((config / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index["_class_name"])
    overrides: dict[str, Any] = {}
    if "safety_checker" in index:
        overrides.update(safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
        return pipeline_class.from_single_file(
            str(path), config=str(config), torch_dtype=dtype, local_files_only=True, **overrides
        )
