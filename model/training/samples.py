"""The README's sample sheet: `python -m diffq.model.training.samples` (writes model/shapes/samples.png).

The same prompts and seeds (the evaluation's first ones: never used in training) through the
20-step model (DPM-Solver++, guidance 5) and its 4-step variant (LCM, guidance 5), the two side
by side in each pair of columns, "<steps>: <prompt>" under each image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffq.model.training import evaluate, shapes_data

MODELS = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffq.model.training.samples", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODELS / "shapes")
    parser.add_argument("--variant", type=Path, default=MODELS / "shapes-lcm")
    parser.add_argument("-n", type=int, default=8, help="prompts (seeds 0..n-1)")
    parser.add_argument("--out", type=Path, default=MODELS / "shapes" / "samples.png")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    seeds = list(range(args.n))
    captions = [shapes_data.sample(seed)[1] for seed in seeds]
    runs = {"20 steps": (args.model, 20, "dpmpp_2m"), "4 steps (LCM)": (args.variant, 4, "lcm")}
    images = {
        label: evaluate.generate(
            model,
            captions,
            seeds,
            argparse.Namespace(
                steps=steps, guidance=5.0, scheduler=scheduler, batch=len(seeds), device=args.device, lora=None
            ),
        )
        for label, (model, steps, scheduler) in runs.items()
    }
    cells, notes = [], []
    for i, caption in enumerate(captions):
        for label in runs:
            cells.append(images[label][i])
            notes.append(f"{label}: {caption}")
    evaluate.grid(cells, notes, args.out)
    print(f"wrote {args.out} ({len(captions)} prompts, {len(runs)} models)")


if __name__ == "__main__":
    main()
