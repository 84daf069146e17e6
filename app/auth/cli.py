"""``diffq keys create | list | revoke``: API keys, straight in Redis (``DIFFQ_REDIS_URL``).

Run it where the API's Redis is reachable, e.g. ``docker compose exec api diffq keys create
--name shop-a``. ``create`` prints the key once; Redis keeps only its SHA-256.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffq.app.auth.apikeys import PRIORITIES, ApiKey, KeyLimits, KeyStore
from diffq.app.auth.quotas import parse_rate
from diffq.app.contract import connection
from diffq.app.settings import Settings


def add_commands(commands: argparse._SubParsersAction, run: object) -> None:
    """The ``keys`` command and its subcommands, each run by ``run(args)``."""
    keys = commands.add_parser("keys", help="create, list and revoke API keys (in DIFFQ_REDIS_URL's Redis)")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="make a key and print it (once)")
    create.add_argument("--name", required=True, help="who the key is for, e.g. shop-a")
    create.add_argument("--rate", help='requests per period, e.g. "50/second" (default: DIFFQ_RATE_LIMIT)')
    create.add_argument(
        "--max-queued", type=int, help="jobs it may have queued at once (default: DIFFQ_MAX_QUEUED_JOBS)"
    )
    create.add_argument(
        "--max-cost", type=int, help="most width × height × steps × images per job (default: DIFFQ_MAX_JOB_COST)"
    )
    create.add_argument(
        "--max-streams", type=int, help="event streams it may hold open (default: DIFFQ_MAX_EVENT_STREAMS)"
    )
    create.add_argument(
        "--priority",
        choices=PRIORITIES,
        default="normal",
        help="its jobs' class: every queued high job runs before any normal one (default: normal)",
    )
    create.add_argument("--strip-metadata", action="store_true", help="never write generation parameters into its PNGs")
    create.add_argument(
        "--content-credentials",
        choices=("required", "optional", "off"),
        help="C2PA signing of its images (default: DIFFQ_CONTENT_CREDENTIALS)",
    )
    create.add_argument("--json", action="store_true", help="print the key and its record as JSON")

    listing = actions.add_parser("list", help="the keys (ids, names, limits; never the secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    revoke = actions.add_parser("revoke", help="refuse a key from now on (its jobs stay until they expire)")
    revoke.add_argument("key", help="the key's id or name")
    for parser in (create, listing, revoke):
        parser.set_defaults(run=run)


def main(args: argparse.Namespace, settings: Settings) -> int:
    redis = connection.sync_client(settings, socket_connect_timeout=5, socket_timeout=10)
    store = KeyStore(redis)
    try:
        if args.action == "create":
            return _create(args, store)
        if args.action == "list":
            return _list(args, store)
        return _revoke(args, store)
    finally:
        redis.close()


def _create(args: argparse.Namespace, store: KeyStore) -> int:
    try:
        if args.rate is not None:
            parse_rate(args.rate)
        limits = KeyLimits(
            rate_limit=args.rate,
            max_queued_jobs=args.max_queued,
            max_job_cost=args.max_cost,
            max_event_streams=args.max_streams,
            priority=args.priority,
            strip_metadata=args.strip_metadata,
            content_credentials=args.content_credentials,
        )
        key, token = store.create(args.name, limits)
    except ValueError as error:  # pydantic's ValidationError too
        print(f"diffq keys create: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"key": token, **_public(key)}))
    else:
        print(token)
        print(
            f"key {key.id} ({key.name}): shown once, keep it secret; send it as `Authorization: Bearer <key>`",
            file=sys.stderr,
        )
    return 0


def _list(args: argparse.Namespace, store: KeyStore) -> int:
    found = store.all()
    if args.json:
        for key in found:
            print(json.dumps(_public(key)))
        return 0
    print(f"{'id':<12}  {'name':<20}  {'created':<20}  {'state':<8}  {'priority':<8}  limits")
    for key in found:
        state = "active" if key.active else "revoked"
        limits = ", ".join(f"{name}={value}" for name, value in _limits(key).items()) or "defaults"
        created = f"{key.created_at:%Y-%m-%d %H:%M:%S}"
        print(f"{key.id:<12}  {key.name:<20}  {created}   {state:<8}  {key.priority:<8}  {limits}")
    return 0


def _revoke(args: argparse.Namespace, store: KeyStore) -> int:
    matches = store.find(args.key)
    if not matches:
        print(f"diffq keys revoke: no key with id or name {args.key!r} (see `diffq keys list`)", file=sys.stderr)
        return 1
    if len(matches) > 1:
        ids = ", ".join(key.id for key in matches)
        print(
            f"diffq keys revoke: {len(matches)} keys are named {args.key!r} ({ids}); revoke one by id", file=sys.stderr
        )
        return 1
    key = store.revoke(matches[0].id)
    assert key is not None
    print(f"revoked key {key.id} ({key.name})")
    return 0


def _limits(key: ApiKey) -> dict[str, object]:
    chosen = key.model_dump(
        include={"rate_limit", "max_queued_jobs", "max_job_cost", "max_event_streams", "content_credentials"}
    )
    if key.strip_metadata:
        chosen["strip_metadata"] = True
    return {name: value for name, value in chosen.items() if value is not None}


def _public(key: ApiKey) -> dict[str, object]:
    return key.model_dump(mode="json", exclude={"digest"})
