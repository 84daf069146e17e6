"""Measure prompt adherence of the shapes model: `python -m diffq.model.training.evaluate [--source …]`.

Each evaluation prompt is the caption of a procedurally generated scene with a seed below
`diffq.model.training.train.TRAIN_SEED_BASE` (training never sees those). The generated image is read
back with `shapes_data.analyse` and scored on what the caption states:

- background: the most common colour of the border is the one asked for
- shape colour / shape / position: for one-shape prompts
- both colours: for two-shape prompts, each half of the image has the colour asked for it
  (the halves the caption names; a caption that names no places allows any of the four layouts)

`--lora model/loras/stripes.safetensors` generates with a LoRA adapter (`--lora-weight`, default 1)
and also reports `stripes`: the share of images whose background is striped
(`shapes_data.has_stripes`), the style the shipped adapter teaches; the base model gives ~0.

For one-shape prompts it also measures shape fidelity (`model.fidelity`): IoU with the
renderer's ideal shape of the asked kind and size (median and 10th percentile per kind and
size), the stricter judgements (square fills its box, circle is not a square, star has its
points) and speckle (off-colour pixels inside the shape). `--prompts one-shape` takes the
first n one-shape scenes instead of the first n scenes; `--worst PATH` saves the worst IoUs
beside their true images.

`--source reconstruction` scores the VAE's reconstructions of the true images instead: the
ceiling the UNet can reach. `--source truth` scores the rendered scenes (a self-check of
the scorer: adherence 100% everywhere, median IoU ≥ 0.94 in every group).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from diffq.model.training import fidelity, shapes_data

TARGETS = {"background": 0.98, "shape_colour": 0.95, "shape": 0.90, "position": 0.90, "both_colours": 0.85}


def prompt_kind(scene: shapes_data.Scene) -> str:
    if len(scene.shapes) == 2:
        return "two shapes"
    return "one shape, full" if {"position", "size"} <= scene.mentions else "one shape, short"


def score(image: Image.Image, scene: shapes_data.Scene, found: shapes_data.Analysis | None = None) -> dict[str, bool]:
    """Which of the caption's statements the image satisfies (`found`: its analysis, if already made)."""
    found = found or shapes_data.analyse(image, scene)
    checks: dict[str, bool] = {}
    if "background" in scene.mentions:
        checks["background"] = found.background == scene.background
    if len(scene.shapes) == 1:
        shape, got = scene.shapes[0], found.shapes[0]
        checks["shape_colour"] = got["colour"] == shape.colour
        checks["shape"] = got["kind"] == shape.kind
        if "position" in scene.mentions:
            checks["position"] = got["position"] == shape.position
    else:
        checks["both_colours"] = any(
            all(g["colour"] == s.colour for s, g in zip(placed.shapes, analysis.shapes, strict=False))
            for placed, analysis in arrangements(image, scene, found)
        )
    return checks


def arrangements(image: Image.Image, scene: shapes_data.Scene, found: shapes_data.Analysis):
    """The two-shape layouts an image may be read against, with its analysis for each: the
    places the caption names or, when it names none ("a red circle and a blue star"), any of
    the four (left/right, right/left, top/bottom, bottom/top). The rendered training scene
    had one of them at random, which the prompt does not say, so no model could know it."""
    yield scene, found
    if "position" not in scene.mentions:
        for pair in shapes_data.PAIRS:
            placed = dataclasses.replace(
                scene,
                shapes=tuple(
                    dataclasses.replace(shape, position=position)
                    for shape, position in zip(scene.shapes, pair, strict=True)
                ),
            )
            if placed != scene:
                yield placed, shapes_data.analyse(image, placed)


def generate(model: Path, prompts: list[str], seeds: list[int], args) -> list[Image.Image]:
    import torch

    from diffq.model.engine import Engine, GenerationRequest

    lora = args.lora
    engine = Engine.load(model, device=args.device, lora_dir=lora.parent if lora else None)
    loras = ((lora.stem, args.lora_weight),) if lora else ()
    images: list[Image.Image] = []
    for start in range(0, len(prompts), args.batch):
        requests = [
            GenerationRequest(
                prompt=p, seed=s, steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler, loras=loras
            )
            for p, s in zip(prompts[start : start + args.batch], seeds[start : start + args.batch], strict=True)
        ]
        with torch.inference_mode():
            images += [r.images[0] for r in engine.generate(requests)]
    return images


def reconstruct(model: Path, truths: list[Image.Image], device: str) -> list[Image.Image]:
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model / "vae").to(device).eval()
    x = torch.from_numpy(np.stack([np.asarray(im) for im in truths]).transpose(0, 3, 1, 2)).float() / 127.5 - 1
    out = []
    with torch.inference_mode():
        for chunk in x.split(64):
            rec = vae(chunk.to(device), sample_posterior=False).sample.clamp(-1, 1)
            arr = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            out += [Image.fromarray(a) for a in arr]
    return out


def grid(images: list[Image.Image], captions: list[str], path: Path, columns: int = 4) -> None:
    """Images with their prompts underneath, for docs/model.md."""
    cell_w, cell_h, scale = 200, 236, 3
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(image.resize((64 * scale, 64 * scale), Image.Resampling.NEAREST), (x + 4, y + 4))
        words, lines, line = caption.split(), [], ""
        for w in words:  # wrap to the cell width
            if len(line) + len(w) > 32:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:3]):
            draw.text((x + 4, y + 64 * scale + 6 + 11 * k), text, fill="black")
    sheet.save(path)


def shape_fidelity(
    images: list[Image.Image],
    scenes: list[shapes_data.Scene],
    truths: list[Image.Image],
    captions: list[str],
    worst: Path | None = None,
) -> dict:
    """Print and return `fidelity.summarise` over the one-shape prompts (`worst`: save the 8
    lowest IoUs, each generated image after its true one)."""
    picked = [i for i, scene in enumerate(scenes) if len(scene.shapes) == 1]
    measured = [
        (scenes[i].shapes[0], fidelity.measure(images[i], scenes[i].shapes[0], "size" not in scenes[i].mentions))
        for i in picked
    ]
    summary = fidelity.summarise(measured)
    print(f"shape fidelity (one-shape prompts, n={summary['n']}): IoU with the renderer's shape")
    print(f"  {'size kind':<16}{'n':>4}{'median':>8}{'p10':>8}")
    for group, row in summary["iou"].items():
        print(f"  {group:<16}{row['n']:>4}{row['median']:>8.2f}{row['p10']:>8.2f}")
    print(f"  {'all':<16}{summary['n']:>4}{summary['iou_all']['median']:>8.2f}{summary['iou_all']['p10']:>8.2f}")
    rules = ", ".join(f"{k} {v:.2f}" for k, v in summary["strict"].items() if v is not None)
    print(f"stricter judgements: {rules}; all {summary['strict_all']:.2f}")
    print(
        f"speckle ≤ {fidelity.SPECKLE_ALLOWED:.0%} of the shape: {summary['speckle_at_most_1pct']:.2f} of images; "
        f"speckle-free {summary['speckle_free']:.2f}"
    )
    met = fidelity.targets_met(summary)
    print(
        "fidelity targets: "
        + ", ".join(f"{k} ≥ {t} {'met' if met[k] else 'NOT met'}" for k, t in fidelity.TARGETS.items())
    )
    if worst is not None and measured:
        order = sorted(range(len(measured)), key=lambda k: measured[k][1].iou)[:8]
        pairs, notes = [], []
        for k in order:
            i, f = picked[k], measured[k][1]
            pairs += [truths[i], images[i]]
            notes += [f"truth: {captions[i]}", f"IoU {f.iou:.2f} fill {f.fill:.2f} speckle {f.speckle:.1%}"]
        grid(pairs, notes, worst)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m diffq.model.training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).parent.parent / "shapes")
    parser.add_argument("--source", choices=["model", "reconstruction", "truth"], default="model")
    parser.add_argument("-n", type=int, default=240, help="number of prompts (seeds 0..n-1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--grid", type=Path, default=None, help="also save a grid of the first 16")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--lora", type=Path, default=None, help="a LoRA adapter file to generate with")
    parser.add_argument("--lora-weight", type=float, default=1.0)
    parser.add_argument(
        "--prompts",
        choices=["all", "one-shape"],
        default="all",
        help="all: seeds 0..n-1; one-shape: the first n seeds whose scene has one shape",
    )
    parser.add_argument("--worst", type=Path, default=None, help="also save the 8 worst IoUs beside their truth")
    args = parser.parse_args(argv)

    seeds = list(range(args.n))
    if args.prompts == "one-shape":
        seeds = [s for s in range(args.n * 4) if len(shapes_data.sample(s)[2].shapes) == 1][: args.n]
    samples = [shapes_data.sample(seed) for seed in seeds]
    scenes = [s for _, _, s in samples]
    captions = [c for _, c, _ in samples]
    truths = [im for im, _, _ in samples]
    started = time.perf_counter()
    if args.source == "truth":
        images = truths
    elif args.source == "reconstruction":
        images = reconstruct(args.model, truths, "cpu" if args.device == "auto" else args.device)
    else:
        images = generate(args.model, captions, seeds, args)
    elapsed = time.perf_counter() - started

    by_kind: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    # one-shape prompts: (kind asked, size asked) -> kinds the scorer found
    shapes_found: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for image, scene in zip(images, scenes, strict=True):
        found = shapes_data.analyse(image, scene)
        for check, ok in score(image, scene, found).items():
            by_kind[prompt_kind(scene)][check].append(ok)
            by_kind["all"][check].append(ok)
        if len(scene.shapes) == 1:
            shapes_found[scene.shapes[0].kind, scene.shapes[0].size][found.shapes[0]["kind"]] += 1

    checks = list(TARGETS)
    print(
        f"source={args.source} model={args.model} n={args.n} steps={args.steps} "
        f"scheduler={args.scheduler} guidance={args.guidance} ({elapsed:.1f}s)"
    )
    print(f"{'prompt kind':<18}{'n':>5}" + "".join(f"{c:>14}" for c in checks))
    report: dict[str, Any] = {}  # per kind: {check: rate}; "stripes": a rate
    for kind in sorted(by_kind, key=lambda k: (k == "all", k)):
        results = by_kind[kind]
        n = sum(1 for s in scenes if kind == "all" or prompt_kind(s) == kind)
        report[kind] = {c: float(np.mean(v)) for c, v in results.items()}
        cells = "".join(f"{report[kind][c]:>14.2f}" if c in report[kind] else f"{'-':>14}" for c in checks)
        print(f"{kind:<18}{n:>5}{cells}")
    print("shape by kind and size asked (one-shape prompts): right/asked, and what came out instead")
    for (kind, size), found_kinds in sorted(shapes_found.items()):
        wrong = ", ".join(f"{k or 'nothing'} {n}" for k, n in found_kinds.most_common() if k != kind)
        print(f"  {size:>5} {kind:<9}{found_kinds[kind]:>4}/{sum(found_kinds.values()):<4}{wrong}")
    report["stripes"] = float(np.mean([shapes_data.has_stripes(image) for image in images]))
    print(f"striped backgrounds (the stripes adapter's style): {report['stripes']:.3f}")
    report["shapes_found"] = {f"{size} {kind}": dict(c) for (kind, size), c in sorted(shapes_found.items())}
    met = {c: report["all"][c] >= t for c, t in TARGETS.items() if c in report["all"]}  # scored here
    print("targets: " + ", ".join(f"{c} ≥ {TARGETS[c]:.2f} {'met' if ok else 'NOT met'}" for c, ok in met.items()))
    report["fidelity"] = shape_fidelity(images, scenes, truths, captions, args.worst)
    if args.grid:
        grid(images[:16], captions[:16], args.grid)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "report": report, "seconds": elapsed}, indent=2
            )
        )
    return report


if __name__ == "__main__":
    main()
