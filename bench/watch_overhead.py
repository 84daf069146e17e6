"""What watching a job costs: `python bench/watch_overhead.py`.

Runs the default model in-process at the service's settings (DPM-Solver++ 2M, 20 steps,
64×64) three ways, interleaved over several rounds so all see the same machine load:

- off:      no step callback at all;
- defaults: the worker's ProgressReporter at the deployment defaults (cancel check every
            step, progress with ETA at most every 0.1 s, a latent-projection preview at most
            every 0.5 s, each with its event) against a real Redis;
- every step: progress, a preview and their events at every single step (the worst case).

Prints the median seconds per job and each mode's ratio to `off`. The target: defaults ≤ 1.05.
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
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()

    import torch
    from redis import Redis

    from diffq.app.contract.records import JobParams, JobRecord
    from diffq.app.contract.store import JobStore
    from diffq.app.embedded_redis import EmbeddedRedis
    from diffq.app.settings import Settings
    from diffq.model.engine import Engine, GenerationRequest
    from diffq.worker.progress import PreviewSettings, ProgressReporter

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.load(args.model)
    defaults = Settings(_env_file=None)
    server = EmbeddedRedis()
    server.start()
    store = JobStore(Redis.from_url(server.url))
    params = JobParams(prompt="p", width=64, height=64, steps=args.steps, guidance_scale=5.0,
                       scheduler="dpmpp_2m", seed=0)

    def reporter(job_id: str, progress_interval: float, preview_interval: float) -> ProgressReporter:
        store.create(JobRecord(id=job_id, model="shapes", request=params), ttl=600)
        store.claim(job_id, "bench", "token")
        previews = PreviewSettings(decoder=defaults.preview_decoder, interval=preview_interval, size=(64, 64))
        return ProgressReporter(store, job_id, "token", progress_interval, engine=engine, previews=previews)

    modes = {
        "off": lambda r: None,
        "defaults": lambda r: reporter(f"d{r}", defaults.progress_interval, defaults.preview_interval),
        "every step": lambda r: reporter(f"e{r}", 0.0, 0.0),
    }

    def run(mode: str, round_: int) -> float:
        request = GenerationRequest(prompt="a small red circle on the left, blue background", seed=round_,
                                    steps=args.steps, guidance_scale=5.0, scheduler="dpmpp_2m")
        on_step = modes[mode](round_)
        started = time.perf_counter()
        with torch.inference_mode():
            engine.generate([request], on_step=on_step)
        return time.perf_counter() - started

    try:
        for mode in modes:  # warm-up (the projection is fitted on first use)
            run(mode, 0)
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(1, args.rounds + 1):
            for mode in modes:
                seconds[mode].append(run(mode, r))
    finally:
        server.stop()
    base = statistics.median(seconds["off"])
    print(f"model={args.model.name} device={engine.info.device} threads={torch.get_num_threads()} "
          f"steps={args.steps} rounds={args.rounds} preview_decoder={defaults.preview_decoder}")
    print(f"{'mode':>12} {'s/job (median)':>15} {'ratio to off':>13}")
    for mode, values in seconds.items():
        print(f"{mode:>12} {statistics.median(values):>15.3f} {statistics.median(values) / base:>13.3f}")


if __name__ == "__main__":
    main()
