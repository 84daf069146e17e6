"""LoRA adapters per request: files in a folder, loaded into a pipeline with diffusers/peft.

    adapters = Adapters("model/loras", cache_size=8)
    with adapters.applied(pipe, [("stripes", 0.8)]):   # per pipeline call
        pipe(...)

An adapter is `<folder>/<name>.safetensors` in any LoRA layout diffusers'
`load_lora_weights` reads (diffusers/peft, kohya/A1111). Loading, weighting and
removing are diffusers' own (`load_lora_weights`, `set_adapters`, `disable_lora`,
`delete_adapters`): nothing here merges weights by hand.

What it promises:

- Loaded adapters stay in the pipeline (up to `cache_size`, the least recently
  used deleted first), so a second job with the same adapter does not read the file.
- A call without adapters runs with every adapter disabled: peft's layers then
  compute the base layer alone, so the pixels are those of a pipeline that never
  loaded one (the tests compare the bytes with a fresh worker's).
- The file's sha256 is read once per (size, mtime) and names the exact weights
  in job records and image metadata.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

#: Adapter names: file stems of this form (peft adapter names, A1111's `<lora:name:weight>`).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SUFFIX = ".safetensors"
MAX_WEIGHT = 2.0  # |weight| above this mostly makes noise; refused, not clipped
MAX_PER_REQUEST = 4

#: (name, weight) pairs, in the order the request gave them.
LoraSpec = tuple[tuple[str, float], ...]


class Adapters:
    """The adapter folder of one engine, and which adapters its pipeline holds."""

    def __init__(self, folder: str | Path | None, cache_size: int = 8) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.cache_size = max(1, cache_size)
        self._loaded: OrderedDict[str, str] = OrderedDict()  # name -> sha256 of the file loaded
        self._hashes: dict[Path, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256)

    def available(self) -> list[str]:
        """Names of the adapter files in the folder, sorted."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob(f"*{SUFFIX}") if NAME_PATTERN.match(p.stem))

    @property
    def loaded(self) -> list[str]:
        """Adapters in the pipeline now, least recently used first."""
        return list(self._loaded)

    def check(self, loras: Sequence[tuple[str, float]]) -> str | None:
        """What is wrong with a request's adapters (a message naming what is accepted), or None."""
        if len(loras) > MAX_PER_REQUEST:
            return f"at most {MAX_PER_REQUEST} adapters per request, got {len(loras)}"
        names = [name for name, _ in loras]
        if len(set(names)) != len(names):
            return f"an adapter appears twice: {', '.join(names)}"
        available = self.available()
        for name, weight in loras:
            if name not in available:
                return f"unknown adapter {name!r}; available: {', '.join(available) or 'none'}"
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int | float)
                or not math.isfinite(weight)
                or abs(weight) > MAX_WEIGHT
            ):
                return f"weight of {name!r} is {weight!r}; accepted: -{MAX_WEIGHT} to {MAX_WEIGHT}"
        return None

    def sha256(self, name: str) -> str:
        """sha256 (hex) of the adapter's file, re-read only when its size or mtime changes."""
        path = self._path(name)
        stat = path.stat()
        cached = self._hashes.get(path)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        self._hashes[path] = (stat.st_size, stat.st_mtime_ns, digest.hexdigest())
        return digest.hexdigest()

    @contextmanager
    def applied(self, pipe: DiffusionPipeline, loras: LoraSpec) -> Iterator[None]:
        """Run the block with exactly `loras` active on `pipe` (none: all disabled)."""
        self.activate(pipe, loras)
        try:
            yield
        finally:
            self.deactivate(pipe)

    def activate(self, pipe: DiffusionPipeline, loras: LoraSpec) -> None:
        """Make exactly `loras` active, loading those not in the pipeline yet."""
        if not loras:
            self.deactivate(pipe)
            return
        for name, _ in loras:
            self._load(pipe, name, keep={n for n, _ in loras})
        pipe.enable_lora()
        pipe.set_adapters([name for name, _ in loras], [float(weight) for _, weight in loras])

    def deactivate(self, pipe: DiffusionPipeline) -> None:
        """Every adapter off (they stay loaded): the base layers compute alone."""
        if self._loaded:
            pipe.disable_lora()

    def unload_all(self, pipe: DiffusionPipeline) -> None:
        """Take every adapter out of the pipeline (diffusers' `unload_lora_weights`)."""
        if self._loaded:
            pipe.unload_lora_weights()
            self._loaded.clear()

    def _load(self, pipe: DiffusionPipeline, name: str, keep: set[str]) -> None:
        sha = self.sha256(name)
        if self._loaded.get(name) == sha:
            self._loaded.move_to_end(name)
            return
        if name in self._loaded:  # the file changed since it was loaded
            pipe.delete_adapters([name])
            del self._loaded[name]
        while len(self._loaded) >= self.cache_size:
            oldest = next((n for n in self._loaded if n not in keep), None)
            if oldest is None:
                break
            pipe.delete_adapters([oldest])
            del self._loaded[oldest]
        pipe.load_lora_weights(str(self.folder), weight_name=f"{name}{SUFFIX}", adapter_name=name)
        self._loaded[name] = sha

    def _path(self, name: str) -> Path:
        if self.folder is None or not NAME_PATTERN.match(name):
            raise FileNotFoundError(f"no adapter {name!r}")
        return self.folder / f"{name}{SUFFIX}"
