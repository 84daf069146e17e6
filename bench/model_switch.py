"""What switching costs on a multi-model worker: `python bench/model_switch.py --repeat 5`.

Side by side in one run, on one device (`--device`), for one model (`--model`, default the
bundled shapes model) and one LoRA adapter (`--lora`, default the shipped stripes adapter):

- load from disk: `diffq.worker.models.ModelCache` bringing back a model it evicted, no CPU-RAM tier
  (what `Engine.load` does: read the folder, build the pipeline, move it to the device);
- load from the CPU-RAM tier: the same cache with `DIFFQ_MODEL_CPU_MEMORY_BYTES` set (the
  evicted pipeline copied back to the device);
- adapter load: the first job with an adapter over the same job without (`load_lora_weights`
  plus `set_adapters`), adapter reuse (cached: `set_adapters` only) and unload
  (`delete_adapters`), each timed alone around the engine's `diffq.model.adapters.Adapters`;
- one job of `--steps` steps, plain and with the adapter, for scale.

Every figure is the median of `--repeat` runs; ratios are against a load from disk.
On a CPU device the CPU-RAM tier moves nothing (the weights already live in RAM), so its
figure there is only the bookkeeping; on a GPU it is the host-to-device copy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from diffq.model.engine import Engine, GenerationRequest
from diffq.worker.models import ModelCache

ROOT = Path(__file__).resolve().parent.parent


def timed(action) -> float:
    started = time.perf_counter()
    action()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def switch_seconds(model: Path, device: str, cpu_tier: bool) -> float:
    """Seconds for the cache to bring `model` back after a second model evicted it."""
    load = lambda name: Engine.load(model, device=device, name=name)  # noqa: E731
    probe = load("probe").memory_bytes()
    cache = ModelCache(load, device_budget=int(probe * 1.5), cpu_budget=int(probe * 1.5) if cpu_tier else 0)
    cache.get("a")
    cache.get("b")  # evicts a (to CPU RAM with the tier, else drops it)
    return timed(lambda: cache.get("a"))


def adapter_seconds(engine: Engine, lora: str, steps: int) -> dict[str, float]:
    pipe, adapters = engine.pipe, engine.adapters
    request = GenerationRequest(prompt="a small red circle on the left, blue background", steps=steps, seed=1)
    styled = GenerationRequest(**{**request.__dict__, "loras": ((lora, 1.0),)})
    out = {"job, plain": timed(lambda: engine.generate([request]))}
    out["adapter load (load_lora_weights + set_adapters)"] = timed(lambda: adapters.activate(pipe, ((lora, 1.0),)))
    adapters.deactivate(pipe)
    out["adapter reuse (cached: set_adapters)"] = timed(lambda: adapters.activate(pipe, ((lora, 0.8),)))
    out["adapter off (disable_lora)"] = timed(lambda: adapters.deactivate(pipe))
    out["job, with the adapter (cached)"] = timed(lambda: engine.generate([styled]))
    out["adapter unload (delete_adapters)"] = timed(lambda: adapters.unload_all(pipe))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "shapes")
    parser.add_argument("--lora", type=Path, default=ROOT / "model" / "loras" / "stripes.safetensors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        rows.setdefault("model load from disk", []).append(switch_seconds(args.model, args.device, cpu_tier=False))
        rows.setdefault("model load from the CPU-RAM tier", []).append(
            switch_seconds(args.model, args.device, cpu_tier=True))
        engine = Engine.load(args.model, device=args.device, lora_dir=args.lora.parent)
        for name, seconds in adapter_seconds(engine, args.lora.stem, args.steps).items():
            rows.setdefault(name, []).append(seconds)
    disk = statistics.median(rows["model load from disk"])
    print(f"model {args.model.name}, adapter {args.lora.stem}, device {args.device}, {args.threads} thread(s), "
          f"{args.steps}-step jobs, median of {args.repeat}")
    print(f"{'what':<52}{'seconds':>10}{'× disk load':>14}")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"{name:<52}{median:>10.4f}{median / disk:>14.3f}")


if __name__ == "__main__":
    main()
