"""Does a refused API key take as long as any other? `python bench/auth_timing.py --rounds 5`.

Times `KeyStore.verify` (the whole check behind every `/v1` request: one Redis read, one SHA-256,
one constant-time compare) on an embedded redis-server for each way a key can be wrong, and for
the right key, interleaved round by round so that machine noise falls on all of them alike.
Prints the median microseconds of each and its ratio to the right key's: a caller timing the
401s learns nothing when every ratio is about 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

from redis import Redis

from diffq.app.auth.apikeys import KeyStore
from diffq.app.embedded_redis import EmbeddedRedis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="per case per round")
    args = parser.parse_args()

    server = EmbeddedRedis()
    server.start()
    try:
        redis = Redis.from_url(server.url)
        store = KeyStore(redis)
        _, token = store.create("bench")
        _, revoked = store.create("revoked")
        store.revoke(revoked.split("_")[1])
        secret = token.split("_", 2)[2]
        cases = {
            "right key": token,
            "missing": None,
            "malformed": "hunter2",
            "unknown id": f"dq_000000000000_{secret}",
            "wrong secret": token[:-1] + ("A" if token[-1] != "A" else "B"),
            "revoked": revoked,
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, candidate in cases.items():
                for _ in range(args.calls):
                    started = time.perf_counter()
                    store.verify(candidate)
                    samples[name].append(time.perf_counter() - started)
        base = statistics.median(samples["right key"])
        print(f"KeyStore.verify, {args.rounds} rounds x {args.calls} calls per case, embedded redis-server")
        print(f"{'case':>14}  {'median µs':>10}  {'p90 µs':>8}  {'/ right key':>11}")
        for name, times in samples.items():
            median = statistics.median(times)
            p90 = statistics.quantiles(times, n=10)[-1]
            print(f"{name:>14}  {median * 1e6:>10.1f}  {p90 * 1e6:>8.1f}  {median / base:>11.3f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
