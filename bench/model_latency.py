"""Per-image latency of the default model on this machine: `python bench/model_latency.py`.

Runs the engine in-process (no service) at docs/model.md's settings (DPM-Solver++ 2M, 20 steps,
guidance 5, 64×64) for batch 1 and batch 8 (or `--batches 1 4 8`) side by side, interleaved over
several rounds so all see the same machine load, and prints seconds per image and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "shapes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (the first is the base)")
    args = parser.parse_args()

    import torch

    from diffq.model.engine import Engine, GenerationRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.load(args.model)
    prompts = ["a small red circle on the left, blue background", "a large yellow star at the top, black background"]

    def run(batch: int, round_: int) -> float:
        requests = [GenerationRequest(prompt=prompts[i % 2], seed=1000 * round_ + i, steps=args.steps,
                                      guidance_scale=5.0, scheduler="dpmpp_2m") for i in range(batch)]
        started = time.perf_counter()
        with torch.inference_mode():
            engine.generate(requests)
        return (time.perf_counter() - started) / batch

    per_image: dict[int, list[float]] = {batch: [] for batch in args.batches}
    for batch in per_image:  # warm-up
        run(batch, 0)
    for r in range(1, args.rounds + 1):
        for batch in per_image:
            per_image[batch].append(run(batch, r))
    base = statistics.median(per_image[args.batches[0]])
    print(f"model={args.model.name} device={engine.info.device} threads={torch.get_num_threads()} "
          f"steps={args.steps} scheduler=dpmpp_2m rounds={args.rounds}")
    print(f"{'batch':>6} {'s/image (median)':>18} {'min':>8} {'max':>8}")
    for batch, values in per_image.items():
        print(f"{batch:>6} {statistics.median(values):>18.3f} {min(values):>8.3f} {max(values):>8.3f}")
    for batch in args.batches[1:]:
        print(f"batch {batch} per-image time / batch {args.batches[0]}: "
              f"{statistics.median(per_image[batch]) / base:.2f}")


if __name__ == "__main__":
    main()
