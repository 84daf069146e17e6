"""What marking outputs costs, and what the watermark survives: `python bench/provenance.py`.

Side by side in one run, on the default model (DPM-Solver++ 2M, 20 steps, guidance 5, 64×64):
seconds per image of the engine, and of the worker's last step (``diffq.worker.marking.Marker.finish``)
with no marks (plain PNG with parameters), the IPTC label, the label plus a C2PA signature, and,
at 512×512 where the watermark applies, the watermark too; each as a ratio to the engine plus a
plain PNG. Then the watermark's bit accuracy on the original, after JPEG quality 80, and after a
0.5× resize, on a picture-like image and on a random tiny pipeline's noise-like output.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "shapes")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from diffq.app.contract.records import JobParams
    from diffq.app.provenance import watermark
    from diffq.app.provenance.credentials import ContentSigner
    from diffq.model.engine import Engine, GenerationRequest
    from tests.certificates import make_chain
    from diffq.worker.marking import Marker
    from diffq.worker.service import model_record

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.load(args.model)
    model = model_record(engine)
    signer = ContentSigner.from_files(*make_chain(Path(tempfile.mkdtemp())))
    payload = b"diffq-bench"
    params = JobParams(prompt="a small red circle on the left, blue background", width=64, height=64, steps=20,
                       guidance_scale=5.0, scheduler="dpmpp_2m", seed=1)
    markers = {"plain PNG": Marker(label=False), "+ IPTC label": Marker(),
               "+ C2PA signature": Marker(signer=signer), "+ watermark": Marker(signer=signer, payload=payload)}

    generate: list[float] = []
    finish: dict[str, list[float]] = {name: [] for name in markers}
    images = []
    engine.generate([GenerationRequest(prompt=params.prompt, seed=0, steps=20, guidance_scale=5.0,
                                       scheduler="dpmpp_2m")])  # warm-up
    for n in range(args.images):
        started = time.perf_counter()
        with torch.inference_mode():
            result = engine.generate([GenerationRequest(prompt=params.prompt, seed=n, steps=20, guidance_scale=5.0,
                                                        scheduler="dpmpp_2m")])[0]
        generate.append(time.perf_counter() - started)
        images.append(result.images[0])
        for name, marker in markers.items():  # interleaved: every variant sees the same machine load
            started = time.perf_counter()
            marker.finish(result.images[0], params, n, model)
            finish[name].append(time.perf_counter() - started)
    engine_s = statistics.median(generate)
    base = engine_s + statistics.median(finish["plain PNG"])
    print(f"model={args.model.name} device={engine.info.device} threads={torch.get_num_threads()} "
          f"images={args.images} (64×64: the watermark is skipped below 256×256)")
    print(f"{'last step':<20} {'ms/image':>9} {'(engine + it) / (engine + plain PNG)':>38}")
    print(f"{'engine (20 steps)':<20} {engine_s * 1000:>9.1f}")
    for name, values in finish.items():
        print(f"{name:<20} {statistics.median(values) * 1000:>9.2f} {(engine_s + statistics.median(values)) / base:>38.3f}")

    big = [image.resize((512, 512), Image.Resampling.BICUBIC) for image in images[:3]]
    big_params = params.model_copy(update={"width": 512, "height": 512})
    print("\nat 512×512 (shapes images upscaled), ms/image of the last step:")
    for name, marker in markers.items():
        times = []
        for n, image in enumerate(big):
            started = time.perf_counter()
            marker.finish(image, big_params, n, model)
            times.append(time.perf_counter() - started)
        print(f"  {name:<20} {statistics.median(times) * 1000:>9.2f}")

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    print("\nwatermark bit accuracy (payload of", len(payload) * 8, "bits):")
    print(f"  {'image':<32} {'original':>9} {'JPEG q80':>9} {'0.5x':>9}")
    for label, picture in (("shapes image upscaled to 512", big[0]), ("random noise 512 (tiny pipeline)", noise)):
        marked = watermark.embed(picture, payload)
        jpeg = io.BytesIO()
        marked.save(jpeg, format="JPEG", quality=80)
        half = marked.resize((256, 256), Image.Resampling.BICUBIC)
        row = [watermark.read(candidate, payload)["bit_accuracy"] for candidate in (marked, Image.open(jpeg), half)]
        print(f"  {label:<32} {row[0]:>9.0%} {row[1]:>9.0%} {row[2]:>9.0%}")


if __name__ == "__main__":
    main()
