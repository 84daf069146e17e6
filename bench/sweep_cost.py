"""Redis commands of one sweep with a deep queue: `python bench/sweep_cost.py --queued 1000`.

A worker's sweeper (``diffq.worker.sweeper``) runs for each model every ``DIFFQ_SWEEP_INTERVAL``
(2 s by default), whichever worker takes it. This queues ``--queued`` jobs of the bundled model
through the API (one catalog batch, API keys off; ``--with-deadline`` of them with a deadline an
hour away, so not due) on an embedded Redis with the model registered and no worker, then runs
``--sweeps`` sweeps and counts the commands Redis executed for them (``INFO commandstats``,
commands inside scripts included). Printed: commands per sweep by command, and what that costs
each queued job per minute of waiting (30 sweeps a minute at the default interval).

Run it in two trees to compare code: ``PYTHONPATH=<other tree> python bench/sweep_cost.py``.
"""

from __future__ import annotations

import argparse
from collections import Counter

from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.contract.records import WorkerRecord, utcnow
from diffq.app.contract.registry import Registry
from diffq.app.contract.tasks import queue_name
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.main import create_app
from diffq.app.settings import Settings
from diffq.worker.service import load_engine, model_record
from diffq.worker.sweeper import Sweeper


def commands(redis: Redis) -> Counter[str]:
    return Counter({name.removeprefix("cmdstat_").upper(): stats["calls"]
                    for name, stats in redis.info("commandstats").items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=1000, help="jobs waiting in the queue")
    parser.add_argument("--with-deadline", type=int, default=100, help="of them, with a deadline (not due)")
    parser.add_argument("--sweeps", type=int, default=5)
    args = parser.parse_args()

    server = EmbeddedRedis()
    server.start()
    try:
        redis = Redis.from_url(server.url)
        settings = Settings(_env_file=None, redis_url=server.url, auth="off", max_batch_items=max(args.queued, 1))
        model = model_record(load_engine(settings))
        now = utcnow()
        worker = WorkerRecord(id="bench", model=model.name, device=model.device, dtype=model.dtype, host="bench",
                              pid=1, queue=queue_name(model.name), started_at=now, heartbeat_at=now)
        Registry(redis, ttl=600).announce(worker, model)
        item = {"prompt": "a small red circle on the left, blue background", "steps": 20}
        items = [{**item, "deadline_seconds": 3600} if n < args.with_deadline else item for n in range(args.queued)]
        with TestClient(create_app(settings)) as client:
            response = client.post("/v1/batches", json={"items": items})
            assert response.status_code == 202, response.text[:500]
        sweeper = Sweeper(redis, settings, model.name, "bench")
        total: Counter[str] = Counter()
        for _ in range(args.sweeps):
            redis.delete(f"diffq:sweeper:{model.name}")  # the lock: each sweep runs, as one every interval would
            before = commands(redis)
            sweeper.sweep()
            after = commands(redis)
            total += after - before
            total["INFO"] -= 1  # the counting itself
        per_sweep = {name: count / args.sweeps for name, count in total.items() if count > 0}
        overall = sum(per_sweep.values())
        print(f"queued={args.queued} (with a deadline: {args.with_deadline}) sweeps={args.sweeps}")
        for name, count in sorted(per_sweep.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {name:>14} {count:10.1f} per sweep")
        print(f"commands per sweep: {overall:.1f}; per queued job and minute of waiting (30 sweeps): "
              f"{overall * 30 / max(args.queued, 1):.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
