"""Per-image latency of the default model on this machine: `python bench/model_latency.py`.

Runs the engine in-process (no service) at docs/model.md's settings (DPM-Solver++ 2M, 20 steps,
guidance 5, 64×64) for batch 1 and batch 8 (or `--batches 1 4 8`) side by side, interleaved over
several rounds so all see the same machine load, and prints seconds per image and their ratios.
`--versus model/shapes-lcm` adds a second model at its own defaults (the 4-step variant: LCM,
4 steps, guidance 5 as its UNet's input) to the same rounds and prints its ratio to the first.
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
    parser.add_argument("--versus", type=Path, default=None, help="a second model, run at its own defaults")
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
    # (label, engine, steps, scheduler, guidance)
    cases = [(args.model.name, engine, args.steps, "dpmpp_2m", 5.0)]
    if args.versus is not None:
        other = Engine.load(args.versus)
        info = other.info
        cases.append((args.versus.name, other, info.default_steps, info.default_scheduler, info.default_guidance_scale))

    def run(case: int, batch: int, round_: int) -> float:
        _, eng, steps, scheduler, guidance = cases[case]
        requests = [
            GenerationRequest(
                prompt=prompts[i % 2], seed=1000 * round_ + i, steps=steps, guidance_scale=guidance, scheduler=scheduler
            )
            for i in range(batch)
        ]
        started = time.perf_counter()
        with torch.inference_mode():
            eng.generate(requests)
        return (time.perf_counter() - started) / batch

    keys = [(case, batch) for case in range(len(cases)) for batch in args.batches]
    per_image: dict[tuple[int, int], list[float]] = {key: [] for key in keys}
    for key in keys:  # warm-up
        run(*key, 0)
    for r in range(1, args.rounds + 1):
        for key in keys:
            per_image[key].append(run(*key, r))
    print(f"device={engine.info.device} threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"{'model':<14}{'steps':>6} {'scheduler':<10}{'batch':>6} {'s/image (median)':>18} {'min':>8} {'max':>8}")
    for (case, batch), values in per_image.items():
        label, _, steps, scheduler, _ = cases[case]
        print(
            f"{label:<14}{steps:>6} {scheduler:<10}{batch:>6} {statistics.median(values):>18.3f} "
            f"{min(values):>8.3f} {max(values):>8.3f}"
        )
    for case in range(len(cases)):
        base = statistics.median(per_image[case, args.batches[0]])
        for batch in args.batches[1:]:
            print(
                f"{cases[case][0]}: batch {batch} per-image time / batch {args.batches[0]}: "
                f"{statistics.median(per_image[case, batch]) / base:.2f}"
            )
    for case in range(1, len(cases)):
        for batch in args.batches:
            ratio = statistics.median(per_image[0, batch]) / statistics.median(per_image[case, batch])
            print(f"batch {batch}: {cases[0][0]} s/image / {cases[case][0]} s/image: {ratio:.2f}")


if __name__ == "__main__":
    main()
