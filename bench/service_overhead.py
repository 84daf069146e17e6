"""What the service adds to a generation: `python bench/service_overhead.py --jobs 20 --threads 1`.

The same jobs two ways, interleaved one by one (alternating which goes first) so that both see
the same machine load:

- direct:     `engine.generate([request])` in this process (the model loaded here, torch limited
              to `--threads` threads);
- end-to-end: a client POSTs the job to a real `diffq api` process, long-polls it
              (`GET /v1/jobs/{id}?wait=4`) until it has ended and downloads its PNG; a real
              `diffq worker` process (DIFFQ_TORCH_THREADS=`--threads`, every other setting at its
              default: progress, previews, cancel checks, batching on with its 5 ms wait)
              runs it; all on the embedded redis-server of diffq.app.embedded_redis.

Only one of the two runs at a time. Prints the median seconds per job of each, the ratio
end-to-end / direct (target: <= 1.05 at the defaults), and the latency the service adds per job
(end-to-end minus the direct run of the same pair) at p50 and p99.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime

import httpx
from _stack import HEADERS, SHAPES, Stack, cpu_seconds, one_job, percentile

PROMPT = "a small red circle on the left, blue background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="measured jobs of each kind")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in the worker")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="DIFFQ_NAME=VALUE",
                        help="a setting for the API and worker processes (repeatable), e.g. DIFFQ_BATCH_MAX=1")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)

    import torch

    from diffq.model.engine import Engine, GenerationRequest

    torch.set_num_threads(args.threads)
    engine = Engine.load(SHAPES)

    with Stack(DIFFQ_TORCH_THREADS=str(args.threads), **overrides) as stack:
        url = stack.api()
        stack.worker()
        stack.wait_models(url, {"shapes"})
        client = httpx.Client(base_url=url, timeout=120, headers=HEADERS)

        pids = {"worker": stack.processes["worker"].pid, "api": stack.processes["api"].pid,
                "redis": stack.redis.process.pid}
        cpu: dict[str, float] = {}

        def direct(seed: int) -> float:
            request = GenerationRequest(prompt=PROMPT, seed=seed, steps=args.steps)
            started, cpu_started = time.perf_counter(), time.process_time()
            engine.generate([request])
            cpu["direct"] = cpu.get("direct", 0.0) + time.process_time() - cpu_started
            return time.perf_counter() - started

        def end_to_end(seed: int) -> float:
            started = time.perf_counter()
            job = one_job(client, PROMPT, seed, args.steps)
            elapsed = time.perf_counter() - started
            timings = {key: datetime.fromisoformat(job["timings"][key]).timestamp()
                       for key in ("created_at", "started_at", "finished_at")}
            stages["queued"].append(timings["started_at"] - timings["created_at"])
            stages["running"].append(timings["finished_at"] - timings["started_at"])
            return elapsed

        stages: dict[str, list[float]] = {"queued": [], "running": []}
        for seed in range(2):  # warm-up: first calls, caches, the worker's first job
            direct(seed), end_to_end(seed)
        for stage in stages.values():
            stage.clear()
        cpu.clear()
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        seconds: dict[str, list[float]] = {"direct": [], "end-to-end": []}
        for n in range(args.jobs):
            seed = 1000 + n
            order = ("direct", "end-to-end") if n % 2 == 0 else ("end-to-end", "direct")
            for kind in order:
                seconds[kind].append(direct(seed) if kind == "direct" else end_to_end(seed))
        client.close()
        cpu.update({name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()})

    base, e2e = statistics.median(seconds["direct"]), statistics.median(seconds["end-to-end"])
    added_ms = [1000 * (e - d) for e, d in zip(seconds["end-to-end"], seconds["direct"], strict=True)]
    print(f"model=shapes steps={args.steps} threads={args.threads} jobs={args.jobs} (sequential, one at a time) "
          f"settings: {' '.join(args.set) or 'defaults'}")
    print(f"{'path':>12} {'s/job (median)':>15} {'min':>7} {'max':>7}")
    for kind, values in seconds.items():
        print(f"{kind:>12} {statistics.median(values):>15.3f} {min(values):>7.3f} {max(values):>7.3f}")
    print(f"end-to-end / direct (medians): {e2e / base:.3f}   (sums: "
          f"{sum(seconds['end-to-end']) / sum(seconds['direct']):.3f})")
    print(f"added latency per job: p50 {percentile(added_ms, 50):.1f} ms, p99 {percentile(added_ms, 99):.1f} ms")
    per_job = {name: seconds_ / args.jobs for name, seconds_ in cpu.items()}
    print(f"CPU s/job: direct {per_job['direct']:.3f}; service: worker {per_job['worker']:.3f} "
          f"({per_job['worker'] / per_job['direct']:.3f} × direct), api {per_job['api']:.3f}, "
          f"redis {per_job['redis']:.3f}")
    print(f"end-to-end split (medians, from the job's timings): created→started "
          f"{1000 * statistics.median(stages['queued']):.1f} ms, started→finished "
          f"{statistics.median(stages['running']):.3f} s ({statistics.median(stages['running']) / base:.3f} × direct)")


if __name__ == "__main__":
    main()
