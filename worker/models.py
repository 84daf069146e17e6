"""The models one worker serves: which exist, which are loaded, and which queue to take from next.

- ``model_sources``: the settings' models (``DIFFQ_MODEL_PATH``, ``DIFFQ_MODELS``, ``DIFFQ_MODELS_DIR``)
  as name → path, each a diffusers folder or a single-file ``.safetensors`` checkpoint.
- ``ModelCache``: loaded engines, least recently used evicted once their device memory passes
  ``DIFFQ_MODEL_MEMORY_BYTES`` (the one in use always stays); evicted engines go to a second tier
  in CPU RAM up to ``DIFFQ_MODEL_CPU_MEMORY_BYTES`` (a switch back is then a copy to the device,
  not a read from disk), beyond it they are dropped.
- ``QueueChooser``: the order in which the worker's RQ loop looks at its models' queues. Loaded
  models first (most recently used first), so the worker does not thrash; but a queue that has
  had jobs waiting while ``switch_after`` runs of other models were taken goes first.

The bound: a job at the head of a served model's queue waits for at most
``switch_after + (served models - 2)`` runs of other models on a worker (a batch is one run)
before that worker takes it, and then pays one model load.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from diffq.app.settings import Settings

if TYPE_CHECKING:
    from diffq.model.engine import Engine

log = logging.getLogger(__name__)


class ModelConfigError(ValueError):
    """The settings name models that cannot be served (a bad entry, a name twice, a missing path)."""


def model_sources(settings: Settings) -> dict[str, Path]:
    """Every model this worker serves, by name, the main one (DIFFQ_MODEL_PATH) first.

    The main model's name is DIFFQ_MODEL_NAME, else its diffq.json's, else its folder's.
    """
    sources: dict[str, Path] = {}
    extra = bool(settings.models.strip() or settings.models_dir)
    if not extra or settings.model_name is not None or _explicit_main(settings):
        sources[settings.model_name or _own_name(settings.model_path)] = settings.model_path
    for entry in filter(None, (item.strip() for item in settings.models.split(","))):
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ModelConfigError(f"DIFFQ_MODELS: {entry!r} is not name=path")
        _add(sources, name.strip(), Path(path.strip()))
    if settings.models_dir is not None:
        if not settings.models_dir.is_dir():
            raise ModelConfigError(f"DIFFQ_MODELS_DIR: {settings.models_dir} is not a folder")
        for found in sorted(settings.models_dir.iterdir()):
            if (found / "model_index.json").is_file() or (found.suffix == ".safetensors" and found.is_file()):
                _add(sources, found.stem if found.is_file() else found.name, found)
    return sources  # a path that is no model fails in Engine.load, which says why


def _explicit_main(settings: Settings) -> bool:
    """Whether DIFFQ_MODEL_PATH was set (not the bundled default), so it is served beside the others."""
    return "model_path" in settings.model_fields_set


def _own_name(path: Path) -> str:
    import json

    settings_file = path / "diffq.json"
    if settings_file.is_file():
        name = json.loads(settings_file.read_text()).get("name")
        if isinstance(name, str) and name:
            return name
    return path.stem if path.is_file() else path.resolve().name


def _add(sources: dict[str, Path], name: str, path: Path) -> None:
    if name in sources:
        if sources[name].resolve() == path.resolve():  # the same model named twice (`diffq up` names its own)
            return
        raise ModelConfigError(f"model name {name!r} is given twice ({sources[name]} and {path})")
    sources[name] = path


class ModelCache:
    """Loaded engines by name, bounded by device memory, with an optional CPU-RAM tier."""

    def __init__(
        self,
        load: Callable[[str], Engine],
        device_budget: int = 0,
        cpu_budget: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.device_budget = device_budget  # bytes; 0: unbounded
        self.cpu_budget = cpu_budget  # bytes; 0: no second tier
        self.clock = clock
        self._device: OrderedDict[str, Engine] = OrderedDict()  # least recently used first
        self._cpu: OrderedDict[str, Engine] = OrderedDict()
        #: Seconds the latest load (or move back from CPU RAM) of each model took.
        self.load_seconds: dict[str, float] = {}
        #: How each model last became loaded: "disk" or "cpu".
        self.load_source: dict[str, str] = {}

    @property
    def loaded(self) -> list[str]:
        """Models on the device now, most recently used first."""
        return list(reversed(self._device))

    @property
    def parked(self) -> list[str]:
        """Models in the CPU-RAM tier, most recently used first."""
        return list(reversed(self._cpu))

    def get(self, name: str) -> Engine:
        """The engine of `name`, loading it (from CPU RAM, else from disk) and evicting others if needed."""
        engine = self._device.get(name)
        if engine is not None:
            self._device.move_to_end(name)
            return engine
        started = self.clock()
        engine = self._cpu.pop(name, None)
        if engine is not None:
            engine.to_device()
            self.load_source[name] = "cpu"
        else:
            engine = self._load(name)
            self.load_source[name] = "disk"
        self.load_seconds[name] = round(self.clock() - started, 3)
        log.info("model %r loaded from %s in %.2f s", name, self.load_source[name], self.load_seconds[name])
        self._device[name] = engine
        self._evict(keep=name)
        return engine

    def _evict(self, keep: str) -> None:
        evicted = False
        while self.device_budget and len(self._device) > 1 and self._bytes(self._device) > self.device_budget:
            name = next(n for n in self._device if n != keep)
            engine = self._device.pop(name)
            if self.cpu_budget and engine.memory_bytes() <= self.cpu_budget:
                engine.to_cpu()
                self._cpu[name] = engine
                log.info("model %r evicted from the device to CPU RAM", name)
                while self._bytes(self._cpu) > self.cpu_budget:
                    dropped, _ = self._cpu.popitem(last=False)
                    log.info("model %r dropped from CPU RAM", dropped)
            else:
                log.info("model %r evicted", name)
            del engine  # the reference, so that gc.collect() below can free its tensors
            evicted = True
        if evicted:  # a dropped pipeline's tensors may sit in reference cycles: free them now
            import gc

            gc.collect()

    @staticmethod
    def _bytes(engines: Mapping[str, Engine]) -> int:
        return sum(engine.memory_bytes() for engine in engines.values())


class QueueChooser:
    """Orders a multi-model worker's queues before each dequeue (see the module's bound)."""

    def __init__(self, models: list[str], switch_after: int) -> None:
        self.models = list(models)
        self.switch_after = switch_after
        self.passed_over = dict.fromkeys(self.models, 0)  # runs of other models taken while it waited
        self._waiting: dict[str, bool] = {}

    def order(self, loaded: list[str], waiting: Mapping[str, bool]) -> list[str]:
        """Model names in the order to look at their queues: overdue ones (longest passed over
        first), then loaded ones (most recently used first), then the rest as configured."""
        self._waiting = dict(waiting)
        overdue = sorted(
            (m for m in self.models if waiting.get(m) and self.passed_over[m] >= self.switch_after),
            key=lambda m: -self.passed_over[m],
        )
        hot = [m for m in loaded if m in self.passed_over and m not in overdue]
        return overdue + hot + [m for m in self.models if m not in overdue and m not in hot]

    def took(self, model: str) -> None:
        """A run of `model` was taken: every other queue that had jobs waiting was passed over."""
        for name in self.models:
            if name == model or not self._waiting.get(name):
                self.passed_over[name] = 0
            else:
                self.passed_over[name] += 1
