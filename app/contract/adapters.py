"""The LoRA adapter folder as API and workers both see it (no torch): names, base models, hashes.

An adapter is `<folder>/<name>.safetensors`. Its base model family (which models it fits)
is read, in this order, from a sidecar `<name>.json` (`{"base_model": "shapes"}`, as
`python -m diffq.model.training.train lora` writes), from the safetensors header's metadata (`diffq.base_model`,
or kohya's `ss_base_model_version`: `sd_v1` → sd1, `sd_v2*` → sd2, `sdxl*` → sdxl), else it is
unknown and the adapter is offered for every model (a misfit then fails at load, naming it).

`list_adapters(folder)` is the one listing (GET /v1/loras, and any other API that lists
adapters); `parse_prompt` reads A1111's `<lora:name:weight>` tags out of a prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

#: Same as ``diffq.model.adapters``: file stems usable as adapter names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SUFFIX = ".safetensors"
MAX_WEIGHT = 2.0
MAX_PER_REQUEST = 4
#: A1111's prompt syntax: <lora:name> or <lora:name:weight>.
PROMPT_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")

_KOHYA_FAMILIES = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"))


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter file."""

    name: str
    base_model: str | None  # the model family it was trained for; None: not recorded
    sha256: str
    size_bytes: int


_hashes: dict[Path, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256)


def list_adapters(folder: str | Path | None) -> list[AdapterInfo]:
    """Every adapter in `folder`, by name ([] when there is no folder)."""
    if folder is None or not Path(folder).is_dir():
        return []
    adapters = []
    for path in sorted(Path(folder).glob(f"*{SUFFIX}")):
        if NAME_PATTERN.match(path.stem) and path.is_file():
            adapters.append(
                AdapterInfo(
                    name=path.stem, base_model=_base_model(path), sha256=_sha256(path), size_bytes=path.stat().st_size
                )
            )
    return adapters


def fits(adapter: AdapterInfo, family: str | None) -> bool:
    """Whether `adapter` can be applied to a model of `family` (unknown on either side: yes)."""
    return adapter.base_model is None or family is None or adapter.base_model == family


def parse_prompt(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """The prompt without its `<lora:name:weight>` tags, and the tags' (name, weight text)
    in order (weight text "" when the tag has none: weight 1)."""
    tags = [(m.group(1).strip(), (m.group(2) or "").strip()) for m in PROMPT_TAG.finditer(prompt)]
    cleaned = re.sub(r"\s{2,}", " ", PROMPT_TAG.sub("", prompt)).strip(" ,")
    return cleaned, tags


def _sha256(path: Path) -> str:
    stat = path.stat()
    cached = _hashes.get(path)
    if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
        return cached[2]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    _hashes[path] = (stat.st_size, stat.st_mtime_ns, digest.hexdigest())
    return digest.hexdigest()


def _base_model(path: Path) -> str | None:
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            value = json.loads(sidecar.read_text()).get("base_model")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, str) and value:
            return value
    metadata = _header_metadata(path)
    if metadata.get("diffq.base_model"):
        return metadata["diffq.base_model"]
    kohya = metadata.get("ss_base_model_version", "")
    return next((family for prefix, family in _KOHYA_FAMILIES if kohya.startswith(prefix)), None)


def _header_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors header: an 8-byte little-endian length, then JSON."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                return {}
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
